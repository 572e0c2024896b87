"""Dataset readers: each turns one on-disk layout into a MONAI datalist (a list of dicts).

Items follow docs/CONVENTIONS.md: absolute paths under ``image``/``label``/``lung``/``lesions``,
plus ``case_id``, ``text``, ``severity`` ... and ``source`` (the reader's name). A path key is left
out when the file does not exist (MONAI's ``LoadImaged(..., allow_missing_keys=True)`` then skips
it), never set to None. A malformed dataset raises :class:`segreport.errors.InputError` naming the
file or folder at fault; readers only look at names and headers, the voxels are checked when
:func:`segreport.data.io.load_volume` reads them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segreport.data.io import atomic_path, strip_nifti_suffix
from segreport.errors import InputError
from segreport.vocab import SEVERITY_BINS

log = logging.getLogger("segreport.data")

PATH_KEYS = ("image", "label", "lung", "lesions")
SEVERITIES = tuple(name for name, _ in SEVERITY_BINS)  # CT-0..CT-4


# ----------------------------------------------------------------------------------------- helpers


def _abspath(path: str | os.PathLike) -> Path:
    # abspath, not Path.resolve(): keep the user's symlinks in the paths we hand back
    return Path(os.path.abspath(path))


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    if not Path(path).is_dir():
        raise InputError(path, f"{what} folder not found")
    return _abspath(path)


def _check_unique_case_ids(items: Sequence[dict], where: str | os.PathLike) -> None:
    """Each (case id, slice index) once: slices of one volume share a case id, nothing else may."""
    seen: dict[tuple, dict] = {}
    for item in items:
        other = seen.setdefault((item["case_id"], item.get("slice_index")), item)
        if other is not item:
            raise InputError(
                where, f"duplicated case id {item['case_id']!r} ({other.get('image')} and {item.get('image')})"
            )


def _glob(folder: Path, pattern: str, recursive: bool) -> list[Path]:
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list]]]:
    """Header and ``(row number, cells)`` of a .csv or .xlsx (first sheet); blank rows dropped."""
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            from openpyxl import load_workbook

            workbook = load_workbook(path, read_only=True, data_only=True)
            try:
                rows = [list(r) for r in workbook.worksheets[0].iter_rows(values_only=True)]
            finally:
                workbook.close()
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
                rows = list(csv.reader(f))
    except (OSError, ValueError, KeyError, csv.Error, zipfile.BadZipFile) as exc:  # openpyxl: InvalidFileException, BadZipFile
        raise InputError(path, f"cannot read table ({type(exc).__name__}: {exc})") from exc
    numbered = [(n, r) for n, r in enumerate(rows, start=1) if any(v not in (None, "") for v in r)]
    if not numbered:
        raise InputError(path, "table is empty")
    header = ["" if v is None else str(v).strip() for v in numbered[0][1]]
    return header, numbered[1:]


def _column_index(path: Path, header: list[str], wanted: Sequence[str]) -> dict[str, int]:
    """Case-insensitive column lookup; a missing column is an InputError listing the columns found."""
    lower = {name.lower(): i for i, name in enumerate(header)}
    missing = [w for w in wanted if w.lower() not in lower]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; columns found: {header}")
    return {w: lower[w.lower()] for w in wanted}


def _cell(row: list, index: int) -> str:
    value = row[index] if index < len(row) else None
    return "" if value is None else str(value).strip()


# ----------------------------------------------------------------------------------- NIfTI folders


def read_nifti_folder(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike | None = None,
    pattern: str = "*.nii*",
    label_suffix: str = "",
    *,
    channel_suffix: str = "_0000",
    recursive: bool = False,
    require_labels: bool = True,
) -> list[dict]:
    """Image/label pairs from two folders, matched by case id.

    The case id is the file name without ``.nii[.gz]`` and without the nnU-Net ``channel_suffix``
    (``case_0000.nii.gz`` -> ``case``); only that exact suffix is stripped, so ``study_0255`` stays
    itself, and when the label is named after the whole stem (``labelsTr/case_0000.nii.gz``, as the
    phantom names cases) the whole stem is the case id. A label is ``<case id><label_suffix>.nii[.gz]`` in ``labels_dir`` (``label_suffix=""``
    covers nnU-Net and identical names, ``"_mask"`` covers MosMedData). With ``require_labels`` an
    image without a label is an error; otherwise its item simply has no ``label``.
    """
    images_dir = _require_dir(images_dir, "images")
    items, stems = [], {}
    for path in _glob(images_dir, pattern, recursive):
        case_id = stem = strip_nifti_suffix(path.name)
        if channel_suffix and case_id.endswith(channel_suffix):
            case_id = case_id[: -len(channel_suffix)]
        stems[str(path)] = stem
        items.append({"image": str(path), "case_id": case_id, "source": "nifti_folder"})
    if not items:
        raise InputError(images_dir, f"no image matches {pattern!r}")
    _check_unique_case_ids(items, images_dir)

    if labels_dir is not None:
        labels_dir = _require_dir(labels_dir, "labels")
        labels: dict[str, Path] = {}
        for path in _glob(labels_dir, pattern, recursive):
            stem = strip_nifti_suffix(path.name)
            if stem.endswith(label_suffix):
                case_id = stem[: len(stem) - len(label_suffix)]
                if case_id in labels:
                    raise InputError(labels_dir, f"two labels for case {case_id!r}: {labels[case_id]} and {path}")
                labels[case_id] = path
        for item in items:
            label = labels.get(item["case_id"])
            stem = stems[item["image"]]
            if label is None and stem in labels:  # "case_0000" named by its id, not by an nnU-Net channel
                item["case_id"], label = stem, labels[stem]
            if label is not None:
                item["label"] = str(label)
            elif require_labels:
                raise InputError(
                    item["image"], f"no label {item['case_id']}{label_suffix}.nii[.gz] in {labels_dir}"
                )
    return sorted(items, key=lambda it: it["case_id"])


def read_png_slices(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    lungs_dir: str | os.PathLike | None = None,
    pattern: str = "*.png",
) -> list[dict]:
    """2D slices stored as same-named image / lesion-mask (/ lung-mask) files in separate folders,
    e.g. the COVID-19-CT-Seg PNG export (``ct/``, ``infection/``, ``lungs/``). Every image needs a
    mask (and a lung mask when ``lungs_dir`` is given)."""
    images_dir = _require_dir(images_dir, "images")
    masks_dir = _require_dir(masks_dir, "masks")
    lungs_dir = None if lungs_dir is None else _require_dir(lungs_dir, "lung masks")
    items = []
    for path in _glob(images_dir, pattern, recursive=False):
        item = {"image": str(path), "case_id": path.stem, "source": "png_slices"}
        for key, folder in (("label", masks_dir), ("lung", lungs_dir)):
            if folder is None:
                continue
            if not (folder / path.name).is_file():
                raise InputError(path, f"no matching {key} file {path.name} in {folder}")
            item[key] = str(folder / path.name)
        items.append(item)
    if not items:
        raise InputError(images_dir, f"no image matches {pattern!r}")
    return items


# --------------------------------------------------------------------------------------------- MSD


def _resolve_paths(item: dict, base: str | os.PathLike) -> dict:
    """Make the path keys of ``item`` absolute (relative ones are taken from ``base``)."""
    for key in PATH_KEYS:
        value = item.get(key)
        if isinstance(value, (str, os.PathLike)):
            item[key] = str(_abspath(os.path.join(base, value)))
        elif isinstance(value, list):  # multi-channel image: a list of files
            item[key] = [str(_abspath(os.path.join(base, v))) for v in value]
    return item


def _missing_files(item: dict) -> list[str]:
    paths = [item[k] for k in PATH_KEYS if k in item]
    flat = [p for v in paths for p in (v if isinstance(v, list) else [v])]
    return [p for p in flat if not os.path.exists(p)]


def read_msd(dataset_json: str | os.PathLike, section: str = "training", *, check_files: bool = True) -> list[dict]:
    """Items of one section of a Medical Segmentation Decathlon style ``dataset.json``.

    Relative paths (``./imagesTr/x.nii.gz``) are resolved against the JSON's folder; every other field
    of an entry (``text``, ``severity``, ``attributes`` ...) is passed through unchanged. Plain-string
    entries (MSD's ``test`` list) become ``{"image": path}``. ``case_id`` defaults to the image name.
    """
    items = read_datalist_json(dataset_json, section)
    path = Path(dataset_json)
    for item in items:
        if "image" not in item:
            raise InputError(path, f"entry without 'image' in {section!r}: {item}")
        if "case_id" not in item:
            first = item["image"][0] if isinstance(item["image"], list) else item["image"]
            item["case_id"] = strip_nifti_suffix(Path(first).name).removesuffix("_0000")
        item.setdefault("source", "msd")
        missing = _missing_files(item) if check_files else []
        if missing:
            raise InputError(missing[0], f"listed in {path} ({section!r}, case {item['case_id']}) but not found")
    _check_unique_case_ids(items, path)
    return items


# ------------------------------------------------------------------------------------- MosMedData


def read_mosmeddata(root: str | os.PathLike, *, only_masked: bool = False) -> list[dict]:
    """MosMedData COVID19_1110: ``studies/CT-k/study_XXXX.nii.gz``, ``masks/study_XXXX_mask.nii.gz``
    and (optional) ``dataset_registry.csv`` (study_id, category, study_file, mask_file).

    One item per study present on disk (a partial download is fine); ``severity`` is its CT-k
    folder, cross-checked against the registry. ``label`` is the study's mask when it has one (50 of
    1110 do); ``only_masked=True`` keeps only those studies.
    """
    root = _require_dir(root, "MosMedData")
    studies_dir = _require_dir(root / "studies", "MosMedData studies")
    registry = _read_mosmed_registry(root / "dataset_registry.csv")
    items = []
    for path in _glob(studies_dir, "study_*.nii*", recursive=True):
        severity = path.parent.name
        if severity not in SEVERITIES or path.parent.parent != studies_dir:
            raise InputError(path, f"study outside a studies/CT-0..CT-4 folder (in {path.parent})")
        case_id = strip_nifti_suffix(path.name)
        item = {"image": str(path), "case_id": case_id, "severity": severity, "source": "mosmeddata"}
        entry = registry.get(case_id)
        if entry is not None:
            item["study_id"] = entry["study_id"]
            if entry["category"] != severity:
                raise InputError(
                    root / "dataset_registry.csv", f"{case_id} is {entry['category']} here but stored in {path.parent}"
                )
            mask = root / entry["mask_file"] if entry["mask_file"] else None
            if mask is not None and not mask.is_file():
                raise InputError(mask, f"mask of {case_id} listed in dataset_registry.csv but not found")
        else:
            mask = root / "masks" / f"{case_id}_mask.nii.gz"
            mask = mask if mask.is_file() else None
        if mask is not None:
            item["label"] = str(mask)
        if mask is not None or not only_masked:
            items.append(item)
    if not items:
        raise InputError(studies_dir, "no study_*.nii[.gz] found" + (" with a mask" if only_masked else ""))
    _check_unique_case_ids(items, studies_dir)
    return sorted(items, key=lambda it: it["case_id"])


def _read_mosmed_registry(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    header, rows = _read_table(path)
    col = _column_index(path, header, ("study_id", "category", "study_file", "mask_file"))
    registry = {}
    for n, row in rows:
        study_file = _cell(row, col["study_file"])
        if not study_file:
            raise InputError(path, f"line {n}: empty study_file")
        # registry paths are written root-relative with a leading "/": /studies/CT-1/study_0255.nii.gz
        registry[strip_nifti_suffix(Path(study_file).name)] = {
            "study_id": int(_cell(row, col["study_id"])) if _cell(row, col["study_id"]).isdigit() else None,
            "category": _cell(row, col["category"]),
            "mask_file": _cell(row, col["mask_file"]).lstrip("/"),
        }
    return registry


# --------------------------------------------------------------------------- LViT (MosMedData+/QaTa)


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


_SLICE_NAME = re.compile(r"(.+)_s(\d{3,})")
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "F")  # single-channel PNG modes


def _check_png_mask(table: Path, row: int, image: Path, label: Path) -> None:
    """A mask PNG must be one channel and the size of its image (read from the PNG headers only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im, Image.open(label) as lab:
            size, mode, label_size = im.size, lab.mode, lab.size
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(table, f"row {row}: cannot read {image.name} or its mask ({exc})") from exc
    if mode not in _MASK_MODES:
        raise InputError(label, f"a {mode} mask (row {row} of {table.name}): save masks as one-channel (greyscale) PNG")
    if label_size != size:
        raise InputError(label, f"mask size {label_size[0]}x{label_size[1]} differs from its image {image.name} "
                                f"{size[0]}x{size[1]} (row {row} of {table.name})")


def read_lvit(
    root: str | os.PathLike,
    split: str = "Train",
    *,
    text_file: str | os.PathLike | None = None,
    require_labels: bool = True,
) -> list[dict]:
    """2D slices with a finding sentence in the LViT layout (MosMedData+, QaTa-COV19).

    ``<split>_Folder/{img,labelcol}`` with ``<split>_Folder/<split>_text.xlsx`` or ``.csv`` (columns
    ``Image``, ``Description``); LanGuideMedSeg's variant ``<split> Folder/{Images,Ground-truths}``
    with ``prompt/<split>.csv`` is found too, and ``text_file`` overrides the search. One item per
    text row. The ``Image`` cell may name the image (MosMedData+: mask has the same name) or the
    mask (QaTa: ``mask_<image name>``); both are resolved.
    """
    root = _require_dir(root, "LViT dataset")
    folder_candidates = [root / f"{split}_Folder", root / f"{split} Folder"]
    folder = _first_existing(folder_candidates)
    if folder is None:
        raise InputError(root, f"no split folder {[p.name for p in folder_candidates]}")
    image_dir = _first_existing([folder / "img", folder / "Images"])
    label_dir = _first_existing([folder / "labelcol", folder / "Ground-truths"])
    if image_dir is None:
        raise InputError(folder, "no image folder (img/ or Images/)")
    if text_file is None:
        candidates = [
            folder / f"{split}_text.xlsx",
            folder / f"{split}_text.csv",
            root / "prompt" / f"{split.lower()}.csv",
        ]
        text_file = _first_existing(candidates)
        if text_file is None:
            raise InputError(folder, f"no text file; looked for {[str(p) for p in candidates]}")
    text_file = Path(text_file)
    header, rows = _read_table(text_file)
    col = _column_index(text_file, header, ("Image", "Description"))

    items = []
    for n, row in rows:
        # some exports keep Windows sub-folders in the name ("Images\\x.png"): keep the file name
        name = _cell(row, col["Image"]).replace("\\", "/").rsplit("/", 1)[-1]
        if not name:
            raise InputError(text_file, f"row {n}: empty Image cell")
        image = _first_existing([image_dir / name, image_dir / name.removeprefix("mask_")])
        if image is None:
            raise InputError(text_file, f"row {n}: image {name!r} not found in {image_dir}")
        text = _cell(row, col["Description"])
        if not text:
            raise InputError(text_file, f"row {n}: empty Description cell for {name} (every image needs its finding sentence)")
        item = {
            "image": str(image),
            "text": text,
            "case_id": image.stem,
            "split": split,
            "source": "lvit",
        }
        # slices exported from volumes are named <case>_s<index> (segreport's phantom export): keep
        # the case so per-case scores pool its slices and splits stay case-level
        sliced = _SLICE_NAME.fullmatch(image.stem)
        if sliced:
            item.update(case_id=sliced.group(1), slice_index=int(sliced.group(2)))
        label = None
        if label_dir is not None:
            label = _first_existing([label_dir / image.name, label_dir / f"mask_{image.name}"])
        if label is not None:
            _check_png_mask(text_file, n, image, label)
            item["label"] = str(label)
        elif require_labels:
            raise InputError(text_file, f"row {n}: no mask for {image.name} in {label_dir or folder}")
        items.append(item)
    _check_unique_case_ids(items, text_file)
    listed = {Path(it["image"]).name for it in items}
    unlisted = sorted(p.name for p in image_dir.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in listed)
    if unlisted:  # not an error (a text file may cover a subset), never silent
        log.warning("%s: %d image(s) of %s have no row and are left out, e.g. %s", text_file, len(unlisted), image_dir,
                    ", ".join(unlisted[:5]))
    return items


# ----------------------------------------------------------------------------------- JSON datalists


def read_datalist_json(
    path: str | os.PathLike, key: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict]:
    """One list of a MONAI/Decathlon datalist JSON, with relative ``image``/``label``/``lung``/``lesions``
    paths resolved against ``base_dir`` (default: the JSON's folder).

    Unlike ``monai.data.load_decathlon_datalist`` no other field is touched (MONAI joins any value
    that happens to name an existing path, which can rewrite a ``case_id``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "datalist file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        lists = [k for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
        raise InputError(path, f"no list {key!r}; lists found: {lists}")
    base = Path(base_dir) if base_dir is not None else path.parent
    items = []
    for entry in data[key]:
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise InputError(path, f"entry of {key!r} is neither a dict nor a path: {entry!r}")
        items.append(_resolve_paths(dict(entry), base))
    return items


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to a datalist JSON")


def write_datalist_json(
    path: str | os.PathLike, datalists: Mapping[str, Sequence[dict]], *, metadata: Mapping | None = None
) -> Path:
    """Write ``{name: items}`` (plus optional ``metadata`` fields such as ``name``/``description``) as
    a Decathlon-style JSON, atomically. Paths stay absolute, so both :func:`read_datalist_json` and
    ``monai.data.load_decathlon_datalist(path, data_list_key=name)`` load it unchanged from anywhere.
    """
    content = dict(metadata or {})
    for name, items in datalists.items():
        content[name] = [_resolve_paths(dict(item), os.getcwd()) for item in items]
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, default=_json_default)
            f.write("\n")
    return path
