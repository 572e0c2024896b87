"""Per-lesion statistics and the case report (JSON + human-readable text) for one predicted volume.

A lesion is a connected component of the predicted mask (26-connectivity, as in
:class:`segreport.transforms.findings.FindingsFromMask`), numbered 1..N by size, largest first. For each
one the report gives its size (voxels, mL from the affine's voxel volume), its centroid in world RAS mm,
its voxel bounding box, its HU mean/std, and where it lies: the patient's lung side and zone.

Location comes from a lung label thresholded from the CT (:func:`lung_mask_from_ct` +
:func:`split_left_right`, sides from the affine) and its zone map (craniocaudal thirds of each lung in
world z), through the ONE geometry of findings, :class:`FindingsFromMask`: the case sentence, each
lesion's zones and the consistency check of the model's own sentences all come from the same
:func:`describe_lesions` call, so they cannot disagree. Lesion voxels outside the lung mask (predicted
masks leak over the pleura) take the zone of the nearest lung voxel. A lesion with under
``PULMONARY_FRACTION`` of its voxels in the lung mask is not pulmonary (bowel, muscle, a scan without
lungs): it is listed apart (``lesions_outside_lungs``, side about the body's centre) and never enters the
finding, the lung involvement or the sentence checks.
"""

from __future__ import annotations

from datetime import datetime, timezone

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..data.io import spacing_from_affine
from ..data.outputs import write_json, write_text  # noqa: F401  (re-exported: report writers)
from ..transforms.laterality import laterality_check, warning_lines as laterality_warnings
from ..transforms.labels import bounding_box, label_counts
from ..transforms.findings import Findings, FindingsFromMask, label_components
from ..transforms.lung_mask import lung_label_from_ct
from ..transforms.lung_regions import lung_zone_map
from ..vocab import LUNG_LABELS, PULMONARY_FRACTION, SIDES, severity_from_percent
from ..inference.geometry import voxel_volume_ml
from ..inference.predictor import Prediction
from ..metrics import consistency

# A zone is listed for a lesion when it holds at least this share of its voxels (FindingsFromMask's rule).
ZONE_FRACTION = 0.1


