"""3D volume <-> 2D axial slices, keeping the case id so slice predictions go back to their volume.

"Axial" is decided from the affine (the voxel axis most aligned with world z), never assumed to be
the last axis: a volume stored sagittal-first or transposed is sliced the same way.

Slices are plain arrays/tensors (a volume's MetaTensor affine does not describe a 2D slice); each
slice item carries ``slice_axis``, ``slice_index`` and the volume ``affine`` so world positions
(e.g. the patient's left/right) can still be worked out from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import Dataset, MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_data_type
from nibabel.orientations import io_orientation
from tqdm import tqdm

from segreport.errors import InputError

MODES = ("all", "lesion", "mix")


def axial_axis(affine) -> int:
    """Spatial axis (0-based, channel excluded) whose voxel direction is closest to world z.

    Uses nibabel's ``io_orientation``, which assigns each voxel axis a distinct world axis, so
    oblique affines still give one answer.
    """
    aff = convert_data_type(affine, np.ndarray)[0].astype(float)
    if aff.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine of a 3D volume, got shape {aff.shape}")
    ornt = io_orientation(aff)
    axes = np.flatnonzero(ornt[:, 0] == 2)
    if axes.size != 1:
        raise ValueError(f"affine has no axis along world z (degenerate?):\n{aff}")
    return int(axes[0])


def _affine(img: NdarrayOrTensor, meta: Mapping | None = None, affine=None, source=None) -> np.ndarray:
    """The affine given explicitly, else from a MetaTensor, else from a ``<key>_meta_dict``."""
    if affine is None and isinstance(img, MetaTensor):
        affine = img.affine
    if affine is None and meta is not None:
        affine = meta.get("affine")
    if affine is None:
        raise InputError(source, "no affine: cannot tell which axis is axial (load with LoadImaged or pass affine=)")
    return convert_data_type(affine, np.ndarray)[0].astype(float)


def plane_index(axis: int, index: int) -> tuple:
    """The index of slice ``index`` along ``axis`` (a view when used on an array; ``np.take`` would copy
    the whole volume first: 0.7 s on a 512x512x300 CT)."""
    return (slice(None),) * axis + (index,)


def _take(x: NdarrayOrTensor, axis: int, index: int) -> NdarrayOrTensor:
    """Channel-first slice ``index`` along spatial ``axis``, as a plain array/tensor (a copy)."""
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        return x.select(axis + 1, index).clone()
    return np.asarray(x)[plane_index(axis + 1, index)].copy()


def select_slices(label: NdarrayOrTensor | None, axis: int, n_slices: int, mode: str, neg_ratio: float, rng) -> list[int]:
    """Indices to keep, ascending. "all": every slice; "lesion": slices with a label voxel;
    "mix": every lesion slice plus ``round(neg_ratio * n_lesion)`` lesion-free ones drawn with ``rng``
    (so a volume without lesions gives no slices in "mix" mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "all":
        return list(range(n_slices))
    if label is None:
        raise ValueError(f"mode {mode!r} needs a label to tell lesion slices from the others")
    lab = convert_data_type(label, np.ndarray)[0]
    other_axes = tuple(a for a in range(lab.ndim) if a != axis + 1)
    positive = lab.astype(bool).any(axis=other_axes)
    pos = np.flatnonzero(positive)
    if mode == "lesion":
        return pos.tolist()
    neg = np.flatnonzero(~positive)
    k = min(len(neg), int(round(neg_ratio * len(pos))))
    chosen = rng.choice(neg, size=k, replace=False) if k else np.array([], dtype=int)
    return sorted(pos.tolist() + chosen.tolist())


class VolumeToSlices(Randomizable, Transform):
    """Channel-first 3D volume -> list of ``(slice_index, channel-first 2D slice)`` along the axial axis.

    ``mode`` "all" | "lesion" | "mix" (see :func:`select_slices`; "lesion"/"mix" need ``label``).
    ``axis`` overrides the affine (spatial axis index); otherwise the affine is required.
    """

    def __init__(self, mode: str = "all", neg_ratio: float = 1.0, axis: int | None = None, seed: int | None = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.neg_ratio = neg_ratio
        self.axis = axis
        self.set_random_state(seed)

    def indices(self, img: NdarrayOrTensor, label: NdarrayOrTensor | None = None, affine=None) -> tuple[int, list[int]]:
        """(axial spatial axis, slice indices to keep)."""
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first 3D volume (C, X, Y, Z), got shape {tuple(img.shape)}")
        axis = self.axis if self.axis is not None else axial_axis(_affine(img, affine=affine))
        return axis, select_slices(label, axis, img.shape[axis + 1], self.mode, self.neg_ratio, self.R)

    def __call__(self, img: NdarrayOrTensor, label: NdarrayOrTensor | None = None, affine=None) -> list[tuple[int, NdarrayOrTensor]]:
        axis, keep = self.indices(img, label, affine)
        return [(i, _take(img, axis, i)) for i in keep]


class VolumeToSlicesd(Randomizable, MapTransform):
    """Volume item -> list of per-slice items (MONAI-style: a transform may return a list).

    Each slice item holds the sliced ``keys`` (channel-first 2D), ``case_id``, ``slice_index``,
    ``slice_axis``, the volume ``affine`` (4x4), the ``copy_keys`` values, and, when ``finding_fn`` is
    given, ``text_key`` = ``finding_fn(slice_item)`` (a per-slice finding sentence; it sees every
    sliced key, e.g. ``lung``, and the affine). The volume's own text is not copied: it describes the
    volume, not the slice. The affine comes from the first key's MetaTensor or ``<key>_meta_dict``.
    The case id comes from ``case_id_key``, else the image file name.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        mode: str = "all",
        neg_ratio: float = 1.0,
        seed: int | None = 0,
        finding_fn: Callable[[dict], str] | None = None,
        text_key: str = "text",
        case_id_key: str = "case_id",
        copy_keys: Sequence[str] = ("source",),
        axis: int | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.slicer = VolumeToSlices(mode, neg_ratio, axis, seed)
        self.label_key = label_key
        self.finding_fn = finding_fn
        self.text_key = text_key
        self.case_id_key = case_id_key
        self.copy_keys = tuple(copy_keys)

    def set_random_state(self, seed=None, state=None):
        # the "mix" draw happens in the array slicer: seed that one
        self.slicer.set_random_state(seed, state)
        return self

    def _case_id(self, d: Mapping, first: Hashable) -> str:
        if d.get(self.case_id_key) is not None:
            return str(d[self.case_id_key])
        img = d[first]
        meta = img.meta if isinstance(img, MetaTensor) else d.get(f"{first}_meta_dict", {})
        path = meta.get("filename_or_obj")
        if not path:
            raise InputError(None, f"volume item has no {self.case_id_key!r} and no file name to derive one from")
        name = os.path.basename(str(path))
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
            if name.endswith(ext):
                return name[: -len(ext)]
        return name

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> list[dict]:
        d = dict(data)
        first = self.first_key(d)
        if first == []:
            return []
        img = d[first]
        case_id = self._case_id(d, first)
        src = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else case_id
        affine = _affine(img, d.get(f"{first}_meta_dict"), source=src)
        axis, keep = self.slicer.indices(img, d.get(self.label_key), affine)
        present = list(self.key_iterator(d))
        for key in present:
            if tuple(d[key].shape[1:]) != tuple(img.shape[1:]):
                raise InputError(src, f"{key!r} spatial shape {tuple(d[key].shape[1:])} != {first!r} {tuple(img.shape[1:])}")
        items = []
        for i in keep:
            item = {key: _take(d[key], axis, i) for key in present}
            item.update(case_id=case_id, slice_index=i, slice_axis=axis, affine=affine)
            item.update({k: d[k] for k in self.copy_keys if k in d})
            if self.finding_fn is not None:
                item[self.text_key] = self.finding_fn(item)
            items.append(item)
        return items


def stack_slices(
    preds: Sequence[NdarrayOrTensor],
    like: NdarrayOrTensor,
    slice_indices: Sequence[int] | None = None,
    axis: int | None = None,
    affine=None,
    fill: float = 0,
) -> NdarrayOrTensor:
    """Channel-first 2D slice predictions -> one channel-first 3D array on ``like``'s grid.

    ``slice_indices`` says where each prediction goes (default: 0..len-1, i.e. every slice in
    order); slices without a prediction hold ``fill``. The axial axis is found as when slicing
    (``axis`` or the affine of ``like``/``affine``). Torch predictions give a tensor; when ``like``
    is a MetaTensor the result is one with ``like``'s meta (affine, applied operations), ready for
    ``Invertd``/``SaveImage``.
    """
    if axis is None:
        axis = axial_axis(_affine(like, affine=affine))
    spatial = tuple(like.shape[1:])
    slice_shape = spatial[:axis] + spatial[axis + 1 :]
    indices = list(range(len(preds))) if slice_indices is None else [int(i) for i in slice_indices]
    if len(indices) != len(preds):
        raise ValueError(f"{len(preds)} predictions but {len(indices)} slice indices")
    if not preds:
        raise ValueError("no slice predictions to stack")
    use_torch = isinstance(preds[0], torch.Tensor)
    as_cf = [p if p.ndim == len(slice_shape) + 1 else p[None] for p in preds]  # allow (H, W) predictions
    n_channels = as_cf[0].shape[0]
    if use_torch:
        out = torch.full((n_channels, *spatial), fill, dtype=as_cf[0].dtype, device=as_cf[0].device)
    else:
        out = np.full((n_channels, *spatial), fill, dtype=np.asarray(as_cf[0]).dtype)
    for i, p in zip(indices, as_cf):
        if tuple(p.shape) != (n_channels, *slice_shape):
            raise ValueError(f"slice {i}: prediction shape {tuple(p.shape)} != expected {(n_channels, *slice_shape)}")
        if not 0 <= i < spatial[axis]:
            raise ValueError(f"slice index {i} outside 0..{spatial[axis] - 1}")
        out[plane_index(axis + 1, i)] = p.as_tensor() if isinstance(p, MetaTensor) else p
    if use_torch and isinstance(like, MetaTensor):
        out = MetaTensor(out).copy_meta_from(like)
    return out


class SliceDataset(Dataset):
    """MONAI ``Dataset`` of axial slices cut from a list of volume items, once, at construction.

    ``load`` (e.g. ``Compose([LoadImaged, EnsureChannelFirstd, HUWindowd])``) turns each datalist
    entry into arrays first; ``transform`` then runs on every slice item at ``__getitem__``.
    The other arguments are :class:`VolumeToSlicesd`'s. Holds every selected slice in memory: meant
    for 2D training sets, not for whole-cohort inference (slice volume by volume there).
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        load: Callable | None = None,
        transform: Callable | None = None,
        progress: bool = False,
        **slicer_kwargs,
    ):
        slicer = VolumeToSlicesd(**slicer_kwargs)
        slices = []
        for item in tqdm(data, desc="slicing volumes", disable=not progress):
            slices.extend(slicer(load(item) if load is not None else item))
        super().__init__(slices, transform)
