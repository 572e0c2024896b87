"""Post-processing of predicted masks, shared by every model."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def remove_small_lesions(mask: np.ndarray, affine: np.ndarray, min_ml: float) -> np.ndarray:
    """Drop connected components (full connectivity) smaller than ``min_ml`` millilitres.

    Slice-wise and sliding-window models leave specks that would each count as an "infected area"; a
    volume threshold means the same at any spacing, which a voxel count does not. (MONAI's
    ``RemoveSmallObjects(by_measure=True)`` does this too but needs scikit-image, not installed here.)
    """
    mask = np.asarray(mask, dtype=bool)
    if min_ml <= 0 or not mask.any():
        return mask.astype(np.uint8)
    voxel_ml = abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0
    labels, n = ndimage.label(mask, np.ones((3,) * mask.ndim))
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml >= min_ml
    keep[0] = False
    return keep[labels].astype(np.uint8)
