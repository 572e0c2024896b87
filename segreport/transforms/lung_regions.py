"""Lung sides and the six lung zones, always computed in world coordinates through the affine.

Zones are craniocaudal thirds of EACH lung's world-z extent (RAS+: superior is +z), so a volume stored
inferior-first or with a permuted axis order gets the same zones. Zone maps hold 1..6 in
:data:`vocab.ZONES` order, 0 outside the lungs.

2D slices carry the 4x4 affine of their slice (a 3x3 in-plane affine from a PNG reader is accepted and
put at z = 0). An axial slice has no craniocaudal extent of its own: pass ``z_extent`` measured on its
volume (:func:`lung_z_extent`) or slice the volume's zone map instead.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from ..vocab import LEVELS, LUNG_LABELS, SIDES, ZONES
from .lung_mask import split_left_right
from .slicing import axial_axis

# TotalSegmentator v2 class ids of the lung lobes (left upper/lower; right upper/middle/lower).
TOTALSEG_LEFT_LOBES: tuple[int, ...] = (10, 11)
TOTALSEG_RIGHT_LOBES: tuple[int, ...] = (12, 13, 14)


def affine_of(img, affine=None) -> np.ndarray:
    """The 4x4 RAS+ affine of ``img``: ``affine`` if given, else the MetaTensor's (LPS meta converted)."""
    if affine is None:
        if not isinstance(img, MetaTensor):
            raise ValueError("no affine: pass affine= or a MetaTensor carrying one")
        affine = img.affine
        if str(img.meta.get("space", "RAS")).upper() == "LPS":
            affine = np.diag([-1.0, -1.0, 1.0, 1.0])[: len(affine), : len(affine)] @ np.asarray(affine)
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape == (3, 3):  # in-plane affine of a 2D image: world z unknown, put it at 0
        a4 = np.eye(4)
        a4[:2, :2], a4[:2, 3] = a[:2, :2], a[:2, 2]
        a = a4
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4 (or 3x3 for a 2D image), got shape {a.shape}")
    return a


def spatial_array(img) -> np.ndarray:
    """``img`` as a numpy spatial array (2D or 3D), dropping a leading size-1 channel axis (MONAI layout)."""
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim in (3, 4) and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D image (optionally channel-first), got shape {a.shape}")
    return a


def world_grid(shape: Sequence[int], affine: np.ndarray, axis: int) -> np.ndarray:
    """World coordinate ``axis`` (0 x, 1 y, 2 z) of every voxel centre, as a broadcast-built array."""
    out = np.full((1,) * len(shape), affine[axis, 3])
    for d, n in enumerate(shape):
        step = [1] * len(shape)
        step[d] = n
        out = out + affine[axis, d] * np.arange(n, dtype=np.float64).reshape(step)
    return out


def side_of_points(world_xyz, midline_x: float = 0.0) -> np.ndarray:
    """"left"/"right" (the patient's) for world points (N, 3): RAS+ patient left is -x of the midline."""
    x = np.asarray(world_xyz, dtype=np.float64).reshape(-1, 3)[:, 0]
    return np.where(x < midline_x, "left", "right")


def lung_label_from_lobes(seg, left=TOTALSEG_LEFT_LOBES, right=TOTALSEG_RIGHT_LOBES) -> np.ndarray:
    """Lung label (1 right, 2 left) from a lobe segmentation; defaults are TotalSegmentator v2 ids.

    Lobe names already carry the patient's side, so no affine is needed.
    """
    seg = spatial_array(seg)
    out = np.zeros(seg.shape, dtype=np.uint8)
    out[np.isin(seg, right)] = LUNG_LABELS["right"]
    out[np.isin(seg, left)] = LUNG_LABELS["left"]
    return out


def lung_label_from_mask(mask, affine) -> np.ndarray:
    """Lung label (1 right, 2 left) from a binary lung mask, sides from the affine.

    Uses :func:`lung_mask.split_left_right` (components by world-x centroid; merged lungs cut at the
    midline); 2D masks are treated as one-slice volumes.
    """
    m = spatial_array(mask) > 0
    a = affine_of(mask, affine)
    if m.ndim == 2:
        return split_left_right(m[..., None], a)[..., 0]
    return split_left_right(m, a)


def lung_z_extent(lung, affine) -> dict[str, tuple[float, float]]:
    """World-z (min, max) of each lung's voxel centres, keyed "left"/"right"; absent lungs are left out."""
    lung = spatial_array(lung)
    z = np.broadcast_to(world_grid(lung.shape, affine_of(lung, affine), 2), lung.shape)
    out = {}
    for side in SIDES:
        sel = lung == LUNG_LABELS[side]
        if sel.any():
            zs = z[sel]
            out[side] = (float(zs.min()), float(zs.max()))
    return out


