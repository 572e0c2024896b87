"""The 3D lesion report's data (seed 001): a dataset's cases with their lesions and per-lesion attributes
(MSD ``dataset.json`` or ``imagesTr``/``labelsTr``/``lesionsTr`` folders, a user attribute table), lesion-free
cases skipped with their reason, case-level splits (the paper's 60/20/20), one item per lesion when asked."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import readers, splits as splits_mod
from ..data.io import load_pair, load_volume
from ..errors import InputError
from ..transforms.attributes import encode_attribute
from ..transforms.lesion_select import lesion_ids, lesion_row  # noqa: F401  (re-exported)
from ..vocab import ATTRIBUTE_NAMES

log = logging.getLogger("segreport.lesion_report")

PAPER_RATIOS = (60, 20, 20)  # seed 001, Sec. 3.1: training / validation / test


_ID_COLUMNS = ("lesion_id", "id")


def read_attribute_table(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Per-lesion attributes from a CSV or JSON table -> ``{case_id: [{id, shape, ...}, ...]}``.

    Columns (CSV header or JSON keys): ``case_id``; ``lesion_id`` (or ``id``): the lesion's value in
    the case's instance map (``lesionsTr``), or, without an instance map, the number of its connected
    component in scan order; ``shape``, ``invasion``, ``density``, ``heterogeneity``, ``surface``
    (class names, synonyms or indices; see :mod:`segreport.transforms.attributes`); optional
    ``lesion_type``. An empty ``lesion_id`` makes the row the case-level description of its largest
    lesion (datasets annotated one lesion per scan, as the paper's). An empty attribute cell means
    "not annotated": training ignores that group for that lesion (``IGNORE_INDEX``).

    JSON may be a list of such rows or ``{case_id: [row without case_id, ...]}``. Unknown values, a
    missing column or a duplicated (case, lesion) raise :class:`InputError` naming the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "attribute table not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(path, f"not valid JSON ({exc})") from exc
        if isinstance(data, Mapping):
            rows = [{**r, "case_id": cid} for cid, lesions in data.items() for r in lesions]
        elif isinstance(data, list):
            rows = data
        else:
            raise InputError(path, "expected a list of rows or {case_id: [rows]}")
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    missing = [c for c in ("case_id", *ATTRIBUTE_NAMES) if c not in columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; expected case_id, lesion_id, {', '.join(ATTRIBUTE_NAMES)}")

    def blank(v) -> bool:
        return v is None or (isinstance(v, str) and not v.strip())

    table: dict[str, list[dict]] = {}
    seen = set()
    is_json = path.suffix.lower() == ".json"
    for n, row in enumerate(rows, start=1 if is_json else 2):  # CSV: line numbers (header = line 1)
        where = f"entry {n}" if is_json else f"line {n}"
        case_id = "" if blank(row.get("case_id")) else str(row["case_id"]).strip()
        if not case_id:
            raise InputError(path, f"{where}: empty case_id")
        raw_id = next((row[c] for c in _ID_COLUMNS if not blank(row.get(c))), None)
        try:
            lesion_id = None if raw_id is None else int(float(raw_id))
        except ValueError:
            raise InputError(path, f"{where}: lesion id {raw_id!r} is not an integer") from None
        if (case_id, lesion_id) in seen:
            raise InputError(path, f"{where}: case {case_id!r} lesion {lesion_id} appears twice")
        seen.add((case_id, lesion_id))
        entry: dict[str, Any] = {"id": lesion_id}
        if not blank(row.get("lesion_type")):
            entry["lesion_type"] = str(row["lesion_type"]).strip()
        for group in ATTRIBUTE_NAMES:
            value = row.get(group)
            if blank(value):
                entry[group] = None
                continue
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            try:
                encode_attribute(group, value.strip() if isinstance(value, str) else value, path)
            except InputError as exc:
                raise InputError(path, f"{where}: {exc.problem}") from None
            entry[group] = value.strip() if isinstance(value, str) else value
        table.setdefault(case_id, []).append(entry)
    return table


def _has_lesion(item: Mapping) -> bool:
    """Whether the item's label holds any lesion voxel; an InputError naming the label when it does not
    belong to its image (shape, affine, non-integer values: :func:`~segreport.data.io.load_pair`)."""
    return not load_pair(item["image"], item["label"], allow_empty=True)[3]["label_empty"]


def drop_lesion_free(items: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Keep items whose label has a lesion; the others come back as ``{case_id, reason}`` rows.

    An interactive lesion model has nothing to click on, no target mask and no attributes in a
    lesion-free scan, so such cases are skipped — each with a logged warning, never silently.
    """
    kept, skipped = [], []
    for item in items:
        if not item.get("label"):
            reason = "no lesion label"
        elif not _has_lesion(item):
            reason = "label has no lesion voxels (nothing to click on, no attributes)"
        else:
            kept.append(item)
            continue
        log.warning("skipping case %s: %s", item.get("case_id"), reason)
        skipped.append({"case_id": item.get("case_id"), "reason": reason})
    return kept, skipped


