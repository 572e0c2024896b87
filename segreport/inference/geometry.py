"""Voxel <-> world <-> ROI geometry for promptable 3D models, and where to look when nobody clicked.

Clicks arrive as IJK voxels (or RAS mm) of the ORIGINAL image and are carried into a ROI through affines
only (original -> world -> ROI voxel), so orientation, resampling and cropping are never re-derived by
hand; masks go back the same way (:func:`roi_to_original`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from scipy import ndimage

from ..transforms.clicks import interior_distance
from ..transforms.labels import bounding_box
from ..transforms.lung_mask import lung_mask_from_ct

LESION_DENSITY_HU = -500.0  # zero-click ROI: lesions are denser than aerated lung (-850) but GGO reaches -600..-300
_FULL_3D = ndimage.generate_binary_structure(3, 3)  # same connectivity as CropLargestLesion's default


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in mL, from its voxel -> world (mm) affine."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def box_affine(affine: np.ndarray, box: Sequence[slice]) -> np.ndarray:
    """The voxel -> world affine of the crop ``box`` of an image with ``affine``."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = (out @ np.r_[[float(b.start) for b in box], 1.0])[:3]
    return out


def as_affine(affine) -> np.ndarray:
    return np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)


def map_points(points: np.ndarray, src_affine, dst_affine) -> np.ndarray:
    """(N, 3) voxel coordinates of one grid -> voxel coordinates of another, through world (RAS mm)."""
    pts = np.c_[np.asarray(points, dtype=np.float64).reshape(-1, 3), np.ones(len(np.asarray(points).reshape(-1, 3)))]
    return (np.linalg.inv(as_affine(dst_affine)) @ as_affine(src_affine) @ pts.T).T[:, :3]


def roi_to_original(roi_prob: torch.Tensor | np.ndarray, roi_affine, orig_affine, orig_shape: Sequence[int]) -> np.ndarray:
    """A ROI map (D, H, W) back on the original grid (zeros outside the ROI), float32.

    Equivalent to ``paste_back`` into the resampled volume followed by inverting the orientation
    and resampling (checked against MONAI's ``Compose.inverse`` in the tests), but restricted to the
    ROI's footprint on the original grid: a click then costs O(ROI) instead of resampling the whole
    volume, which is what keeps a new click fast on a 512×512×300 scan. Bilinear, so threshold the
    result (probabilities) rather than a hard mask. :func:`roi_to_original_box` gives the footprint alone.
    """
    out = np.zeros(tuple(int(n) for n in orig_shape), dtype=np.float32)
    box, values = roi_to_original_box(roi_prob, roi_affine, orig_affine, orig_shape)
    if box is not None:
        out[box] = values
    return out


def roi_to_original_box(roi_prob, roi_affine, orig_affine, orig_shape: Sequence[int]) -> tuple[tuple[slice, ...] | None, np.ndarray | None]:
    """:func:`roi_to_original` as ``(box, values)``: the ROI's footprint on the original grid (slices) and the
    map there, float32; ``(None, None)`` when the ROI lies outside the image. No whole-volume array: what the
    prompt session merges its ROIs with on a 512×512×300 scan (315 MB per float32 volume)."""
    roi = torch.as_tensor(np.asarray(roi_prob, dtype=np.float32) if not isinstance(roi_prob, torch.Tensor) else roi_prob)
    roi = roi.detach().float().cpu()
    orig_affine, roi_affine = as_affine(orig_affine), as_affine(roi_affine)
    shape = np.asarray(orig_shape, dtype=int)
    r = np.asarray(roi.shape)
    corners = np.array([[a, b, c] for a in (-0.5, r[0] - 0.5) for b in (-0.5, r[1] - 0.5) for c in (-0.5, r[2] - 0.5)])
    ijk = map_points(corners, roi_affine, orig_affine)
    lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        return None, None
    sub_affine = orig_affine.copy()
    sub_affine[:3, 3] = (orig_affine @ np.r_[lo, 1.0])[:3]
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros")(
        MetaTensor(roi[None], affine=torch.as_tensor(roi_affine)),
        dst_affine=torch.as_tensor(sub_affine),
        spatial_size=tuple(int(n) for n in hi - lo),
    )
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), np.asarray(resampled[0].detach().cpu(), dtype=np.float32)


def auto_roi_center(ct_hu: np.ndarray, lung: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Where to put the ROI when nobody clicked: ``(IJK centre on the input grid, how it was found)``.

    A coarse chest heuristic: inside the (hole-filled) lung mask less a 2-voxel rim (partial volume
    with the chest wall), voxels denser than ``LESION_DENSITY_HU`` (-500 HU) after a morphological
    opening (drops vessels and fissures) are lesion candidates; the ROI goes to the centre of the
    largest candidate component. Without one, to the centre of the lungs' bounding box; without
    lungs (not a chest scan), to the image centre. ``lung``: a lung mask or label of ``ct_hu`` already
    made (any non-zero is lung); by default thresholded from the CT.
    """
    ct = np.asarray(ct_hu)
    lung = lung_mask_from_ct(ct) if lung is None else np.asarray(lung) > 0
    if lung.any():
        core = ndimage.binary_erosion(lung, iterations=2)
        candidates = ndimage.binary_opening(core & (ct > LESION_DENSITY_HU), iterations=1)
        components, n = ndimage.label(candidates, structure=_FULL_3D)
        if n:
            largest = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
            idx = np.argwhere(largest)
            return (idx.min(0) + idx.max(0)) / 2.0, "largest lesion-density component in the lungs"
        idx = np.argwhere(lung)
        return (idx.min(0) + idx.max(0)) / 2.0, "centre of the lungs (no lesion-density component)"
    return (np.asarray(ct.shape) - 1) / 2.0, "image centre (no lungs found)"


def interior_voxel(mask: np.ndarray, near: Sequence[float] | None = None) -> tuple[int, int, int] | None:
    """A voxel well inside the predicted lesion: the most interior voxel of the component containing
    ``near`` (or, when ``near`` is in none, of the largest component); None for an empty mask. Only the
    mask's bounding box is labelled: a click's mask is a small part of the image."""
    outer = bounding_box(mask)
    components, n = ndimage.label(mask[outer], structure=_FULL_3D)
    if n == 0:
        return None
    comp = 0
    if near is not None:
        idx = tuple(int(round(float(v))) - b.start for v, b in zip(near, outer))
        if all(0 <= i < s for i, s in zip(idx, components.shape)):
            comp = int(components[idx])
    if comp == 0:
        comp = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    region = components == comp
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    dist = interior_distance(region[box])
    local = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(o.start + s.start + i) for o, s, i in zip(outer, box, local))
