"""A report rebuilt on the box that holds the mask, for a click in the MONAI Label app.

A further click changes only the mask, so what belongs to the image is computed once per image
(:class:`ImageContext`: lung volumes, the laterality check, the nearest lung zone of every voxel in the
lungs' box) and the lesion part of :func:`~segreport.run.report.build_report` is run on the mask's bounding
box. The report is the full one's, field for field (``tests/test_report_box.py``). A mask whose report needs
more of the image takes the full path (:func:`report_on_box` returns None): lesions outside the lungs (their
side is about the whole body), per-slice sentences, lesion voxels beyond the lungs' box.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..inference.geometry import voxel_volume_ml
from ..inference.predictor import LesionAttributes, Prediction
from ..transforms.findings import nearest_zone_voxel
from ..transforms.labels import bounding_box
from ..transforms.laterality import laterality_check, warning_lines as laterality_warnings
from ..vocab import LUNG_LABELS, SIDES, severity_from_percent
from .report import build_report, geometry_of


NEAREST_MARGIN = 32  # voxels around the lungs' box whose nearest zone is kept (a click's mask rarely leaks further)


@dataclass
class ImageContext:
    """What a report needs of the image alone."""

    lung_ml: dict
    lung_voxels: int
    laterality: dict
    zones_box: tuple[slice, ...] | None  # the lung zones' bounding box and a margin
    nearest_zone: np.ndarray | None  # over zones_box: the code of each voxel's nearest zone voxel


def image_context(image: np.ndarray, affine: np.ndarray, lung: np.ndarray, zone_map: np.ndarray) -> ImageContext:
    """Computed once per image. The nearest zone is the distance transform over a box holding the zones, as the
    full report computes it for lesion voxels over the pleura, over the box of the zones and those voxels
    (:meth:`FindingsFromMask._lesion_zones`: either box gives the whole volume's answer)."""
    affine = np.asarray(affine, dtype=np.float64)
    ml = voxel_volume_ml(affine)
    lung = np.asarray(lung)
    lung_ml = {side: round(float(np.count_nonzero(lung == LUNG_LABELS[side]) * ml), 2) for side in SIDES}
    zmap = np.asarray(zone_map).astype(np.uint8)
    box = None
    if zmap.any():  # the zones' box and NEAREST_MARGIN voxels around it: predicted masks leak over the lungs
        box = tuple(slice(max(b.start - NEAREST_MARGIN, 0), min(b.stop + NEAREST_MARGIN, n))
                    for b, n in zip(bounding_box(zmap > 0), zmap.shape))
    nearest = None if box is None else zmap[box][tuple(nearest_zone_voxel(zmap[box], affine))]
    return ImageContext(lung_ml, int(np.count_nonzero(lung)), laterality_check(image, affine, lung), box, nearest)


def report_on_box(prediction: Prediction, image: np.ndarray, affine: np.ndarray, context: ImageContext, *,
                  lung: np.ndarray, zone_map: np.ndarray, instances: np.ndarray | None = None, **kwargs) -> dict | None:
    """:func:`build_report` of the whole image, computed on the mask's box; None when the full path is needed."""
    mask = np.asarray(prediction.mask)
    if prediction.slice_findings or not mask.any() or not context.lung_voxels:
        return None
    affine = np.asarray(affine, dtype=np.float64)
    # one voxel around the mask: a box one voxel thick would read as a channel axis (transforms.findings)
    box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(bounding_box(mask > 0), mask.shape))
    start = np.array([s.start for s in box])
    zones = np.asarray(zone_map)[box].astype(np.uint8)  # a copy: lesion voxels over the pleura get their nearest zone
    over = (zones == 0) & (mask[box] > 0)
    if over.any():
        full = np.stack(np.nonzero(over), 1) + start
        if context.zones_box is None:
            return None
        zb = context.zones_box
        lo, hi = np.array([s.start for s in zb]), np.array([s.stop for s in zb])
        if not np.all((full >= lo) & (full < hi)):  # beyond the kept margin: the full report computes it
            return None
        zones[over] = context.nearest_zone[tuple((full - lo).T)]
    box_affine = affine.copy()
    box_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    anchored = [LesionAttributes(tuple(int(round(float(v))) - int(s) for v, s in zip(a.voxel, start)), a.attributes)
                for a in prediction.lesion_attributes]
    report = build_report(replace(prediction, mask=mask[box], lesion_attributes=anchored), np.asarray(image)[box],
                          box_affine, lung=np.asarray(lung)[box], zone_map=zones,
                          instances=None if instances is None else instances[box],
                          voxel_origin=tuple(int(s) for s in start), **kwargs)
    if report["lesions_outside_lungs"]:
        return None
    report["geometry"] = geometry_of(mask.shape, affine)
    involved = np.count_nonzero((mask[box] > 0) & (np.asarray(lung)[box] > 0))
    percent = 100.0 * involved / context.lung_voxels
    report["lung"].update(volume_ml=context.lung_ml, involvement_percent=round(percent, 3),
                          severity=severity_from_percent(percent))
    report["laterality"], report["warnings"] = context.laterality, laterality_warnings(context.laterality)
    return report
