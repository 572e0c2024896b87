"""Is this a CT in Hounsfield units? Checked per case before any model sees it.

A lung-lesion model given an MR volume, a label map, an 8-bit screenshot or a constant volume still
"finds" lesions and writes a confident sentence. These checks refuse such input with the reason, so a
batch run records it for that case and goes on; ``allow_non_ct`` (``--allow-non-ct``) lets a user who
knows better through. The rules (documented in the README's failure table):

* **not constant**: a single value is no image;
* **not label-like**: at most ``MAX_LABEL_VALUES`` distinct integer values is a mask or label map;
* **not 8-bit display data**: stored as (u)int8, or every value within 0..255, is a windowed picture,
  not HU;
* **in HU**: a CT holds air or lung (values at or below ``AIR_MAX_HU`` = -500) and soft tissue or
  denser (at or above ``TISSUE_MIN_HU`` = -100) and nothing below ``HU_MIN`` = -2000 (padding values
  such as -3024 are allowed up to -3100, the common scanner fill); MR and PET volumes have no negative
  values at all;
* **sane spacing**: every voxel size within ``SPACING_MM`` = 0.05..30 mm (the affine is the geometry:
  a 1e6 mm voxel would make a lesion of 1e19 mL).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .io import spacing_from_affine

MAX_LABEL_VALUES = 16
AIR_MAX_HU, TISSUE_MIN_HU = -500.0, -100.0
HU_MIN = -3100.0  # below the usual -3024 / -2048 padding fill of CT scanners
SPACING_MM = (0.05, 30.0)
_SAMPLE = 2_000_000  # voxels looked at: enough for the rules, cheap on a 512x512x300 scan


def ct_problems(image: np.ndarray, affine: np.ndarray, dtype_on_disk: str | None = None) -> list[str]:
    """The reasons ``image`` is not a plausible CT in HU (empty when it is)."""
    spacing = np.asarray(spacing_from_affine(affine))
    problems = []
    lo, hi = SPACING_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        problems.append(f"voxel spacing {tuple(np.round(spacing, 4).tolist())} mm is outside {lo}..{hi} mm per axis")
    volume = np.asarray(image)
    if volume.size > _SAMPLE:  # a strided sample in C order: every region of the volume, deterministic
        positions = np.arange(0, volume.size, volume.size // _SAMPLE + 1)
        flat = volume[np.unravel_index(positions, volume.shape)]  # gathered: ravel() copies a Fortran-order volume
    else:
        flat = volume.ravel()
    vmin, vmax = float(flat.min()), float(flat.max())
    if vmin == vmax:
        return problems + [f"constant volume (every voxel {vmin:g})"]
    head = np.unique(flat[: 200_000])  # cheap first look; the whole sample only when that looks label-like
    if head.size <= MAX_LABEL_VALUES and np.all(head == np.round(head)):
        n_values = np.unique(flat).size
        if n_values <= MAX_LABEL_VALUES:
            return problems + [f"only {n_values} distinct integer values: a mask or label map, not a CT"]
    if (dtype_on_disk or "").lstrip("u") == "int8" or (vmin >= 0 and vmax <= 255):
        return problems + [f"values {vmin:g}..{vmax:g} (8-bit: a label map or a display picture), not Hounsfield units"]
    if vmin > AIR_MAX_HU:
        problems.append(f"no air or lung (minimum {vmin:g} > {AIR_MAX_HU:g} HU): not a CT in HU (MR? already windowed?)")
    elif vmax < TISSUE_MIN_HU:
        problems.append(f"no soft tissue (maximum {vmax:g} < {TISSUE_MIN_HU:g} HU): not a CT in HU")
    if vmin < HU_MIN:
        problems.append(f"values down to {vmin:g}, below any CT's {HU_MIN:g} HU")
    return problems


def check_ct(image: np.ndarray, affine: np.ndarray, path=None, dtype_on_disk: str | None = None,
             allow_non_ct: bool = False, modality: str | None = None) -> None:
    """Raise :class:`InputError` naming the file and every reason, unless ``allow_non_ct``. ``modality``:
    what a DICOM header says the series is (anything but CT is a reason, whatever its values look like)."""
    problems = ct_problems(image, affine, dtype_on_disk)
    if modality is not None and modality.upper() != "CT":
        problems.insert(0, f"its DICOM Modality is {modality}, not CT")
    if problems and not allow_non_ct:
        raise InputError(path, "not a plausible CT in Hounsfield units: " + "; ".join(problems)
                         + " (pass --allow-non-ct to run anyway)")
