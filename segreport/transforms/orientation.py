"""The one display orientation every 2D path uses, whatever a file's voxel order.

2D models see axial slices in **radiological display**: rows run anterior -> posterior (anterior at the
top), columns run patient right -> left (the patient's right on the image's left), as MosMedData+ PNGs
and every PACS viewer show them. In MONAI/nibabel axis codes that is a volume reoriented to
``DISPLAY_AXCODES = "PLS"`` (axis 0 grows posteriorly, axis 1 toward the patient's left, axis 2
superiorly), sliced along its last axis.

The same functions serve the phantom's LViT export, slicing volumes for training and slice-wise
inference, so a model trained on one storage order sees the same anatomy on any other. They use
MONAI's ``Orientation`` (not hand-written flips) and its inverse, so predictions go back onto the
file's own grid exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

DISPLAY_AXCODES = "PLS"


# one instance: MONAI's inverse checks that the recorded operation came from this very transform
_ORIENTATION = Orientation(axcodes=DISPLAY_AXCODES, labels=None)


def _orientation() -> Orientation:
    return _ORIENTATION


def to_display(volume: np.ndarray | torch.Tensor, affine) -> MetaTensor:
    """A channel-first volume ``(C, X, Y, Z)`` in file voxel order -> ``(C, rows, cols, slices)`` in the
    display orientation, as a MetaTensor that remembers the reorientation (for :func:`from_display`)."""
    data = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
    if data.ndim != 4:
        raise ValueError(f"expected a channel-first 3D volume (C, X, Y, Z), got shape {tuple(data.shape)}")
    img = MetaTensor(data, affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))
    return _orientation()(img)


def from_display(data: np.ndarray | torch.Tensor, like: MetaTensor) -> np.ndarray:
    """Channel-first data on ``like``'s display grid (``like`` = a :func:`to_display` result) -> the
    same data on the file's own voxel grid (exact: a permutation and flips)."""
    t = torch.as_tensor(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
    if tuple(t.shape[1:]) != tuple(like.shape[1:]):
        raise ValueError(f"data of spatial shape {tuple(t.shape[1:])} is not on the display grid {tuple(like.shape[1:])}")
    out = MetaTensor(t, affine=like.affine, applied_operations=[dict(op) for op in like.applied_operations])
    return np.asarray(_orientation().inverse(out).as_tensor())


def display_to_file_index(like: MetaTensor, file_affine, axial_axis: int) -> np.ndarray:
    """For each display slice k, the index of the same axial slice along ``axial_axis`` of the file grid
    (slice findings and PNG names keep the file's own numbering)."""
    n = like.shape[-1]
    ijk = np.c_[np.zeros((n, 2)), np.arange(n), np.ones(n)]
    world = np.asarray(like.affine, dtype=np.float64) @ ijk.T
    file_ijk = np.linalg.inv(np.asarray(file_affine, dtype=np.float64)) @ world
    return np.rint(file_ijk[axial_axis]).astype(int)


def display_slices(volume: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray]:
    """A 3D array (file voxel order) -> ``(slices, file_index)``: ``slices`` is ``(n, rows, cols)`` in
    display orientation, ``file_index[k]`` the file's axial index of slice k."""
    from .slicing import axial_axis

    shown = to_display(np.asarray(volume)[None], affine)
    slices = np.moveaxis(np.asarray(shown[0].as_tensor()), -1, 0)
    return slices, display_to_file_index(shown, affine, axial_axis(affine))



# a 2D slice stored in display order (rows, columns) has no file affine of its own: the one its display
# convention implies (unit pixels, z = 0). "neurological": patient left on the image's left.
DISPLAY_CONVENTIONS = {"radiological": "PLS", "neurological": "PRS"}


def display_affine(convention: str = "radiological") -> np.ndarray:
    """The 4x4 affine (RAS+ mm, unit pixels) of a slice stored as ``(rows, columns[, 1])`` in a display
    convention, so its sides are read through an affine like every other image's."""
    from nibabel.orientations import axcodes2ornt

    if convention not in DISPLAY_CONVENTIONS:
        raise ValueError(f"unknown display convention {convention!r}; use one of {sorted(DISPLAY_CONVENTIONS)}")
    affine = np.eye(4)
    affine[:3, :3] = 0
    for array_axis, (ras_axis, direction) in enumerate(axcodes2ornt(DISPLAY_CONVENTIONS[convention])):
        affine[int(ras_axis), array_axis] = direction
    return affine
