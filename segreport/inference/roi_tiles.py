"""The ROIs of a prompt session, and growing them for lesions larger than one ROI.

A promptable 3D model sees one fixed-size ROI. When its mask reaches a face of the ROI and the image
goes on beyond that face, the lesion probably does too. The session then adds the neighbouring ROI,
shifted by three quarters of the ROI across that face (the two overlap by a quarter). It encodes that
ROI once and decodes it with the clicks inside it plus one simulated positive click at the most
interior voxel of what the other ROIs already found there (the model is trained on clicks, not on a
partial mask from another ROI). This repeats until no mask reaches such a face, or ``max_rois`` ROIs
exist: the bound. Every ROI keeps its cached embedding, so a further click still reruns only the
prompt side, once per ROI.

All ROIs are crops of the same pre-processed volume, so they overlap by whole voxels; on the original
grid their probabilities merge by the maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Tile:
    """One ROI: its box start in the pre-processed volume's voxels (negative where it is padding), its
    voxel -> RAS affine, its cached embedding, the last decode's logits (the next dense prompt), its
    last probability (D, H, W) and the simulated clicks that seeded it (ROI voxels)."""

    start: np.ndarray
    affine: np.ndarray
    embedding: Any
    prev_logits: torch.Tensor | None = None
    prob: torch.Tensor | None = None
    seed_points: list[np.ndarray] = field(default_factory=list)


def covers(tile: Tile, start: np.ndarray, size: Sequence[int]) -> bool:
    """Whether ``tile`` is (nearly) the ROI at ``start``: within a quarter ROI on every axis."""
    return bool(np.all(np.abs(tile.start - start) < np.asarray(size) // 4))


def growth_starts(tile: Tile, size: Sequence[int], volume_shape: Sequence[int], threshold: float) -> list[np.ndarray]:
    """Box starts of the neighbours ``tile``'s mask asks for: one per ROI face its mask touches, where the
    image goes on beyond that face (a face at the image border has nothing beyond it)."""
    mask = tile.prob > threshold
    starts = []
    for axis in range(3):
        for step, index in ((-1, 0), (1, -1)):
            if not bool(mask.select(axis, index).any()):
                continue
            if (step < 0 and tile.start[axis] <= 0) or (step > 0 and tile.start[axis] + size[axis] >= volume_shape[axis]):
                continue
            start = tile.start.copy()
            start[axis] += step * (size[axis] - size[axis] // 4)  # a quarter overlap: the face's context
            starts.append(start)
    return starts


def overlap_probability(tiles: Sequence[Tile], start: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """The maximum probability the ``tiles`` give inside the ROI box at ``start`` (0 where none reaches)."""
    size = np.asarray(size)
    out = torch.zeros(tuple(int(s) for s in size))
    for t in tiles:
        lo, hi = np.maximum(t.start, start), np.minimum(t.start + size, start + size)
        if np.any(hi <= lo):
            continue
        dst = tuple(slice(int(a), int(b)) for a, b in zip(lo - start, hi - start))
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo - t.start, hi - t.start))
        out[dst] = torch.maximum(out[dst], t.prob[src].float().cpu())
    return out