def lung_regions(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lung label (1 right, 2 left: the patient's, from the affine) and zone map (1..6) of a CT in HU."""
    lung = lung_label_from_ct(image, affine)
    zones = lung_zone_map(lung, affine) if lung.any() else np.zeros(lung.shape, dtype=np.uint8)
    return lung, zones


def _to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return np.asarray(ijk, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def label_lesions(mask: np.ndarray, min_voxels: int = 1, instances: np.ndarray | None = None,
                  affine: np.ndarray | None = None) -> tuple[np.ndarray, tuple[slice, ...] | None]:
    """The report's lesions (:func:`transforms.findings.label_components`: ids 1..N by size; ``instances``:
    that labelling, made already) over the mask's bounding box, and that box (None for an empty mask):
    previews stay cheap on big scans."""
    if instances is None:
        instances, _ = label_components(mask, min_voxels, affine)
    if not instances.any():
        return np.zeros((0, 0, 0), dtype=np.int32), None
    box = bounding_box(instances > 0)
    return instances[box], box


def describe_lesions(mask: np.ndarray, image: np.ndarray, affine: np.ndarray, lung: np.ndarray, zone_map: np.ndarray,
                     min_voxels: int = 1) -> Findings:
    """The one geometry of findings of a report: components, per-lesion zones and the case sentence
    (:class:`FindingsFromMask`); without lungs in the scan, its fallback (sides about the body)."""
    has_lung = bool(np.any(lung))
    return FindingsFromMask(min_size=min_voxels, zone_fraction=ZONE_FRACTION).describe(
        mask, affine=affine, zone_map=zone_map if has_lung else None, image=None if has_lung else image)


def lesion_statistics(
    mask: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    lung: np.ndarray,
    zone_map: np.ndarray,
    lesion_attributes=(),
    min_voxels: int = 1,
    findings: Findings | None = None,
    voxel_origin: tuple[int, int, int] = (0, 0, 0),
) -> tuple[list[dict], list[dict]]:
    """Per-lesion statistics (module docstring) and the attribute sets no lesion contains.

    ``lesion_attributes`` are :class:`LesionAttributes`; each goes to the component containing its
    anchor voxel. ``voxel_origin``: where this grid's first voxel lies in the image's (a box of it), added
    to every voxel index reported. Returns ``(lesions, unmatched_attributes)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    findings = findings or describe_lesions(mask, image, affine, lung, zone_map, min_voxels)
    if not findings.lesions:
        return [], [{"voxel": [int(v) + o for v, o in zip(a.voxel, voxel_origin)], "attributes": a.attributes,
                     "reason": "no lesion found"} for a in lesion_attributes]
    box = bounding_box(findings.instances > 0)
    offset = np.array([s.start + o for s, o in zip(box, voxel_origin)])
    instances, img, lung_c = findings.instances[box], np.asarray(image)[box], np.asarray(lung)[box]
    ids = np.arange(1, len(findings.lesions) + 1)
    sel = instances > 0
    lesion_ids = instances[sel]
    sizes = np.bincount(lesion_ids, minlength=len(ids) + 1)
    in_lung = np.bincount(lesion_ids, weights=(lung_c[sel] > 0), minlength=len(ids) + 1)[1:]
    centroids = np.array(ndimage.center_of_mass(np.ascontiguousarray(sel), np.ascontiguousarray(instances), ids)) + offset
    hu = img[sel].astype(np.float64)
    hu_mean = np.bincount(lesion_ids, weights=hu, minlength=len(ids) + 1)[1:] / sizes[1:]
    hu_std = np.sqrt(np.bincount(lesion_ids, weights=(hu - hu_mean[lesion_ids - 1]) ** 2, minlength=len(ids) + 1)[1:] / sizes[1:])
    boxes = ndimage.find_objects(instances)
    ml = voxel_volume_ml(affine)
    has_lung = bool(np.any(lung))

    lesions = []
    for i, found in enumerate(findings.lesions):
        counts = found.zone_voxels
        main_zone = max(counts, key=counts.get)
        lesions.append({
            "id": found.id,
            "voxels": found.voxels,
            "volume_ml": round(found.voxels * ml, 4),
            "centroid_ras_mm": [round(float(v), 2) for v in found.centroid],
            "centroid_voxel": [round(float(v), 2) for v in centroids[i]],
            "bbox_voxel": {"min": [int(s.start + o) for s, o in zip(boxes[i], offset)],
                           "max": [int(s.stop - 1 + o) for s, o in zip(boxes[i], offset)]},
            "hu_mean": round(float(hu_mean[i]), 1),
            "hu_std": round(float(hu_std[i]), 1),
            "side": main_zone.split("_")[1],
            # without lungs only the side is known (about the body's midline), not a lung zone
            "zone": main_zone if has_lung else None,
            "zones": {z: round(c / found.voxels, 3) for z, c in counts.items()} if has_lung else {},
            "in_lung_fraction": round(float(in_lung[i] / found.voxels), 3),
            "attributes": None,
        })

    unmatched = []
    for att in lesion_attributes:
        voxel = [int(round(float(v))) for v in att.voxel]
        lesion_id = 0
        if len(voxel) == 3 and all(0 <= v < n for v, n in zip(voxel, findings.instances.shape)):
            lesion_id = int(findings.instances[tuple(voxel)])
        if lesion_id == 0:
            reason = "voxel is in no lesion"
        elif lesions[lesion_id - 1]["attributes"] is not None:
            reason = f"lesion {lesion_id} already has attributes"
        else:
            lesions[lesion_id - 1]["attributes"] = att.attributes
            continue
        unmatched.append({"voxel": [v + o for v, o in zip(voxel, voxel_origin)], "attributes": att.attributes,
                          "reason": reason})
    return lesions, unmatched


def case_finding(findings: Findings, has_lung: bool, n_outside: int = 0) -> str:
    """The case sentence from the report's own lesion geometry (lung lesions only), for models that write none."""
    if not has_lung:
        return f"No lung found in the scan; {n_outside} lesion(s) outside the lungs are listed apart." if n_outside \
            else "No lung found in the scan."
    return findings.text


def split_pulmonary(mask: np.ndarray, lung: np.ndarray, min_voxels: int = 1, instances: np.ndarray | None = None,
                    affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(full instance map, pulmonary mask, outside mask)``: components (the one labelling,
    :func:`label_components`, or ``instances`` made by it already) with at least ``PULMONARY_FRACTION`` of
    their voxels in the lung, and the rest."""
    if instances is None:
        instances, n = label_components(mask, min_voxels, affine)
    else:
        n = int(instances.max())
    box = bounding_box(instances > 0)  # every lesion voxel: counts over the box are the volume's (label 0 aside)
    inside = instances[box]
    sizes = label_counts(inside, n)
    in_lung = label_counts(inside[np.asarray(lung)[box] > 0], n)
    pulmonary = in_lung >= PULMONARY_FRACTION * np.maximum(sizes, 1)
    pulmonary[0] = False
    outside = ~pulmonary
    outside[0] = False
    return instances, pulmonary[instances], outside[instances]


def _full_ids(lesions: list[dict], part: Findings, instances: np.ndarray) -> None:
    """Give the lesions of a part of the mask the ids of the whole mask's labelling (previews, evaluation).
    A part's components are whole components of the mask, so one pass over its voxels maps every id."""
    box = bounding_box(part.instances > 0)  # the part's voxels only, not the whole volume twice
    part_box, full_box = part.instances[box], instances[box]
    sel = part_box > 0
    full_id = np.zeros(len(part.lesions) + 1, dtype=np.int64)
    full_id[part_box[sel]] = full_box[sel]
    for les in lesions:
        les["id"] = int(full_id[les["id"]])


def geometry_of(shape, affine: np.ndarray) -> dict:
    """The report's ``geometry`` block: the image's grid."""
    return {"shape": [int(s) for s in shape], "spacing_mm": [round(s, 4) for s in spacing_from_affine(affine)],
            "axcodes": "".join(nib.aff2axcodes(affine)), "affine": np.round(affine, 6).tolist()}


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
    lung_source: str | None = None,
    instances: np.ndarray | None = None,
    voxel_origin: tuple[int, int, int] = (0, 0, 0),
) -> dict:
    """The JSON-serialisable report of one case. ``lung``/``zone_map`` are computed when not given;
    ``instances``: the mask's :func:`label_components` (min_voxels 1), when the caller wrote it already
    (the batch's ``<case>_lesions.nii.gz``): its ids are the report's. ``voxel_origin``: for a report made on a
    box of the image (run.report_box), where the box starts; voxel indices are reported in the image's grid."""
    affine = np.asarray(affine, dtype=np.float64)
    if lung is None or zone_map is None:
        lung, zone_map = lung_regions(image, affine)
    mask = np.asarray(prediction.mask)
    instances, pulmonary, outside = split_pulmonary(mask, lung, min_voxels, instances if min_voxels == 1 else None, affine)
    findings = describe_lesions(pulmonary, image, affine, lung, zone_map, min_voxels)
    lesions, unmatched = lesion_statistics(pulmonary, image, affine, lung, zone_map, prediction.lesion_attributes,
                                           min_voxels, findings, voxel_origin)
    _full_ids(lesions, findings, instances)
    no_lung = np.zeros(mask.shape, np.uint8)  # outside lesions: side about the body, no lung zone
    outside_found = describe_lesions(outside, image, affine, no_lung, no_lung, min_voxels)
    elsewhere, _ = lesion_statistics(outside, image, affine, no_lung, no_lung, (), min_voxels, outside_found, voxel_origin)
    _full_ids(elsewhere, outside_found, instances)
    for item in unmatched:
        voxel = tuple(v - o for v, o in zip(item["voxel"], voxel_origin))
        if len(voxel) == 3 and all(0 <= v < n for v, n in zip(voxel, mask.shape)) and outside[voxel]:
            item["reason"] = "its lesion lies outside the lungs"
    ml = voxel_volume_ml(affine)
    lung_ml = {side: round(float(np.count_nonzero(lung == LUNG_LABELS[side]) * ml), 2) for side in SIDES}
    lung_voxels = np.count_nonzero(lung)
    involved = np.count_nonzero(pulmonary & (lung > 0))
    percent = 100.0 * involved / lung_voxels if lung_voxels else None
    mask_finding = case_finding(findings, bool(lung_voxels), len(elsewhere))
    if prediction.case_finding and lesions:
        finding, source = prediction.case_finding, "model"
    elif prediction.case_finding:  # the model's sentence can only be about a lesion outside the lungs
        finding, source = mask_finding, "lesion geometry (the model's own sentence is kept as model_finding: no lung lesion)"
    else:
        finding, source = mask_finding, "lesion geometry (report.describe_lesions)"
    # the model's own sentences against its own mask: the case sentence (when it writes one) and any
    # text it was guided by or wrote, e.g. one per slice
    sentences = {"case finding": prediction.case_finding} if prediction.case_finding else {}
    sentences.update({f"guide text {i}": t for i, t in enumerate(prediction.extras.get("guide_texts", []))})
    consistent = consistency.check(prediction.slice_findings, findings, affine, sentences)
    consistent["lesions_outside_lungs"] = len(elsewhere)  # in the mask, not in any sentence
    sides_check = laterality_check(image, affine, lung)  # does the anatomy agree with the header's sides?
    return {
        "case_id": case_id,
        "input": input_path,
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "geometry": geometry_of(mask.shape, affine),
        "finding": finding,
        "finding_source": source,
        "mask_finding": mask_finding,
        "model_finding": prediction.case_finding,
        "consistency": consistent,
        "slice_findings": {str(k): v for k, v in sorted(prediction.slice_findings.items())},
        "n_lesions": len(lesions),
        "total_volume_ml": round(sum(les["volume_ml"] for les in lesions), 4),
        "lung": {
            "source": lung_source or "HU-threshold lung mask (transforms.lung_mask), sides from the affine",
            "volume_ml": lung_ml,
            "involvement_percent": None if percent is None else round(percent, 3),
            "severity": None if percent is None else severity_from_percent(percent),
        },
        "laterality": sides_check,
        "warnings": laterality_warnings(sides_check),
        "lesions": lesions,
        # never called pulmonary infection (PULMONARY_FRACTION): where they are, apart from the finding
        "lesions_outside_lungs": elsewhere,
        "n_lesions_outside_lungs": len(elsewhere),
        "volume_outside_lungs_ml": round(sum(les["volume_ml"] for les in elsewhere), 4),
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
        f"Lungs: right {lung['volume_ml']['right']:.0f} mL, left {lung['volume_ml']['left']:.0f} mL ({lung['source']})",
        "",
        f"FINDING: {report['finding']}",
    ]
    extras = report.get("extras") or {}
    for text in extras.get("guide_texts") or []:  # a text-guided model: the sentence that steered the mask
        lines.append(f"GUIDED BY: {text}" + (f" (from {extras['guide_text_source']})" if extras.get("guide_text_source") else ""))
    lines += [f"WARNING: {w}" for w in report.get("warnings") or []]
    lines += consistency.warning_lines(report.get("consistency") or {})
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
    if report.get("lesions_outside_lungs"):
        lines += ["", f"Outside the lungs (not called pulmonary infection): {report['n_lesions_outside_lungs']}, "
                      f"total {report['volume_outside_lungs_ml']:.2f} mL"]
        for les in report["lesions_outside_lungs"]:
            x, y, z = les["centroid_ras_mm"]
            lines.append(f"  #{les['id']}: patient's {les['side']} side, {les['volume_ml']:.2f} mL, centre x {x:.1f}, "
                         f"y {y:.1f}, z {z:.1f} mm (RAS), {100 * les['in_lung_fraction']:.0f} % in the lung mask")
    if report["slice_findings"]:
        lines += ["", "Per-slice findings (axial slice index):"]
        lines += [f"  {k}: {v}" for k, v in report["slice_findings"].items()]
    if report["unmatched_attributes"]:
        lines += ["", f"Attributes predicted outside every lesion: {len(report['unmatched_attributes'])}"]
    if report.get("model_training_summary"):
        lines += ["", f"About the model: {report['model_training_summary']}."]
    lines += ["", "Left/right are the patient's (from the image affine); zones are craniocaudal thirds of each lung.", ""]
    return "\n".join(lines)
