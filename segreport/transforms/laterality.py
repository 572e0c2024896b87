"""Does the scan look mirrored? An anatomical check of left and right.

No header field can tell that a file's left and right were swapped (LPS data labelled RAS, a wrong
export): every side in the report would then be wrong. Anatomy can tell. The liver, the largest
soft-tissue organ, fills the right upper abdomen; on the left lie the spleen and the stomach (mostly
air and fluid). So in the slab just below the lowest lung voxel (below the diaphragm, under the heart),
soft tissue to the patient's right of the body's midline outweighs that to its left. The sides come
from the affine, exactly as the report's; a ratio below :data:`MIRRORED_BELOW` says the header's left
is the patient's right.

The lung volume ratio (the right lung is usually the larger) was measured and not used: a real cropped
CT here has the right lung 13 % smaller than the left (docs/results.md).
A scan that ends at the lung bases, or has no lung in the mask, is "not checked".
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

SLAB_MM = 60.0  # how far below the lowest lung voxel the liver is sought
SOFT_TISSUE_HU = (20.0, 180.0)  # liver, spleen, muscle (not fat, air or bone)
BODY_HU = -300.0
MIRRORED_BELOW = 0.8  # right/left soft tissue under this: the scan looks mirrored
CONSISTENT_ABOVE = 1.25


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The array in RAS+ voxel order (nibabel's closest canonical): axis 0 runs towards the patient's
    right (+x), axis 2 towards superior (+z)."""
    return apply_orientation(np.asarray(array), io_orientation(affine))


def laterality_check(image: np.ndarray, affine: np.ndarray, lung: np.ndarray | None) -> dict:
    """``{"verdict": "consistent" | "looks mirrored" | "inconclusive" | "not checked", "reason", and
    (when checked) "soft_tissue_right_left_ratio", "slab_mm"}``."""
    if lung is None or not np.any(lung):
        return {"verdict": "not checked", "reason": "no lung in the lung mask"}
    ct, lungs = _canonical(image, affine), _canonical(np.asarray(lung) > 0, affine)
    axial = int(np.flatnonzero(io_orientation(affine)[:, 0] == 2)[0])  # the file axis that became axis 2
    step_z = float(np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, axial]))
    lowest = int(np.flatnonzero(lungs.any(axis=(0, 1)))[0])
    n = int(round(SLAB_MM / step_z))
    slab = ct[:, :, max(0, lowest - n):lowest]
    if slab.shape[2] * step_z < SLAB_MM / 3:
        covered = slab.shape[2] * step_z
        return {"verdict": "not checked",
                "reason": f"the scan ends {covered:.0f} mm below the lung bases (the check needs {SLAB_MM / 3:.0f})"}
    body = slab > BODY_HU
    soft = (slab >= SOFT_TISSUE_HU[0]) & (slab <= SOFT_TISSUE_HU[1])
    x = np.arange(slab.shape[0], dtype=np.float64)[:, None]
    right = left = 0.0
    for k in range(slab.shape[2]):  # each slice cut at its own body midline
        if not body[:, :, k].any():
            continue
        columns = body[:, :, k].sum(axis=1)
        midline = float((columns * x[:, 0]).sum() / columns.sum())
        per_x = soft[:, :, k].sum(axis=1)
        right += float(per_x[x[:, 0] > midline].sum())  # +x: the patient's right in RAS+
        left += float(per_x[x[:, 0] < midline].sum())
    if right + left == 0:
        return {"verdict": "not checked", "reason": "no soft tissue below the lung bases"}
    ratio = right / max(left, 1.0)
    verdict = ("looks mirrored" if ratio < MIRRORED_BELOW else "consistent" if ratio > CONSISTENT_ABOVE
               else "inconclusive")
    return {"verdict": verdict, "reason": "soft tissue (the liver) right vs left of the midline below the lung bases",
            "soft_tissue_right_left_ratio": round(ratio, 3), "slab_mm": round(slab.shape[2] * step_z, 1)}


def warning_lines(check: dict) -> list[str]:
    """The report's warning when the scan looks mirrored."""
    if check.get("verdict") != "looks mirrored":
        return []
    more = 1 / check["soft_tissue_right_left_ratio"]
    return [f"the scan looks mirrored: below the lungs there is {more:.1f}x more soft tissue on the patient's LEFT "
            "than on the right, where the liver should be. Every side in this report comes from the header: check "
            "that left and right are not swapped (e.g. LPS data labelled RAS)"]
