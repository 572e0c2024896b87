"""Telling DICOM series apart when they carry no SeriesInstanceUID (anonymised exports often drop it).

GDCM puts every such file of a folder in one "series" named "". Files that belong to one volume share
their frame of reference, image orientation and matrix size, so those are the key here; within a group
the slices are ordered by their position along the slice normal. When a folder holds several,
each gets the id ``nouid:<k>`` (k-th group, in key order), which ``load_volume(folder, series_uid="nouid:<k>")`` and
``segreport infer --series`` understand.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

PREFIX = "nouid:"


def _header(path: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _tag(reader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def header_tag(path: str, tag: str) -> str | None:
    """One tag (``"0008|0060"``) of a DICOM file's header, stripped; None when absent or empty."""
    return _tag(_header(path), tag) or None


def groups(files: list[str]) -> list[list[str]]:
    """The files of GDCM's "" series split into volumes, each sorted along its slice normal."""
    by_key: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for f in files:
        h = _header(f)
        direction = np.round(np.asarray(h.GetDirection(), dtype=float), 3)
        key = (_tag(h, "0020|0052"), tuple(direction[:6]), tuple(h.GetSize()[:2]))
        normal = np.asarray(h.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
        by_key[key].append((float(np.dot(normal, h.GetOrigin())), f))
    return [[f for _, f in sorted(by_key[k])] for k in sorted(by_key)]


def damaged_files(folder: Path, listed: set[str]) -> list[Path]:
    """Files of ``folder`` that announce themselves as DICOM (the "DICM" preamble) but that GDCM put in
    no series because their header cannot be read (truncated, damaged): a series without them misses slices."""
    damaged = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and str(p) not in listed):
        try:
            with open(path, "rb") as f:
                if f.read(132)[128:] != b"DICM":
                    continue
            _header(str(path))
        except RuntimeError:
            damaged.append(path)
        except OSError:
            continue
    return damaged


def uid_series(folder: Path, series_reader) -> list[tuple[str, list[str]]]:
    """``(series id, files)`` of every series in ``folder``: GDCM's UIDs, with the UID-less ones split.
    A folder's only series keeps GDCM's "" when it has no UID (nothing to tell apart); otherwise every
    UID-less volume is ``nouid:<k>``, so each can be picked."""
    ids = sorted(series_reader.GetGDCMSeriesIDs(str(folder)))
    out = []
    for uid in ids:
        files = list(series_reader.GetGDCMSeriesFileNames(str(folder), uid))
        if uid:
            out.append((uid, files))
            continue
        split = groups(files)
        alone = len(split) == 1 and len(ids) == 1
        out += [("", split[0])] if alone else [(f"{PREFIX}{k}", g) for k, g in enumerate(split)]
    return out
