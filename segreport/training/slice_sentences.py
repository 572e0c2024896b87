"""Training items from a folder of 2D slices with lesion and lung masks (:mod:`segreport.data.slice_folder`):
each slice's finding sentence from its masks, and case-level splits stratified by infection burden.

A slice's sentence comes from the project's one findings geometry (:class:`FindingsFromMask`) over a zone
map of the slice (:func:`segreport.transforms.lung_regions.slice_zone_map`):

- **sides**: the lung mask's components, given a side through the display convention's affine
  (``orientation``: ``radiological`` = patient right on the image's left, the layout's documented
  convention; ``neurological`` for folders stored the other way);
- **level**: ``(index_in_case + 0.5) / slices_in_case``, the slice's place in its case from caudal to
  cranial, cut into thirds. An approximation: a case's slices are taken to span its lungs evenly, and a
  slice gets one level (a 2D slice cannot show a lesion's craniocaudal extent);
- **areas**: connected lesion components (8-connected) of at least :data:`MIN_AREA_FRACTION` of the
  slice, the same share at any image size (66 px at 256², 4 px at 64²), so specks are not counted.
"""

from __future__ import annotations

import os
from typing import Sequence


from ..data import splits as splits_mod
from ..data.slice_folder import read_slice_folder
from ..metrics.consistency import sentence_agrees  # noqa: F401  (re-exported)
from ..transforms.findings import MIN_AREA_FRACTION, min_area, slice_finding  # noqa: F401  (re-exported)
from ..transforms.lung_regions import slice_zone_map
from ..transforms.orientation import display_affine

BURDEN_STRATA = ("low", "moderate", "high")


def describe_slices(items: list[dict], orientation: str = "radiological", keep_zones: bool = False) -> list[dict]:
    """Adds ``text`` (the slice's finding), ``lung_zones`` (1 x H x W zone map), ``level`` (the slice's place
    in its case, 0 caudal to 1 cranial: the level the sentence names), ``lesion_pixels`` and
    ``lung_pixels`` (for the case's burden) and, with ``keep_zones``, ``lesion_zones`` (the zone of every
    counted lesion pixel); the lung mask itself is dropped (its sides and level are in ``lung_zones``)."""
    affine = display_affine(orientation)
    for item in items:
        level = (item["slice_index"] + 0.5) / item["slices_in_case"]
        lung, label = item["lung"][0] > 127, item["label"][0] > 127
        zones = slice_zone_map(lung, level, affine)
        found = slice_finding(label, zones)
        item.update(text=found.text, lung_zones=zones[None], level=float(level), lesion_pixels=int(label.sum()),
                    lung_pixels=int(lung.sum()))
        del item["lung"]
        if keep_zones:
            item["lesion_zones"] = found.voxel_zones[None]
    return items


def case_burdens(items: list[dict]) -> dict[str, float]:
    """Each case's infection burden: its lesion pixels over its lung pixels, all slices pooled."""
    lesion: dict[str, int] = {}
    lung: dict[str, int] = {}
    for it in items:
        lesion[it["case_id"]] = lesion.get(it["case_id"], 0) + it["lesion_pixels"]
        lung[it["case_id"]] = lung.get(it["case_id"], 0) + it["lung_pixels"]
    return {c: lesion[c] / max(lung[c], 1) for c in lesion}


def burden_strata(burdens: dict[str, float]) -> dict[str, str]:
    """Cases ranked by burden and cut into thirds (low / moderate / high), so each split gets a spread."""
    ranked = sorted(burdens, key=lambda c: (burdens[c], c))
    return {c: BURDEN_STRATA[min(len(BURDEN_STRATA) - 1, i * len(BURDEN_STRATA) // len(ranked))]
            for i, c in enumerate(ranked)}


def slice_folder_datalists(root: str | os.PathLike, ratios: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                           orientation: str = "radiological", keep_zones: bool = False) -> dict[str, list[dict]]:
    """``{"training", "validation", "test"}`` items of a slice folder, split at case level (no patient in
    two splits), stratified by burden (the case ids of each split go into the checkpoint's provenance)."""
    items = describe_slices(read_slice_folder(root), orientation, keep_zones)
    burdens = case_burdens(items)
    strata = burden_strata(burdens)
    for item in items:
        item["burden_stratum"] = strata[item["case_id"]]
    cases = [{"case_id": c, "burden": strata[c]} for c in sorted(burdens)]
    if len(cases) < 3:  # too few to split: all in training (a folder to score whole: --eval_split all)
        case_splits = {"training": [c["case_id"] for c in cases], "validation": [], "test": []}
    else:
        case_splits = splits_mod.split_cases(cases, ratios=ratios, seed=seed, stratify_by="burden")
    owner = {c: name for name, ids in case_splits.items() for c in ids}
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for item in items:
        out[owner[item["case_id"]]].append(item)
    return out
