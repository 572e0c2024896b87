"""Post-processing of predicted masks, shared by every model: the minimum lesion size."""

from __future__ import annotations

import math

import numpy as np

from .findings import label_components


def min_lesion_voxels(affine: np.ndarray, min_ml: float) -> int:
    """The fewest voxels whose volume reaches ``min_ml`` millilitres on this grid (at least 1)."""
    voxel_ml = abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0
    if min_ml <= 0 or voxel_ml <= 0:
        return 1
    k = max(1, math.ceil(min_ml / voxel_ml))
    while k > 1 and (k - 1) * voxel_ml >= min_ml:  # exact at the boundary, whatever the division rounded
        k -= 1
    while k * voxel_ml < min_ml:
        k += 1
    return k


def lesion_instances(mask: np.ndarray, affine: np.ndarray, min_ml: float) -> tuple[np.ndarray, int]:
    """``(instance map, N)``: the connected components (full connectivity) of at least ``min_ml``
    millilitres, numbered 1..N by size (:func:`~segreport.transforms.findings.label_components`, the one
    labelling every report and preview uses), in one labelling of the mask.

    Slice-wise and sliding-window models leave specks that would each count as an "infected area"; a
    volume threshold means the same at any spacing, which a voxel count does not."""
    return label_components(np.asarray(mask, dtype=bool), min_lesion_voxels(affine, min_ml), affine)


def remove_small_lesions(mask: np.ndarray, affine: np.ndarray, min_ml: float) -> np.ndarray:
    """``mask`` (uint8) without its components smaller than ``min_ml`` millilitres."""
    mask = np.asarray(mask, dtype=bool)
    if min_ml <= 0 or not mask.any():
        return mask.astype(np.uint8)
    return (lesion_instances(mask, affine, min_ml)[0] > 0).astype(np.uint8)
