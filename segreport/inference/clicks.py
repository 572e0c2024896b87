"""The one parser of user clicks, wherever they come from: a ``points.json`` entry of a batch run, a
MONAI Label request (OHIF's ``points`` + ``point_labels``, 3D Slicer's ``foreground`` / ``background``)
or a call to the prompt session. Each click is three finite numbers (IJK voxel indices, or RAS mm with
``world``) and a label, 1 lesion or 0 background; with the image's shape every click must lie inside it.
A bad click is an :class:`InputError` naming where it came from and what is wrong with it."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np

from ..errors import InputError
from .geometry import map_points

__all__ = ["parse_clicks", "MAX_CLICKS"]

MAX_CLICKS = 256  # a person clicks tens of times; a request with thousands must not hold a server


def _coordinates(points: Any, what: str, source) -> np.ndarray:
    if points is None:
        return np.zeros((0, 3))
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if isinstance(points, (dict, str, bytes)) or not isinstance(points, (list, tuple)):
        raise InputError(source, f"{what} must be a list of [i, j, k], got {points!r}"[:300])
    for p in points:
        if (isinstance(p, np.ndarray) and p.shape == (3,)) or (
                isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(v, Real) and not isinstance(v, bool) for v in p)):
            continue
        raise InputError(source, f"{what}: each click is [i, j, k] (three numbers), got {p!r}"[:300])
    xyz = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(xyz)):
        raise InputError(source, f"{what}: coordinates must be finite, got {xyz[~np.isfinite(xyz).all(1)][0].tolist()}")
    return xyz


def parse_clicks(points: Any, labels: Any = None, *, world: bool = False, affine: np.ndarray | None = None,
                 shape: Sequence[int] | None = None, source: Any = None, what: str = "points") -> tuple[np.ndarray, list[int]]:
    """``(ijk (N, 3) float voxel coordinates, labels [0/1] * N)`` of the clicks ``points``.

    ``labels``: one 1 (lesion) or 0 (background) per click, default all 1. ``world``: the points are RAS mm,
    mapped through the inverse of ``affine``. ``shape``: the image's; a click that rounds to a voxel outside it
    is refused. ``source`` (a file, a request) and ``what`` name the input in the error."""
    xyz = _coordinates(points, what, source)
    if len(xyz) > MAX_CLICKS:
        raise InputError(source, f"{what}: {len(xyz)} clicks; at most {MAX_CLICKS}")
    labels = [1] * len(xyz) if labels is None else labels
    if (not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(xyz)
            or any(isinstance(v, bool) or v not in (0, 1) for v in labels)):
        raise InputError(source, f"{what}: labels must be one 1 (lesion) or 0 (background) per click: "
                                 f"{len(xyz)} clicks, labels {labels!r}"[:300])
    if world and affine is None:
        raise ValueError("world clicks need the image's affine")
    ijk = map_points(xyz, np.eye(4), affine) if world else xyz
    if shape is not None and len(ijk):
        idx = np.rint(ijk)
        outside = np.any((idx < 0) | (idx >= np.asarray(shape)[:3]), axis=1)
        if outside.any():
            k = int(np.argmax(outside))
            where = f"world point {xyz[k].tolist()} (voxel {np.round(ijk[k], 1).tolist()})" if world else f"point {xyz[k].tolist()}"
            prefix = "" if what == "click" else f"{what}: "
            raise InputError(source, f"{prefix}click {where} lies outside the image of shape {tuple(int(s) for s in shape)}")
    return ijk, [int(v) for v in labels]
