"""A window of the lungs per training item: what the automatic mode's sliding windows mostly see.

The automatic mode (:mod:`segreport.inference.automatic`) runs the model with no click over the whole
lungs, and most of its windows hold no lesion. Trained only on windows near a lesion, the model never
sees most of what it is asked about there (vessels, fissures and hila away from any lesion), and its
false candidates were vessels. nnU-Net samples two thirds of its patches anywhere for the same reason.
So each training item can also carry one window of its lungs, at a place drawn once per item (seeded
by case and lesion, hence deterministic and cached by ``CacheDataset``):

* :class:`LungPointd` (original grid, HU): a random voxel of the CT's lung mask (the inference's own
  :func:`~segreport.transforms.lung_mask.lung_mask_from_ct`), as a world point;
* :class:`CropAtPointd` (model grid, after resampling): the image and the all-lesions mask cropped
  around that point into new keys. A lesion inside the window stays a target.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .crop import CropLargestLesion
from .lung_mask import lung_mask_from_ct

__all__ = ["LungPointd", "CropAtPointd", "LUNG_POINT"]

LUNG_POINT = "lung_point"  # item key: world coordinates of the lung window's centre


def _affine(x) -> np.ndarray:
    return np.asarray(x.affine if isinstance(x, MetaTensor) else torch.eye(4), dtype=np.float64)


class LungPointd(MapTransform):
    """Write ``point_key``: the world point (MONAI's affine space) of a random voxel of the lungs of
    ``keys`` (a CT in HU, channel first), drawn with a generator seeded by the item's ``case_id`` and
    ``lesion_id`` and ``seed``. Without lungs, the image's centre."""

    def __init__(self, keys: KeysCollection = "image", point_key: str = LUNG_POINT, seed: int = 0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.point_key, self.seed = point_key, int(seed)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            ct = np.asarray(d[key])[0]
            lung = np.argwhere(lung_mask_from_ct(ct))
            rng = np.random.default_rng(zlib.crc32(f"{d.get('case_id')}:{d.get('lesion_id')}:{self.seed}".encode()))
            ijk = lung[rng.integers(len(lung))] if len(lung) else (np.asarray(ct.shape) - 1) / 2
            d[self.point_key] = (_affine(d[key]) @ np.append(ijk, 1.0))[:3]
        return d


class CropAtPointd(MapTransform):
    """Crop ``keys`` to ``roi_size`` around the world point ``point_key`` into ``prefix + key`` (the
    originals stay: the lesion's own crop comes after). Parts outside the image are padded with 0,
    the window's minimum (air), as the lesion crop's."""

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], point_key: str = LUNG_POINT,
                 prefix: str = "lung_", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.cropper = CropLargestLesion(roi_size)
        self.point_key, self.prefix = point_key, prefix

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        first = self.first_key(d)
        if first == []:
            return d
        voxel = (np.linalg.inv(_affine(d[first])) @ np.append(d[self.point_key], 1.0))[:3]
        info = self.cropper.compute_box(d[first], center=voxel)
        for key in self.key_iterator(d):
            d[self.prefix + key] = self.cropper(d[key], crop_info=info)
        return d