LESION_TARGETS = ("largest", "all")


def expand_lesions(items: Sequence[dict], min_voxels: int = 20) -> list[dict]:
    """One item per lesion (``lesion_id`` set) instead of one per case; lesions under ``min_voxels``
    voxels (on the original grid) are left out, with one logged line per case saying how many."""
    out = []
    for item in items:
        label = load_volume(item["label"])[0]
        inst = load_volume(item["lesions"])[0] if item.get("lesions") else None
        try:
            _, counts = lesion_ids(label, inst)
        except ValueError as exc:
            raise InputError(item.get("lesions"), str(exc)) from None
        keep = [int(i) for i in np.flatnonzero(counts >= min_voxels)]
        small = int(np.count_nonzero((counts > 0) & (counts < min_voxels)))
        if small:
            log.warning("case %s: %d lesion(s) under %d voxels not used as targets", item.get("case_id"), small, min_voxels)
        out += [{**item, "lesion_id": i} for i in keep]
    return out


def sampling_weights(items: Sequence[dict], by: str | None, power: float = 0.5) -> list[float] | None:
    """A sampling weight per training item, 1 / count(value)^``power`` of its lesion's ``by`` (an
    attribute group or ``lesion_type``; lesions without one form their own group): rare kinds of lesion
    are drawn more often (nnU-Net oversamples rare foreground the same way; 0.5 is the square-root
    sampling of Mahajan et al. 2018). None (``by`` None): plain shuffling. Why: solid nodules, a few of
    the phantom's training lesions, were not learned (Dice 0.01-0.06 clicked at their centre). Measured,
    density at power 1 on every step fixes them (0.47-0.79) but breaks the diffuse ground glass and the
    automatic mode; on the click steps only (:class:`LesionBatch` ``balanced_steps="clicks"``) it keeps
    the automatic mode but not the nodules. So the bundle keeps it off (docs/results.md)."""
    if by is None:
        return None
    values = [lesion_value(it, by) for it in items]
    counts = Counter(values)
    log.info("sampling balanced by %s (power %s): %s", by, power, dict(counts))
    return [float(counts[v]) ** -float(power) for v in values]


def lesion_value(item: Mapping, key: str):
    """``key`` of the item's own lesion: its attribute row (``id`` = ``lesion_id``), else the item's."""
    lesion = item.get("lesion_id")
    row = None if lesion is None else lesion_row(item.get("attributes"), int(lesion))
    return (row or {}).get(key, item.get(key))


