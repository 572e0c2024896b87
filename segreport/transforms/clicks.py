"""Simulated user clicks for interactive training and evaluation (seed 001, Sec. 2.3).

First click: inside the lesion, at the point farthest from its border (where an annotator would
click). Later clicks correct a prediction: the larger error region (by voxel count) is chosen,
false negatives (``gt & ~pred``) give a positive click, false positives (``~gt & pred``) a negative
one, again at the point farthest from that region's border. The paper samples "a point from these
regions" at random; the distance-transform placement (with optional ``jitter``) keeps clicks off
the thin edges of an error, where a real expert would not click either.

Coordinates are voxel indices of the spatial axes (channel excluded), 2D or 3D.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_data_type
from scipy import ndimage

PAD_LABEL = -1  # label of padding rows in ``point_labels`` (SAM convention)


def _as_rng(rng) -> np.random.Generator | np.random.RandomState:
    return rng if isinstance(rng, (np.random.Generator, np.random.RandomState)) else np.random.default_rng(rng)


def _mask(x: NdarrayOrTensor, threshold: float) -> np.ndarray:
    return convert_data_type(x, np.ndarray)[0] > threshold


def interior_distance(region: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distance of each region voxel to the nearest non-region voxel; the image edge counts as
    border too (zero-padding), so a region cut by the field of view is not clicked at the edge."""
    padded = np.pad(region.astype(bool), 1)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)
    return dist[(slice(1, -1),) * region.ndim]


def sample_click(
    gt: NdarrayOrTensor,
    pred: NdarrayOrTensor | None = None,
    rng=None,
    jitter: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> tuple[tuple[int, ...], int] | None:
    """One simulated click ``(voxel index, label)`` on spatial (channel-less) masks; label 1 = positive.

    Without ``pred``: a positive click inside ``gt``. With ``pred`` (binary or probability, > 0.5):
    a click in the larger of the false-negative (label 1) / false-positive (label 0) regions, ties
    going to false negatives. The click is at the maximal interior distance (``spacing`` in mm for
    anisotropic voxels); ``jitter`` in [0, 1) widens the candidates to voxels within that fraction of
    the maximum, one drawn with ``rng`` (a numpy Generator/RandomState or a seed). With ``jitter`` 0,
    exact ties go to the tied voxel nearest their centroid: in a lesion two slices thick every voxel
    is one voxel from the background, and a random tie would put the "most interior" click on its rim.

    Returns None when there is nothing to click: an empty ``gt`` without ``pred``, or a perfect
    ``pred``. Callers decide what that means (:class:`SimulateClicksd` adds no point).
    """
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    gt_ = _mask(gt, 0)
    if pred is None:
        region, label = gt_, 1
    else:
        pred_ = _mask(pred, 0.5)
        if pred_.shape != gt_.shape:
            raise ValueError(f"prediction shape {pred_.shape} != ground truth shape {gt_.shape}")
        fn, fp = gt_ & ~pred_, ~gt_ & pred_
        region, label = (fn, 1) if fn.sum() >= fp.sum() else (fp, 0)
    if not region.any():
        return None
    dist = interior_distance(region, spacing)
    candidates = np.argwhere(dist >= dist.max() * (1.0 - jitter))
    if jitter == 0.0 and len(candidates) > 1:
        scale = np.ones(candidates.shape[1]) if spacing is None else np.asarray(spacing, dtype=float)
        d2 = (((candidates - candidates.mean(0)) * scale) ** 2).sum(1)
        pick = candidates[int(np.argmin(d2))]  # first in scan order among equally central voxels
    else:
        pick = candidates[int(_as_rng(rng).choice(len(candidates)))]
    return tuple(int(c) for c in pick), label


class ClickSimulator(Randomizable, Transform):
    """Array version: channel-first ``gt`` (and ``pred``) -> ``(point (D,), label)`` or None.

    Channels are merged (any non-zero). ``spacing`` None uses a MetaTensor's pixdim (voxel units
    for plain arrays). See :func:`sample_click`.
    """

    def __init__(self, jitter: float = 0.0, spacing: Sequence[float] | None = None, seed: int | None = 0):
        self.jitter = jitter
        self.spacing = spacing
        self.set_random_state(seed)

    def __call__(self, gt: NdarrayOrTensor, pred: NdarrayOrTensor | None = None) -> tuple[np.ndarray, int] | None:
        spacing = self.spacing
        if spacing is None and isinstance(gt, MetaTensor):
            spacing = [float(s) for s in gt.pixdim[: gt.ndim - 1]]  # a 2D MetaTensor still has a 4x4 affine
        gt_ = _mask(gt, 0).any(axis=0)
        pred_ = None if pred is None else _mask(pred, 0.5).any(axis=0)
        click = sample_click(gt_, pred_, self.R, self.jitter, spacing)
        return None if click is None else (np.asarray(click[0], dtype=np.int64), click[1])


class SimulateClicksd(Randomizable, MapTransform):
    """Add one simulated click to an item's ``points`` (N x D, int64) and ``point_labels`` (N).

    ``keys`` are ground-truth masks (the first present one is used). Without ``pred_key`` in the
    item the click is the initial positive one; with it, a correction click is appended to the
    points already in the item (padding rows, label -1, are dropped first), so calling it once per
    round of an interactive training loop builds up the click history. With ``max_points`` the
    output is padded with zero coordinates and label -1 to a fixed length (needed for batching);
    more clicks than that raise. Empty ground truth and no prediction: no click is added (only
    padding), which prompt encoders read as "no prompt".
    """

    def __init__(
        self,
        keys="label",
        pred_key: str = "pred",
        points_key: str = "points",
        labels_key: str = "point_labels",
        max_points: int | None = None,
        jitter: float = 0.0,
        spacing: Sequence[float] | None = None,
        seed: int | None = 0,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.simulator = ClickSimulator(jitter, spacing, seed)
        self.pred_key = pred_key
        self.points_key = points_key
        self.labels_key = labels_key
        self.max_points = max_points

    def set_random_state(self, seed=None, state=None):
        # the draw happens in the array simulator: seed that one
        self.simulator.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            return d
        gt = d[key]
        ndim = gt.ndim - 1
        points = np.zeros((0, ndim), dtype=np.int64)
        labels = np.zeros((0,), dtype=np.int64)
        if d.get(self.points_key) is not None:
            if d.get(self.labels_key) is None:
                raise ValueError(f"item has {self.points_key!r} but no {self.labels_key!r}")
            points = convert_data_type(d[self.points_key], np.ndarray)[0].astype(np.int64).reshape(-1, ndim)
            labels = convert_data_type(d[self.labels_key], np.ndarray)[0].astype(np.int64).reshape(-1)
            keep = labels != PAD_LABEL
            points, labels = points[keep], labels[keep]
        click = self.simulator(gt, d.get(self.pred_key))
        if click is not None:
            points = np.concatenate([points, click[0][None]])
            labels = np.append(labels, click[1])
        if self.max_points is not None:
            n_pad = self.max_points - len(labels)
            if n_pad < 0:
                raise ValueError(f"{len(labels)} clicks exceed max_points={self.max_points}")
            points = np.concatenate([points, np.zeros((n_pad, ndim), dtype=np.int64)])
            labels = np.append(labels, np.full(n_pad, PAD_LABEL, dtype=np.int64))
        d[self.points_key] = torch.as_tensor(points)
        d[self.labels_key] = torch.as_tensor(labels)
        return d