def zone_codes(lung_values: np.ndarray, z: np.ndarray, extents: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Zone code (1..6) of points with lung label values (1 right, 2 left) at world heights ``z``.

    Each side is cut into thirds of ``extents[side]`` = (zmin, zmax); a side with no extent raises.
    """
    out = np.zeros(np.shape(lung_values), dtype=np.uint8)
    for side in SIDES:
        sel = lung_values == LUNG_LABELS[side]
        if not sel.any():
            continue
        if side not in extents:
            raise ValueError(f"no craniocaudal extent given for the {side} lung")
        lo, hi = (float(v) for v in extents[side])
        if hi - lo <= 1e-6:
            raise ValueError(
                f"the {side} lung has no craniocaudal extent here (an axial slice?): "
                "pass z_extent measured on its volume, or slice the volume's zone map"
            )
        level = np.clip(np.floor(len(LEVELS) * (hi - z[sel]) / (hi - lo)), 0, len(LEVELS) - 1).astype(int)
        codes = np.array([ZONES.index(f"{lv}_{side}") + 1 for lv in LEVELS], dtype=np.uint8)
        out[sel] = codes[level]
    return out


def lung_zone_map(lung, affine, z_extent: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """Zone map (uint8, 1..6 in :data:`vocab.ZONES` order, 0 outside) of a lung label (1 right, 2 left).

    Each lung is cut into world-z thirds of its own extent, or of ``z_extent[side]`` when given (a 2D
    slice judged against its volume). A lung with no z extent and none given raises ``ValueError``.
    """
    lung = spatial_array(lung)
    a = affine_of(lung, affine)
    extents = dict(z_extent) if z_extent is not None else lung_z_extent(lung, a)
    inside = lung > 0
    out = np.zeros(lung.shape, dtype=np.uint8)
    z = np.broadcast_to(world_grid(lung.shape, a, 2), lung.shape)[inside]
    out[inside] = zone_codes(lung[inside], z, extents)
    return out


def slice_levels(lung, affine) -> np.ndarray:
    """Each axial slice's level, in file order along the axial axis: the world z of its centre between
    the lowest (0) and highest (1) lung voxel centre of both lungs; NaN for slices outside that range
    (by more than half a slice) and for every slice when there is no lung label (1 right, 2 left)."""
    lung = spatial_array(lung)
    a = affine_of(lung, affine)
    axis = axial_axis(a)
    extents = lung_z_extent(lung, a).values()
    if not extents:
        return np.full(lung.shape[axis], np.nan)
    lo, hi = min(e[0] for e in extents), max(e[1] for e in extents)
    centre = (np.asarray(lung.shape, dtype=np.float64) - 1) / 2
    z = np.array([a[2, :3] @ np.where(np.arange(3) == axis, k, centre) + a[2, 3] for k in range(lung.shape[axis])])
    half = abs(a[2, axis]) / 2
    level = np.clip((z - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return np.where((z >= lo - half) & (z <= hi + half), level, np.nan)


def slice_zone_map(lung, level: float, affine) -> np.ndarray:
    """Zone map of one axial slice that comes without its volume (a PNG slice): sides from its binary
    lung mask through ``affine`` (:func:`split_left_right`), the level from ``level``, the slice's
    craniocaudal position in its lungs in [0, 1] (0 at the bases, 1 at the apices; for a slice series,
    ``(index + 0.5) / count``: an approximation that takes the series to span the lungs evenly)."""
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    a = np.array(affine, dtype=np.float64)
    a[2, 3] = float(level)  # the slice's world z, in units of its lungs' craniocaudal extent
    sides = split_left_right(spatial_array(lung)[..., None] > 0, a)[..., 0]
    return lung_zone_map(sides, a, {side: (0.0, 1.0) for side in SIDES})


class LungZones(Transform):
    """Lung label (1 right, 2 left; channel-first or not) -> zone map of the same layout and type.

    The affine comes from ``affine`` or the input MetaTensor; ``z_extent`` as in :func:`lung_zone_map`.
    """

    def __init__(self, z_extent: Mapping[str, Sequence[float]] | None = None):
        self.z_extent = z_extent

    def __call__(self, lung, affine=None):
        zones = lung_zone_map(lung, affine_of(lung, affine), self.z_extent)
        if np.ndim(lung) == zones.ndim + 1:  # keep the channel axis the input had
            zones = zones[None]
        return convert_to_dst_type(zones, dst=lung, dtype=np.uint8 if isinstance(lung, np.ndarray) else torch.uint8)[0]


class LungZonesd(MapTransform):
    """Dictionary version of :class:`LungZones`: writes ``output_keys`` (default ``"<key>_zones"``)."""

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        z_extent: Mapping[str, Sequence[float]] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys)) if output_keys else None
        self.zoner = LungZones(z_extent)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            out_key = self.output_keys[self.keys.index(key)] if self.output_keys else f"{key}_zones"
            meta = d.get(f"{key}_meta_dict", {})
            d[out_key] = self.zoner(d[key], None if isinstance(d[key], MetaTensor) else meta.get("affine"))
        return d
