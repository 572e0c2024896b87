"""Every way a volume can be stored: the 48 axis orders and flips, each with its correct affine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np


def storage_orders(array: np.ndarray, affine: np.ndarray) -> Iterator[tuple[tuple, tuple, np.ndarray, np.ndarray]]:
    """``(axis order, flips, stored array, its affine)`` for the 6 axis orders x 8 flips of ``array``: the
    same voxels in the same world places, stored another way."""
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            stored = array.transpose(perm)
            index = np.zeros((4, 4))  # new voxel index -> original voxel index
            index[3, 3] = 1
            for new_axis, old_axis in enumerate(perm):
                n = array.shape[old_axis]
                index[old_axis, new_axis] = -1 if flips[new_axis] else 1
                index[old_axis, 3] = n - 1 if flips[new_axis] else 0
            flipped = [d for d in range(3) if flips[d]]
            stored = np.flip(stored, flipped) if flipped else stored
            yield perm, flips, np.ascontiguousarray(stored), affine @ index


def restore(stored: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """An array stored as :func:`storage_orders` gave it, back in the original voxel order."""
    flipped = [d for d in range(3) if flips[d]]
    back = np.flip(stored, flipped) if flipped else stored
    return back.transpose(np.argsort(perm))
