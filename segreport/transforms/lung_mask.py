"""Lung mask from a CT in Hounsfield units, for inference on scans that come without one.

Reports name lung sides and zones, which needs a lung mask; real scans arrive without one. Air-filled
lung is the one large low-density region inside the body, so a threshold + connected components gives
a usable mask in milliseconds (the classical approach, e.g. Hu et al. 2001). No library ships this for
HU volumes (lungmask/TotalSegmentator need downloaded weights), hence the few lines here.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..vocab import LUNG_LABELS

OUTSIDE_AIR_HU = -950.0  # air outside the body; aerated lung is about -850 HU


def lung_mask_from_ct(
    ct_hu: np.ndarray, affine: np.ndarray | None = None, threshold: float = -400.0, min_fraction: float = 0.002,
    max_air_fraction: float = 0.15,
) -> np.ndarray:
    """Binary lung mask of a 3D CT in HU (on the CT's own grid): low-density components not connected to
    the air outside the body. With ``affine`` the volume is first put in its closest canonical (RAS)
    axis order, so the mask does not depend on how the file stores its voxels (z first, flipped ...);
    without one, the last array axis must be the axial one.

    Components smaller than ``min_fraction`` of the volume are dropped, and so is gas (bowel, stomach):
    parenchyma with its vessels and partial volume is rarely pure air, so a component with more than
    ``max_air_fraction`` of its voxels below -980 HU is taken for gas (checked on the real
    TotalSegmentator CT, whose colon gas this rejects while keeping both lung bases). Holes
    (vessels, lesions such as consolidation) are filled slice by slice so dense lesions stay "in lung".
    """
    ct = np.asarray(ct_hu)
    if ct.ndim != 3:
        raise ValueError(f"lung_mask_from_ct expects a 3D volume, got shape {ct.shape}")
    if affine is not None:  # the border and slice-wise steps below need axial slices along the last axis
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

        to_ras = io_orientation(np.asarray(affine))
        mask = lung_mask_from_ct(apply_orientation(ct, to_ras), None, threshold, min_fraction, max_air_fraction)
        return apply_orientation(mask, ornt_transform(axcodes2ornt("RAS"), to_ras)).astype(bool)
    low = ct < threshold
    labels, n = ndimage.label(low)
    if n == 0:
        return np.zeros(ct.shape, dtype=bool)
    # outside air touches the in-plane border of the field of view. Lungs may too, in a crop or a tight
    # field of view, but there they are lung-dense (about -850 HU), not air: a border-touching component
    # is outside air only when its border voxels are (median below OUTSIDE_AIR_HU)
    border = np.zeros(ct.shape, dtype=bool)
    border[[0, -1], :, :] = True
    border[:, [0, -1], :] = True
    touching = border & low
    ids = labels[touching]
    border_median = ndimage.median(ct[touching], ids, index=np.unique(ids)) if ids.size else []
    outside = [c for c, m in zip(np.unique(ids), np.atleast_1d(border_median)) if m < OUTSIDE_AIR_HU]
    sizes = ndimage.sum(low, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= min_fraction * ct.size
    keep[outside] = False
    air = ndimage.sum(ct < -980, labels, index=np.arange(1, n + 1))
    keep[1:] &= air <= max_air_fraction * np.maximum(sizes, 1)
    mask = keep[labels]
    # fill holes per axial slice (vessels, dense lesions), then smooth the outline a little
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return ndimage.binary_closing(mask, iterations=2) & (mask | (ct < 200))


def split_left_right(lung: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label a binary lung mask 1 = right lung, 2 = left lung (the PATIENT's, from the affine).

    Each connected component goes to the side of its world-x centroid relative to the mask's centre
    (RAS+: larger x is toward the patient's RIGHT). Lungs touching at the midline are cut at the centre plane.
    """
    lung = np.asarray(lung).astype(bool)
    out = np.zeros(lung.shape, dtype=np.uint8)
    if not lung.any():
        return out
    idx = np.argwhere(lung)
    world_x = idx @ np.asarray(affine)[0, :3] + affine[0, 3]
    midline = 0.5 * (world_x.min() + world_x.max())
    labels, n = ndimage.label(lung)
    comp_x = ndimage.mean(world_x, labels[lung], index=np.arange(1, n + 1))
    comp_sizes = ndimage.sum(lung, labels, index=np.arange(1, n + 1))
    for c, (cx, size) in enumerate(zip(comp_x, comp_sizes), start=1):
        if size > 0.6 * lung.sum():  # one merged component: split it voxel-wise at the midline
            sel = labels[lung] == c
            sides = np.where(world_x[sel] > midline, LUNG_LABELS["right"], LUNG_LABELS["left"])
            pts = idx[sel]
            out[pts[:, 0], pts[:, 1], pts[:, 2]] = sides
        else:
            out[labels == c] = LUNG_LABELS["right"] if cx > midline else LUNG_LABELS["left"]
    return out


def lung_label_from_ct(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The lung label (1 right, 2 left) of a CT in HU: :func:`lung_mask_from_ct` split by :func:`split_left_right`."""
    return split_left_right(lung_mask_from_ct(image, affine), affine)
