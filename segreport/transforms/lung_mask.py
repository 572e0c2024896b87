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
from .labels import bounding_box, label_counts, label_in_memory_order

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
    # computed with the axial axis first: a NIfTI volume (Fortran order) is then C-contiguous, so each
    # axial slice is one block of memory and labelling walks it in order (3x faster than a strided view)
    return _lung_mask_zyx(ct.transpose(2, 1, 0), threshold, min_fraction, max_air_fraction).transpose(2, 1, 0)


def _lung_mask_zyx(ct: np.ndarray, threshold: float, min_fraction: float, max_air_fraction: float) -> np.ndarray:
    """:func:`lung_mask_from_ct` of a volume whose FIRST axis is the axial one (the steps are symmetric in
    the axes, so the mask is the same as computed in any axis order)."""
    low = np.ascontiguousarray(ct < threshold)
    labels, n = ndimage.label(low)
    if n == 0:
        return np.zeros(ct.shape, dtype=bool)
    # outside air touches the in-plane border of the field of view. Lungs may too, in a crop or a tight
    # field of view, but there they are lung-dense (about -850 HU), not air: a border-touching component
    # is outside air only when its border voxels are (median below OUTSIDE_AIR_HU)
    border_ct, border_ids = _border_values(ct, low, labels)
    found = np.unique(border_ids)
    border_median = ndimage.median(border_ct, border_ids, index=found) if border_ids.size else []
    outside = [c for c, m in zip(found, np.atleast_1d(border_median)) if m < OUTSIDE_AIR_HU]
    sizes = label_counts(labels, n)[1:]
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= min_fraction * ct.size
    keep[outside] = False
    air = label_counts(labels[ct < -980], n)[1:]
    keep[1:] &= air <= max_air_fraction * np.maximum(sizes, 1)
    mask = keep[labels]
    if not mask.any():
        return mask
    # fill holes per axial slice (vessels, dense lesions), then smooth the outline a little; inside the
    # mask's bounding box + 3 voxels, which gives the whole volume's answer: outside the box every voxel is
    # background connected to the slice's border (no hole), and the closing (2 dilations, then 2 erosions)
    # reaches 2 voxels beyond the mask
    box = bounding_box(mask, 3)
    inner, ct_box = mask[box], ct[box]
    for k in range(inner.shape[0]):
        inner[k] = ndimage.binary_fill_holes(inner[k])
    mask[box] = ndimage.binary_closing(inner, iterations=2) & (inner | (ct_box < 200))
    return mask


def _border_values(ct: np.ndarray, low: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU and label of every low voxel on the in-plane border of an axial-first volume (the first and last
    row and column of each axial slice), each voxel once."""
    faces = [np.s_[:, :, [0, -1]], np.s_[:, [0, -1], 1:-1]]  # the corners belong to the first face only
    keep = [low[f] for f in faces]
    return (np.concatenate([ct[f][k] for f, k in zip(faces, keep)]),
            np.concatenate([labels[f][k] for f, k in zip(faces, keep)]))


def split_left_right(lung: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label a binary lung mask 1 = right lung, 2 = left lung (the PATIENT's, from the affine).

    Each connected component goes to the side of its world-x centroid relative to the mask's centre
    (RAS+: larger x is toward the patient's RIGHT). Lungs touching at the midline are cut at the centre plane.
    Worked slice by slice inside the lungs' bounding box, so no list of every lung voxel is ever made.
    """
    lung = np.asarray(lung).astype(bool)
    out = np.zeros(lung.shape, dtype=np.uint8)
    if not lung.any():
        return out
    box = bounding_box(lung, 1)
    sub, offset = lung[box], [b.start for b in box]
    labels, n = label_in_memory_order(sub)
    sizes = label_counts(labels, n)
    row = np.asarray(affine, dtype=np.float64)[0]

    def slice_x(k: int, sel: np.ndarray) -> np.ndarray:  # world x of the selected voxels of slice k
        ii, jj = np.nonzero(sel)
        idx = np.stack([ii + offset[0], jj + offset[1], np.full(ii.shape, k + offset[2])], axis=1)
        return idx @ row[:3] + row[3]

    sums, lo, hi = np.zeros(n + 1), np.inf, -np.inf
    for k in range(sub.shape[2]):
        sel = sub[:, :, k]
        if sel.any():
            x = slice_x(k, sel)
            lo, hi = min(lo, x.min()), max(hi, x.max())
            sums += np.bincount(labels[:, :, k][sel], weights=x, minlength=n + 1)
    midline = 0.5 * (lo + hi)
    side = np.where(sums / np.maximum(sizes, 1) > midline, LUNG_LABELS["right"], LUNG_LABELS["left"]).astype(np.uint8)
    side[0] = 0
    result = side[labels]
    for c in np.flatnonzero(sizes[1:] > 0.6 * sizes[1:].sum()) + 1:  # one merged component: split it voxel-wise at the midline
        for k in range(sub.shape[2]):
            sel = labels[:, :, k] == c
            if sel.any():
                result[:, :, k][sel] = np.where(slice_x(k, sel) > midline, LUNG_LABELS["right"], LUNG_LABELS["left"])
    out[box] = result
    return out


def lung_label_from_ct(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The lung label (1 right, 2 left) of a CT in HU: :func:`lung_mask_from_ct` split by :func:`split_left_right`."""
    return split_left_right(lung_mask_from_ct(image, affine), affine)
