"""The ROIs of a prompt session, and growing them for lesions larger than one ROI.

A promptable 3D model sees one fixed-size ROI. When its mask reaches a face of the ROI and the image
goes on beyond that face, the lesion probably does too. Only the clicked lesion counts: the mask's
components that hold a positive prompt. The session then adds the neighbouring ROI,
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
from scipy import ndimage


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
    anchors: list[np.ndarray] = field(default_factory=list)  # its positive prompts (ROI voxels), last decode
    prompts: tuple | None = None  # the clicks it was last decoded with: a click elsewhere leaves it as it is
    out: dict | None = None  # that decode's outputs
    on_input_grid: tuple | None = None  # its probability resampled to the input grid: (box, values)


def covers(tile: Tile, start: np.ndarray, size: Sequence[int]) -> bool:
    """Whether ``tile`` is (nearly) the ROI at ``start``: within a quarter ROI on every axis."""
    return bool(np.all(np.abs(tile.start - start) < np.asarray(size) // 4))


def clicked_mask(tile: Tile, threshold: float) -> torch.Tensor:
    """The part of ``tile``'s mask that is the clicked lesion: its components holding a positive prompt
    (a false positive elsewhere in the ROI must not pull the ROIs after it)."""
    mask = (tile.prob > threshold).cpu().numpy()
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    upper = np.asarray(mask.shape) - 1
    ids = {int(components[tuple(np.clip(np.rint(a).astype(int), 0, upper))]) for a in tile.anchors} - {0}
    return torch.from_numpy(np.isin(components, list(ids)) if ids else np.zeros_like(mask))


def growth_starts(tile: Tile, size: Sequence[int], volume_shape: Sequence[int], threshold: float) -> list[np.ndarray]:
    """Box starts of the neighbours ``tile``'s clicked lesion asks for: one per ROI face it touches, where
    the image goes on beyond that face (a face at the image border has nothing beyond it)."""
    mask = clicked_mask(tile, threshold)
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


def overlap_mask(tiles: Sequence[Tile], start: np.ndarray, size: Sequence[int], threshold: float) -> np.ndarray:
    """Where the ``tiles`` found the clicked lesion inside the ROI box at ``start`` (bool, the box's shape)."""
    size = np.asarray(size)
    out = np.zeros(tuple(int(s) for s in size), bool)
    for t in tiles:
        lo, hi = np.maximum(t.start, start), np.minimum(t.start + size, start + size)
        if np.any(hi <= lo):
            continue
        dst = tuple(slice(int(a), int(b)) for a, b in zip(lo - start, hi - start))
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo - t.start, hi - t.start))
        out[dst] |= clicked_mask(t, threshold).numpy()[src]
    return out