def load_datalists(
    dataset_dir: str | os.PathLike,
    attribute_table: str | os.PathLike | None = None,
    ratios: Sequence[float] = PAPER_RATIOS,
    seed: int = 0,
    holdout_lesion_types: Sequence[str] = (),
    lesions: str = "largest",
    min_lesion_voxels: int = 20,
    require_training: bool = True,
) -> dict[str, list]:
    """Case-level splits of a 3D dataset: ``training``, ``validation``, ``test`` (+ ``zeroshot``) and
    ``skipped`` (``{case_id, reason}`` of lesion-free cases).

    ``dataset_dir``: an MSD-style ``dataset.json`` (the phantom writes one, with per-lesion attributes
    and ``lesionsTr`` instance maps) or ``imagesTr/`` + ``labelsTr/`` (+ optional ``lesionsTr/``).
    ``attribute_table``: CSV/JSON per lesion (:func:`read_attribute_table`), overriding attributes in
    the dataset. ``holdout_lesion_types``: the zero-shot protocol (Sec. 3.1): cases whose
    ``lesion_type`` is listed never enter training/validation and form the ``zeroshot`` split.
    ``lesions``: ``largest`` (the paper: one item per case, its largest lesion) or ``all`` (one item per
    lesion of at least ``min_lesion_voxels`` voxels, split still by case; more and more varied
    attribute targets from multi-lesion scans). A dataset with a ``splits.json`` is split by it (``ratios``
    and ``seed`` then do not apply). ``require_training``: a split without training cases is an error
    (evaluation sets it False: a test-only dataset). With no validation case left (tiny data sets)
    validation reuses the training cases, with a warning.
    """
    if lesions not in LESION_TARGETS:
        raise ValueError(f"lesions must be one of {LESION_TARGETS}, got {lesions!r}")
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file():
        items = readers.read_msd(root / "dataset.json")
    else:
        images = sorted((root / "imagesTr").glob("*.nii*"))
        # identical image/label names (MSD style, e.g. case_0000.nii.gz in both): no nnU-Net channel suffix
        same_names = bool(images) and all((root / "labelsTr" / p.name).is_file() for p in images)
        items = readers.read_nifti_folder(root / "imagesTr", root / "labelsTr", channel_suffix="" if same_names else "_0000")
        lesions_dir = root / "lesionsTr"
        for item in items:
            found = sorted(lesions_dir.glob(f"{item['case_id']}.nii*")) if lesions_dir.is_dir() else []
            if found:
                item["lesions"] = str(found[0])
    if attribute_table:
        table = read_attribute_table(attribute_table)
        ids = {it["case_id"] for it in items}
        unknown = sorted(set(table) - ids)
        if unknown:
            log.warning("%s: attributes for %d case(s) not in the dataset ignored, e.g. %s", attribute_table, len(unknown), unknown[:5])
        for item in items:
            if item["case_id"] in table:
                item["attributes"] = table[item["case_id"]]
                types = [a["lesion_type"] for a in table[item["case_id"]] if a.get("lesion_type")]
                if types and not item.get("lesion_type"):
                    item["lesion_type"] = types[0]
    items, skipped = drop_lesion_free(items)
    if not items:
        raise InputError(root, "no case with a lesion label: nothing to train or evaluate on")
    holdout = {"key": "lesion_type", "values": list(holdout_lesion_types)} if holdout_lesion_types else None
    stratify = "lesion_type" if all(it.get("lesion_type") for it in items) else None
    if (root / "splits.json").is_file():  # the dataset's own split (the phantom's holds its lesion plan per split)
        log.info("%s: using the dataset's splits.json (split_ratios and seed do not apply)", root)
        try:
            case_splits = splits_mod.read_splits(root / "splits.json", items, holdout)
        except ValueError as exc:
            raise InputError(root / "splits.json", str(exc)) from exc
    else:
        case_splits = splits_mod.split_cases(items, ratios=ratios, seed=seed, stratify_by=stratify, holdout=holdout)
    by_id = {it["case_id"]: it for it in items}
    out: dict[str, list] = {name: [by_id[c] for c in ids] for name, ids in case_splits.items()}
    if require_training and not out.get("training"):
        raise InputError(root, f"no training case after the split {case_splits}")
    if not out.get("validation"):
        log.warning("no validation case (only %d usable cases): validating on the training cases", len(items))
        out["validation"] = list(out["training"])
    if lesions == "all":
        out = {name: expand_lesions(split, min_lesion_voxels) for name, split in out.items()}
    out["skipped"] = skipped
    return out


