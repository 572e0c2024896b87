"""Volume pre-processing shared by the 3D models and the prompt session: orientation, spacing, HU window."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose, Orientationd, Spacingd

from .intensity import HUWindowd


def window_kwargs(window: str | Sequence[float]) -> dict:
    """HU window: a preset name ("lung", "abdomen", "mediastinum") or ``[a_min, a_max]``."""
    if isinstance(window, str):
        return {"preset": window}
    a_min, a_max = window
    return {"preset": None, "a_min": float(a_min), "a_max": float(a_max)}


def volume_transforms(spacing: Sequence[float], window: str | Sequence[float] = "lung", axcodes: str = "RAS",
                      keys: Sequence[str] = ("image", "label")) -> Compose:
    """Reorient, resample to ``spacing`` (mm; MONAI ``Spacingd``, bilinear image / nearest label), HU window."""
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return Compose([
        Orientationd(keys=keys, axcodes=axcodes, labels=None, allow_missing_keys=True),
        Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=modes, allow_missing_keys=True),
        HUWindowd(keys="image", **window_kwargs(window)),
    ])
