"""Reader for folders of 2D CT slices with lesion and lung masks and a ``cases.csv`` (the COVID-19-CT-Seg
slice layout, MosMedData+ style)::

    ct/NNNN.png          8-bit grey axial slice
    infection/NNNN.png   lesion mask (0 / 255)
    lungs/NNNN.png       both lungs (0 / 255); left and right are its two large components
    cases.csv            file, case_id, index_in_case, slices_in_case [, source]

``index_in_case`` orders a case's slices from caudal to cranial. The folder is read as it is and never
written to; every problem is an :class:`~segreport.errors.InputError` naming the file. Items carry the
slices as uint8 arrays (1 x H x W, rows = image rows), so no later reader can transpose them, plus
``case_id``, ``slice_index``, ``slices_in_case`` and the file name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .readers import _column_index, _read_table, _require_dir

FOLDERS = {"image": "ct", "label": "infection", "lung": "lungs"}
CASES_FILE = "cases.csv"
COLUMNS = ("file", "case_id", "index_in_case", "slices_in_case")


def is_slice_folder(root: str | os.PathLike) -> bool:
    """Whether ``root`` looks like this layout (``ct/`` and ``cases.csv``)."""
    root = Path(root)
    return (root / CASES_FILE).is_file() and (root / FOLDERS["image"]).is_dir()


def read_png_gray(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit PNG as a (rows, columns) uint8 array; RGB(A) is averaged to grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(path, f"not a readable PNG ({exc})") from exc
    return array.astype(np.uint8)


def _int_cell(path: Path, n: int, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(path, f"line {n}: {name} {value!r} is not an integer") from None


def read_case_table(root: Path) -> dict[str, dict]:
    """``{file name: {"case_id", "slice_index", "slices_in_case", "source"}}`` from ``cases.csv``, checked."""
    table = root / CASES_FILE
    if not table.is_file():
        raise InputError(root, f"no {CASES_FILE} (columns {', '.join(COLUMNS)})")
    header, rows = _read_table(table)
    col = _column_index(table, header, COLUMNS)
    source = {h.lower(): i for i, h in enumerate(header)}.get("source")
    entries: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    for n, row in rows:
        cells = {k: (str(row[i]).strip() if i < len(row) and row[i] is not None else "") for k, i in col.items()}
        if not cells["file"] or not cells["case_id"]:
            raise InputError(table, f"line {n}: empty file or case_id")
        index = _int_cell(table, n, "index_in_case", cells["index_in_case"])
        count = _int_cell(table, n, "slices_in_case", cells["slices_in_case"])
        if not 0 <= index < count:
            raise InputError(table, f"line {n}: index_in_case {index} outside 0..{count - 1} (slices_in_case {count})")
        if cells["file"] in entries:
            raise InputError(table, f"line {n}: {cells['file']} listed twice")
        key = (cells["case_id"], index)
        if key in seen:
            raise InputError(table, f"line {n}: case {key[0]} slice {index} is also {seen[key]}")
        seen[key] = cells["file"]
        entries[cells["file"]] = {"case_id": cells["case_id"], "slice_index": index, "slices_in_case": count,
                                  "source": str(row[source]).strip() if source is not None and source < len(row) else ""}
    counts = {e["case_id"]: e["slices_in_case"] for e in entries.values()}
    for e in entries.values():
        if e["slices_in_case"] != counts[e["case_id"]]:
            raise InputError(table, f"case {e['case_id']} has two slices_in_case values ({e['slices_in_case']}, "
                                    f"{counts[e['case_id']]})")
    return entries


def read_slice_folder(root: str | os.PathLike, cases: set[str] | None = None) -> list[dict]:
    """Every slice of the folder (or of ``cases`` only), sorted by case and level. Each image needs its
    lesion and lung masks of the same size and a row in ``cases.csv``; each row needs its files."""
    root = _require_dir(root, "slice dataset")
    entries = read_case_table(root)
    folders = {key: _require_dir(root / name, f"{name}/") for key, name in FOLDERS.items()}
    on_disk = {p.name for p in folders["image"].glob("*.png") if not p.name.startswith(".")}
    unlisted = sorted(on_disk - set(entries))
    if unlisted:
        raise InputError(folders["image"] / unlisted[0], f"not in {root / CASES_FILE}: unknown case "
                                                         f"({len(unlisted)} such file(s))")
    if cases is not None:
        unknown = set(cases) - {e["case_id"] for e in entries.values()}
        if unknown:
            raise InputError(root / CASES_FILE, f"unknown case(s) {sorted(unknown)}")
    items = []
    for name, entry in entries.items():
        if cases is not None and entry["case_id"] not in cases:
            continue
        item = {**entry, "file": name, "source": entry["source"] or "slice_folder"}
        shape = None
        for key, folder in folders.items():
            path = folder / name
            if not path.is_file():
                what = {"image": "CT slice", "label": "infection mask", "lung": "lung mask"}[key]
                raise InputError(path, f"{what} of {name} (case {entry['case_id']}) not found")
            array = read_png_gray(path)
            if shape is not None and array.shape != shape:
                raise InputError(path, f"size {array.shape[1]}x{array.shape[0]} differs from its CT slice "
                                       f"{shape[1]}x{shape[0]}")
            shape = array.shape
            item[key] = array[None]
        items.append(item)
    if not items:
        raise InputError(root, "no slices")
    return sorted(items, key=lambda it: (it["case_id"], it["slice_index"]))
