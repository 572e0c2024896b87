"""Per-lesion statistics and the case report (JSON + human-readable text) for one predicted volume.

A lesion is a connected component of the predicted mask (26-connectivity, as in
:class:`segreport.transforms.findings.FindingsFromMask`), numbered 1..N by size, largest first. For each
one the report gives its size (voxels, mL from the affine's voxel volume), its centroid in world RAS mm,
its voxel bounding box, its HU mean/std, and where it lies: the patient's lung side and zone.

Location comes from a lung label thresholded from the CT (:func:`lung_mask_from_ct` +
:func:`split_left_right`, sides from the affine) and its zone map (craniocaudal thirds of each lung in
world z). Lesion voxels outside that mask are common (a consolidation touching the chest wall is not a
hole the lung mask fills, predicted masks leak over the pleura), so they are placed by the same
geometry extended outward: side by world x against the lung midline, level by world z against that
lung's extent. Without any lung in the scan, only the side is given, against the body's centre.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..data.io import atomic_path
from ..text.findings import format_finding
from ..transforms.findings import body_mask
from ..transforms.lung_mask import lung_mask_from_ct, split_left_right
from ..transforms.lung_regions import lung_zone_map
from ..vocab import LEVELS, LUNG_LABELS, SIDES, ZONES, severity_from_percent
from ..inference.predictor import Prediction

# A zone is listed for a lesion when it holds at least this share of its voxels (FindingsFromMask's rule).
ZONE_FRACTION = 0.1


def lung_regions(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lung label (1 right, 2 left: the patient's, from the affine) and zone map (1..6) of a CT in HU."""
    lung = split_left_right(lung_mask_from_ct(image), affine)
    zones = lung_zone_map(lung, affine) if lung.any() else np.zeros(lung.shape, dtype=np.uint8)
    return lung, zones


