"""Fixed-size ROI around the largest lesion (or a given centre), invertible back onto the full grid.

The crop box is recorded twice, as the same plain dict (``crop_info``):

* in MetaTensor ``applied_operations``, so MONAI ``Invertd`` / ``inverse()`` put predictions back;
* optionally in the item under ``box_key`` (dict transform), so a plain prediction array can be put
  back with :func:`paste_back` without carrying MetaTensors through a network.

``crop_info = {"box_start": [...], "box_end": [...], "orig_size": [...]}`` in voxel indices of the
input's spatial axes. The box always has exactly ``roi_size`` and may reach outside the image: those
parts were padded on the way in and are dropped on the way back.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import BorderPad, InvertibleTransform, MapTransform, SpatialCrop
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import PytorchPadMode, TraceKeys, convert_data_type, ensure_tuple_rep
from scipy import ndimage

from segreport.errors import InputError

ON_EMPTY = ("center", "raise")


def _source(x) -> str | None:
    """File an array came from, when MONAI recorded it (for error messages)."""
    return x.meta.get("filename_or_obj") if isinstance(x, MetaTensor) else None


def largest_lesion_center(label: NdarrayOrTensor, connectivity: int | None = None) -> tuple[int, ...] | None:
    """Centre (voxel index) of the bounding box of the largest connected lesion, or None if empty.

    ``label`` is channel-first (MONAI); every channel's non-zero voxels count as lesion.
    ``connectivity`` is scipy's: 1 = face neighbours, ``None`` = full (faces, edges, corners).
    The bounding-box centre, not the centroid, so a curved lesion is still centred in the ROI.
    Among equally large components the first in scan order wins.
    """
    fg = convert_data_type(label, np.ndarray)[0].astype(bool).any(axis=0)
    ndim = fg.ndim
    structure = ndimage.generate_binary_structure(ndim, ndim if connectivity is None else connectivity)
    components, n = ndimage.label(fg, structure=structure)
    if n == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (int(np.argmax(sizes)) + 1)
    start, end = generate_spatial_bounding_box(largest[None])
    return tuple(int((s + e) // 2) for s, e in zip(start, end))


def roi_box(center: Sequence[int], roi_size: Sequence[int], spatial_shape: Sequence[int]) -> dict:
    """``crop_info`` of a ``roi_size`` box with ``center`` at index ``roi_size // 2`` inside it."""
    start = [int(round(float(c))) - r // 2 for c, r in zip(center, roi_size)]
    return {
        "box_start": start,
        "box_end": [s + r for s, r in zip(start, roi_size)],
        "orig_size": [int(s) for s in spatial_shape],
    }


def _crop_then_pad(img: NdarrayOrTensor, start, end, shape, mode: str) -> NdarrayOrTensor:
    """Crop ``[start, end)`` of ``img`` (clipped to ``shape``) and pad what lay outside the image.

    MONAI's SpatialCrop/BorderPad move a MetaTensor's affine with the box; their own trace entries
    are switched off because the caller records one combined, self-contained entry instead.
    """
    inside_start = [max(0, s) for s in start]
    inside_end = [min(n, e) for n, e in zip(shape, end)]
    border = []
    for s, e, n in zip(start, end, shape):
        border += [max(0, -s), max(0, e - n)]
    cropper = SpatialCrop(roi_start=inside_start, roi_end=inside_end)
    padder = BorderPad(spatial_border=border, mode=mode)
    with cropper.trace_transform(False), padder.trace_transform(False):
        return padder(cropper(img))


def paste_back(pred_roi: NdarrayOrTensor, crop_info: Mapping, full_shape: Sequence[int] | None = None) -> NdarrayOrTensor:
    """Put a channel-first ROI prediction back on the full grid (zeros outside the ROI).

    ``crop_info`` comes from :class:`CropLargestLesion` (item ``box_key`` or the MetaTensor trace);
    ``full_shape`` (spatial) defaults to the recorded ``orig_size``. Parts of the ROI that were
    padding are dropped. The inverse of the crop is itself a pad-of-a-crop, so the same helper runs
    it with the box mirrored. Meant for plain predictions: a MetaTensor keeps its trace entries
    here, so for traced data use ``inverse``/``Invertd`` instead.
    """
    start, end = list(crop_info["box_start"]), list(crop_info["box_end"])
    shape = [int(s) for s in (full_shape if full_shape is not None else crop_info["orig_size"])]
    roi = [e - s for s, e in zip(start, end)]
    if list(pred_roi.shape[1:]) != roi:
        raise ValueError(f"prediction spatial shape {tuple(pred_roi.shape[1:])} != recorded ROI size {tuple(roi)}")
    # In ROI coordinates the full image spans [-start, -start + shape).
    back_start = [-s for s in start]
    back_end = [-s + n for s, n in zip(start, shape)]
    return _crop_then_pad(pred_roi, back_start, back_end, roi, PytorchPadMode.CONSTANT)


class CropLargestLesion(InvertibleTransform):
    """Crop a fixed ``roi_size`` box centred on the largest lesion of ``label`` (or on ``center``).

    Channel-first input, 2D or 3D. The box may reach past the image border (lesion near the edge, or
    ROI larger than the image): those parts are padded with ``mode`` (MONAI/PyTorch pad mode;
    "constant" pads zeros, so window intensities first or use "edge"/"replicate").
    A lesion larger than the ROI is cut by it; :func:`paste_back` then restores only the cropped part.

    Centre, in order of precedence: the ``center`` call argument (at inference: the user's first
    click), the largest lesion of ``label``, and when the label is empty ``on_empty``: "center"
    (image centre) or "raise" (:class:`~segreport.errors.InputError`).
    """

    backend = SpatialCrop.backend

    def __init__(self, roi_size: Sequence[int] | int, on_empty: str = "center", connectivity: int | None = None, mode: str = "constant"):
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, got {on_empty!r}")
        self.roi_size = roi_size
        self.on_empty = on_empty
        self.connectivity = connectivity
        self.mode = mode

    def compute_box(self, img: NdarrayOrTensor, label: NdarrayOrTensor | None = None, center: Sequence | None = None) -> dict:
        """``crop_info`` for ``img`` given a label and/or an explicit centre (see class docstring)."""
        shape = tuple(img.shape[1:])
        roi_size = ensure_tuple_rep(self.roi_size, len(shape))
        if center is not None:
            center = np.asarray(convert_data_type(center, np.ndarray)[0], dtype=float).reshape(-1)
            if center.size != len(shape):
                raise ValueError(f"center {center.tolist()} has {center.size} coordinates, image has {len(shape)} spatial dims")
        elif label is not None:
            if tuple(label.shape[1:]) != shape:
                raise InputError(_source(label), f"label spatial shape {tuple(label.shape[1:])} != image spatial shape {shape}")
            center = largest_lesion_center(label, self.connectivity)
        if center is None:
            if self.on_empty == "raise" or label is None:
                problem = "label has no lesion voxels" if label is not None else "no label and no center given"
                raise InputError(_source(label) or _source(img), f"{problem}: cannot place the lesion ROI")
            center = [n // 2 for n in shape]
        return roi_box(center, roi_size, shape)

    def __call__(
        self,
        img: NdarrayOrTensor,
        label: NdarrayOrTensor | None = None,
        center: Sequence | None = None,
        crop_info: Mapping | None = None,
        mode: str | None = None,
    ) -> NdarrayOrTensor:
        """Crop ``img``; pass ``crop_info`` to reuse a box already computed (same box for all keys)."""
        info = dict(crop_info) if crop_info is not None else self.compute_box(img, label, center)
        out = _crop_then_pad(img, info["box_start"], info["box_end"], info["orig_size"], mode or self.mode)
        if isinstance(out, MetaTensor):
            self.push_transform(out, orig_size=tuple(info["orig_size"]), extra_info=dict(info))
        return out

    def inverse(self, data: NdarrayOrTensor) -> NdarrayOrTensor:
        transform = self.pop_transform(data)
        return paste_back(data, transform[TraceKeys.EXTRA_INFO])


class CropLargestLesiond(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`CropLargestLesion`: one box, from ``label_key`` (or
    ``center_key``), applied to every key in ``keys``.

    ``center_key``: when the item holds it (not None) the ROI is centred there instead: a (D,)
    coordinate or (N, D) points, of which the first row (the user's first click) is used. With
    ``center_labels_key`` (e.g. "point_labels") only positive clicks (label 1) count, so padding
    rows (label -1) and negative clicks never place the ROI; no positive click -> ``label_key``.
    ``box_key``: where the plain ``crop_info`` is written for :func:`paste_back` (None: don't).
    ``mode``: pad mode, one per key or one for all (e.g. ``("edge", "constant")`` for image, label).
    """

    backend = CropLargestLesion.backend

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int] | int,
        label_key: str = "label",
        center_key: str | None = None,
        center_labels_key: str | None = None,
        box_key: str | None = "crop_box",
        on_empty: str = "center",
        connectivity: int | None = None,
        mode: Sequence[str] | str = "constant",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.center_key = center_key
        self.center_labels_key = center_labels_key
        self.box_key = box_key
        self.cropper = CropLargestLesion(roi_size, on_empty=on_empty, connectivity=connectivity)
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == []:  # every key missing and allow_missing_keys
            return d
        info = self.cropper.compute_box(d[first], d.get(self.label_key), self._center(d))
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper(d[key], crop_info=info, mode=mode)
        if self.box_key:
            d[self.box_key] = info
        return d

    def _center(self, d: Mapping) -> np.ndarray | None:
        """The first (positive) click of ``center_key``, or None to use the label."""
        if not self.center_key or d.get(self.center_key) is None:
            return None
        points = convert_data_type(d[self.center_key], np.ndarray)[0]
        if points.ndim == 1:
            return points
        if self.center_labels_key:
            points = points[convert_data_type(d[self.center_labels_key], np.ndarray)[0].reshape(-1) == 1]
        return points[0] if len(points) else None

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d
