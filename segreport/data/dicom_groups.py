"""The DICOM series of a folder (:func:`read_dicom_folder`), told apart also when they carry no
SeriesInstanceUID (anonymised exports often drop it).

GDCM puts every such file of a folder in one "series" named "". Files that belong to one volume share
their frame of reference, image orientation and matrix size, so those are the key here; within a group
the slices are ordered by their position along the slice normal. When a folder holds several,
each gets the id ``nouid:<k>`` (k-th group, in key order), which ``load_volume(folder, series_uid="nouid:<k>")`` and
``segreport infer --series`` understand.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import InputError

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


def read_dicom_folder(root: str | os.PathLike, *, recursive: bool = True, only: set[Path] | None = None) -> list[dict]:
    """One item per DICOM series found under ``root`` (SimpleITK/GDCM series detection). ``only``: look
    in just these folders under ``root`` (case ids stay relative to ``root``).

    ``image`` is the series folder (``load_volume`` and MONAI's ITKReader read it) and
    ``series_uid`` tells series apart when one folder holds several. ``case_id`` is the folder path
    relative to ``root`` (``/`` -> ``_``), with ``_s<k>`` added for the k-th series of a shared
    folder. ``patient_id``/``study_uid`` are copied so splits can keep a patient's scans together.
    """
    import SimpleITK as sitk

    root = Path(root).absolute()
    if not root.is_dir():
        raise InputError(root, "DICOM folder not found")
    if only is not None:
        folders = sorted(Path(p) for p in only)
    else:
        folders = [root] + (sorted(p for p in root.rglob("*") if p.is_dir()) if recursive else [])
    series_reader = sitk.ImageSeriesReader()
    items = []
    for folder in folders:
        # ITK warns "No Series were found" for every folder without DICOM: expected here, not news
        warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            series = uid_series(folder, series_reader)  # UID-less series split apart (data.dicom_groups)
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
        rel = folder.relative_to(root).as_posix()
        base = root.name if rel == "." else rel.replace("/", "_")
        for k, (uid, files) in enumerate(series):
            header = _header(files[0])
            items.append(
                {
                    "image": str(folder),
                    "series_uid": uid or None,  # "": the folder's one series without a SeriesInstanceUID
                    "case_id": base if len(series) == 1 else f"{base}_s{k}",
                    "n_slices": len(files),
                    "modality": _tag(header, "0008|0060") or None,
                    "patient_id": _tag(header, "0010|0020") or None,
                    "study_uid": _tag(header, "0020|000d") or None,
                    "source": "dicom",
                }
            )
    if not items:
        raise InputError(root, "no DICOM series found")
    return items
