"""The project's one volume reader as a MONAI ``ImageReader``, so training (``LoadImaged``) and
inference (:func:`segreport.data.io.load_volume`) read images the same way: every check (NaN/inf voxels,
zero or negative spacing, dimensionality, DICOM slice gaps) and the DICOM LPS -> RAS conversion apply to
both.

    LoadImaged(keys=["image", "label"], reader=VolumeReader(), ensure_channel_first=True)

The array keeps the file's voxel order and the meta carries MONAI's keys (``affine``,
``original_affine``, ``spatial_shape``, ``space`` = RAS, ``filename_or_obj``), so ``Orientationd``,
``Spacingd`` and ``Invertd`` work as with MONAI's own readers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.data import ImageReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from .io import load_volume


class VolumeReader(ImageReader):
    """:func:`load_volume` behind MONAI's reader interface (NIfTI, DICOM series folders, .mha/.nrrd)."""

    def __init__(self, expect_ndim: int = 3, series_uid: str | None = None):
        super().__init__()
        self.expect_ndim, self.series_uid = expect_ndim, series_uid

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return True  # whatever load_volume reads; it names the file and the problem when it cannot

    def read(self, data: Sequence[str] | str, **kwargs):
        loaded = [load_volume(p, self.expect_ndim, self.series_uid) for p in ensure_tuple(data)]
        return loaded if len(loaded) > 1 else loaded[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        items = img if isinstance(img, list) else [img]
        arrays, meta = [], {}
        for array, affine, info in items:
            arrays.append(array)
            if not meta:
                meta = {**{k: v for k, v in info.items() if k != "filename"}, "filename_or_obj": info["filename"],
                        MetaKeys.AFFINE: affine.copy(), MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape), MetaKeys.SPACE: SpaceKeys.RAS,
                        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan")}
        if len(arrays) > 1:  # several files: stacked on a new first (channel) axis, as MONAI's readers do
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays), meta
        return arrays[0], meta


class LoadVolumed(LoadImaged):
    """``LoadImaged`` that always reads with :class:`VolumeReader` and lets its :class:`InputError`
    through. (Given a reader, MONAI's ``LoadImage`` still falls back to its other readers on failure and
    buries the real cause in a "cannot find a suitable reader" message.)"""

    def __init__(self, keys, expect_ndim: int = 3, **kwargs):
        self._volume_reader = VolumeReader(expect_ndim)
        super().__init__(keys, reader=self._volume_reader, **kwargs)

    def __call__(self, data, reader=None):
        return super().__call__(data, reader or self._volume_reader)