def voxel_volume_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return np.asarray(ijk, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def _box_world_extent(box: tuple[slice, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (min, max) xyz over the corners of a voxel box: exact for axis-aligned affines."""
    corners = np.array(np.meshgrid(*[(s.start, s.stop - 1) for s in box], indexing="ij")).reshape(3, -1).T
    world = _to_world(affine, corners)
    return world.min(axis=0), world.max(axis=0)


def _mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask (None when empty)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def label_lesions(mask: np.ndarray, min_voxels: int = 1) -> tuple[np.ndarray, tuple[slice, ...] | None]:
    """Lesions = connected components (26-connectivity) of ``mask`` >= ``min_voxels``, numbered 1..N by
    size, largest first (ties in scan order). Returns the instance map over the mask's bounding box and
    that box (None for an empty mask): working in the box keeps a 512x512x300 scan cheap."""
    box = _mask_box(np.asarray(mask) > 0)
    if box is None:
        return np.zeros((0, 0, 0), dtype=np.int32), None
    labels, n = ndimage.label(np.asarray(mask)[box] > 0, ndimage.generate_binary_structure(3, 3))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    order = [c for c in np.argsort(-sizes[1:], kind="stable") + 1 if sizes[c] >= min_voxels]
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[order] = np.arange(1, len(order) + 1)
    return relabel[labels], box


class _Locator:
    """Zone of lesion voxels outside the lung mask, by the lung geometry extended outward (module doc)."""

    def __init__(self, lung: np.ndarray, affine: np.ndarray, image: np.ndarray):
        self.affine = affine
        boxes = ndimage.find_objects(lung, max_label=max(LUNG_LABELS.values()))
        self.z_extent: dict[str, tuple[float, float]] = {}
        xs = []
        for side in SIDES:
            box = boxes[LUNG_LABELS[side] - 1]
            if box is not None:
                lo, hi = _box_world_extent(box, affine)
                self.z_extent[side] = (lo[2], hi[2])
                xs += [lo[0], hi[0]]
        self.has_lung = bool(xs)
        if self.has_lung:  # split_left_right's midline: the centre of the lungs' world-x extent
            self.midline = 0.5 * (min(xs) + max(xs))
        else:
            body = body_mask(image)
            centre = np.array(ndimage.center_of_mass(body)) if body.any() else (np.array(image.shape) - 1) / 2
            self.midline = float(_to_world(affine, centre[None])[0, 0])

    def sides(self, world: np.ndarray) -> np.ndarray:
        return np.where(world[:, 0] > self.midline, "right", "left")  # RAS+: +x is the patient's right

    def zones(self, world: np.ndarray) -> np.ndarray:
        """Zone codes 1..6 (0 where the scan has no lung to measure levels against)."""
        out = np.zeros(len(world), dtype=np.uint8)
        sides = self.sides(world)
        for side in SIDES:
            extent = self.z_extent.get(side) or next(iter(self.z_extent.values()), None)
            sel = sides == side
            if extent is None or not sel.any():
                continue
            lo, hi = extent
            level = np.floor(len(LEVELS) * (hi - world[sel, 2]) / max(hi - lo, 1e-6))
            level = np.clip(level, 0, len(LEVELS) - 1).astype(int)
            codes = np.array([ZONES.index(f"{lv}_{side}") + 1 for lv in LEVELS], dtype=np.uint8)
            out[sel] = codes[level]
        return out


def lesion_statistics(
    mask: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    lung: np.ndarray,
    zone_map: np.ndarray,
    lesion_attributes=(),
    min_voxels: int = 1,
) -> tuple[list[dict], list[dict]]:
    """Per-lesion statistics (module docstring) and the attribute sets no lesion contains.

    ``lesion_attributes`` are :class:`LesionAttributes`; each goes to the component containing its
    anchor voxel. Returns ``(lesions, unmatched_attributes)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    instances, box = label_lesions(mask, min_voxels)
    unmatched = []
    if box is None or not instances.any():
        unmatched = [{"voxel": [int(v) for v in a.voxel], "attributes": a.attributes, "reason": "no lesion found"}
                     for a in lesion_attributes]
        return [], unmatched
    offset = np.array([s.start for s in box])
    img, lung_c, zones_c = (np.asarray(a)[box] for a in (image, lung, zone_map))
    ids = np.arange(1, int(instances.max()) + 1)
    sizes = np.bincount(instances.ravel(), minlength=len(ids) + 1)

    sel = instances > 0
    lesion_ids = instances[sel]
    lesion_zones = zones_c[sel].copy()
    outside = lesion_zones == 0
    locator = _Locator(lung, affine, image)
    if outside.any():
        world = _to_world(affine, np.argwhere(sel)[outside] + offset)
        lesion_zones[outside] = locator.zones(world)
    zone_table = np.bincount(lesion_ids * 7 + lesion_zones, minlength=(len(ids) + 1) * 7).reshape(-1, 7)[1:]
    in_lung = np.bincount(lesion_ids, weights=(lung_c[sel] > 0), minlength=len(ids) + 1)[1:]
    centroids = np.array(ndimage.center_of_mass(sel, instances, ids)) + offset
    hu = img[sel].astype(np.float64)
    n = len(ids) + 1
    hu_mean = np.bincount(lesion_ids, weights=hu, minlength=n)[1:] / sizes[1:]
    hu_std = np.sqrt(np.bincount(lesion_ids, weights=(hu - hu_mean[lesion_ids - 1]) ** 2, minlength=n)[1:] / sizes[1:])
    boxes = ndimage.find_objects(instances)
    ml = voxel_volume_ml(affine)

    lesions = []
    for i, lesion_id in enumerate(ids):
        voxels = int(sizes[lesion_id])
        counts = zone_table[i]
        world_centroid = _to_world(affine, centroids[i][None])[0]
        if counts[1:].any():
            zone = ZONES[int(np.argmax(counts[1:]))]
            side = zone.split("_")[1]
            zones = {ZONES[z - 1]: round(float(counts[z] / voxels), 3) for z in range(1, 7) if counts[z]}
        else:  # no lung in the scan: the side still follows the body's midline
            zone, zones = None, {}
            side = str(locator.sides(world_centroid[None])[0])
        lesions.append({
            "id": int(lesion_id),
            "voxels": voxels,
            "volume_ml": round(voxels * ml, 4),
            "centroid_ras_mm": [round(float(v), 2) for v in world_centroid],
            "centroid_voxel": [round(float(v), 2) for v in centroids[i]],
            "bbox_voxel": {"min": [int(s.start + o) for s, o in zip(boxes[i], offset)],
                           "max": [int(s.stop - 1 + o) for s, o in zip(boxes[i], offset)]},
            "hu_mean": round(float(hu_mean[i]), 1),
            "hu_std": round(float(hu_std[i]), 1),
            "side": side,
            "zone": zone,
            "zones": zones,
            "in_lung_fraction": round(float(in_lung[i] / voxels), 3),
            "attributes": None,
        })

    for att in lesion_attributes:
        voxel = [int(round(float(v))) for v in att.voxel]
        lesion_id = 0
        if len(voxel) == 3:
            local = np.array(voxel) - offset
            if np.all(local >= 0) and np.all(local < instances.shape):
                lesion_id = int(instances[tuple(local)])
        if lesion_id == 0:
            unmatched.append({"voxel": voxel, "attributes": att.attributes, "reason": "voxel is in no lesion"})
        elif lesions[lesion_id - 1]["attributes"] is not None:
            unmatched.append({"voxel": voxel, "attributes": att.attributes,
                              "reason": f"lesion {lesion_id} already has attributes"})
        else:
            lesions[lesion_id - 1]["attributes"] = att.attributes
    return lesions, unmatched


def finding_from_lesions(lesions: list[dict]) -> str:
    """LViT sentence from the lesion list, for models that give no case finding of their own."""
    zones = {z for les in lesions for z, f in les["zones"].items() if f >= ZONE_FRACTION or z == les["zone"]}
    if lesions and not zones:
        return f"{len(lesions)} lesion(s); no lung found in the scan to place them."
    return format_finding(len(lesions), zones)


def build_report(
    prediction: Prediction,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    case_id: str,
    lung: np.ndarray | None = None,
    zone_map: np.ndarray | None = None,
    input_path: str | None = None,
    model: str | None = None,
    points: dict | None = None,
    min_voxels: int = 1,
) -> dict:
    """The JSON-serialisable report of one case. ``lung``/``zone_map`` are computed when not given."""
    affine = np.asarray(affine, dtype=np.float64)
    if lung is None or zone_map is None:
        lung, zone_map = lung_regions(image, affine)
    mask = np.asarray(prediction.mask)
    lesions, unmatched = lesion_statistics(mask, image, affine, lung, zone_map, prediction.lesion_attributes, min_voxels)
    ml = voxel_volume_ml(affine)
    lung_ml = {side: round(float(np.count_nonzero(lung == LUNG_LABELS[side]) * ml), 2) for side in SIDES}
    lung_voxels = np.count_nonzero(lung)
    involved = np.count_nonzero((mask > 0) & (lung > 0))
    percent = 100.0 * involved / lung_voxels if lung_voxels else None
    if prediction.case_finding:
        finding, source = prediction.case_finding, "model"
    else:
        finding, source = finding_from_lesions(lesions), "lesion geometry (report.finding_from_lesions)"
    return {
        "case_id": case_id,
        "input": input_path,
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "geometry": {
            "shape": [int(s) for s in mask.shape],
            "spacing_mm": [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)],
            "axcodes": "".join(nib.aff2axcodes(affine)),
            "affine": np.round(affine, 6).tolist(),
        },
        "finding": finding,
        "finding_source": source,
        "slice_findings": {str(k): v for k, v in sorted(prediction.slice_findings.items())},
        "n_lesions": len(lesions),
        "total_volume_ml": round(sum(les["volume_ml"] for les in lesions), 4),
        "lung": {
            "source": "HU-threshold lung mask (transforms.lung_mask), sides from the affine",
            "volume_ml": lung_ml,
            "involvement_percent": None if percent is None else round(percent, 3),
            "severity": None if percent is None else severity_from_percent(percent),
        },
        "lesions": lesions,
        "unmatched_attributes": unmatched,
        "points": points,
        "extras": prediction.extras,
    }


def _attribute_words(attributes: dict) -> str:
    parts = []
    for group, value in attributes.items():
        prob = value.get("prob")
        parts.append(f"{group} {value.get('label')}" + ("" if prob is None else f" ({float(prob):.2f})"))
    return ", ".join(parts)


def _zone_words(zone: str | None) -> str:
    return "" if zone is None else zone.split("_")[0] + " zone"


def format_report_text(report: dict) -> str:
    """The human-readable ``<case>_report.txt``."""
    g = report["geometry"]
    lung = report["lung"]
    lines = [
        f"Lesion report: {report['case_id']}",
        f"Input: {report['input']}",
        f"Model: {report['model']}    Created: {report['created']}",
        f"Scan: {' x '.join(map(str, g['shape']))} voxels, spacing {' x '.join(f'{s:g}' for s in g['spacing_mm'])} mm, "
        f"orientation {g['axcodes']}",
        f"Lungs (HU-threshold mask): right {lung['volume_ml']['right']:.0f} mL, left {lung['volume_ml']['left']:.0f} mL",
        "",
        f"FINDING: {report['finding']}",
    ]
    if lung["involvement_percent"] is not None:
        lines.append(f"Lung involvement: {lung['involvement_percent']:.1f} % ({lung['severity']})")
    lines += ["", f"Lesions: {report['n_lesions']}, total {report['total_volume_ml']:.2f} mL"]
    for les in report["lesions"]:
        where = f"{les['side']} lung" + (f", {_zone_words(les['zone'])}" if les["zone"] else "")
        x, y, z = les["centroid_ras_mm"]
        lo, hi = les["bbox_voxel"]["min"], les["bbox_voxel"]["max"]
        lines += [
            f"  #{les['id']}: {where}; {les['volume_ml']:.2f} mL ({les['voxels']} voxels); "
            f"HU {les['hu_mean']:.0f} +/- {les['hu_std']:.0f}",
            f"      centre x {x:.1f}, y {y:.1f}, z {z:.1f} mm (RAS); voxels "
            + ", ".join(f"{a} {a0}-{a1}" for a, a0, a1 in zip("ijk", lo, hi)),
        ]
        if les["attributes"]:
            lines.append(f"      attributes: {_attribute_words(les['attributes'])}")
    if report["slice_findings"]:
        lines += ["", "Per-slice findings (axial slice index):"]
        lines += [f"  {k}: {v}" for k, v in report["slice_findings"].items()]
    if report["unmatched_attributes"]:
        lines += ["", f"Attributes predicted outside every lesion: {len(report['unmatched_attributes'])}"]
    lines += ["", "Left/right are the patient's (from the image affine); zones are craniocaudal thirds of each lung.", ""]
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _finite(obj):
    """NaN/inf -> None, so the JSON stays strict (other tools reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write strict JSON atomically (temp file in the same folder + os.replace)."""
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False)
    return write_text(text + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)
