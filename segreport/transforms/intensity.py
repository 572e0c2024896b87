"""CT intensity windowing: clip Hounsfield units to a window and scale it to [0, 1]."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, ScaleIntensityRange, Transform

# (level, width) in HU. Lung: the common clinical lung window (L -600, W 1500 -> -1350..150 HU),
# wide enough to keep ground-glass (-600..-300) and consolidation (-100..50) apart from aerated
# lung (-850). Mediastinum: L 50, W 350. Abdomen (soft tissue): L 40, W 400.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
}


def window_range(preset: str | None = "lung", a_min: float | None = None, a_max: float | None = None) -> tuple[float, float]:
    """HU range ``(a_min, a_max)`` of a preset window, or the explicit bounds when given (both needed)."""
    if a_min is not None or a_max is not None:
        if a_min is None or a_max is None or not a_min < a_max:
            raise ValueError(f"explicit window needs a_min < a_max, got a_min={a_min}, a_max={a_max}")
        return float(a_min), float(a_max)
    if preset not in WINDOWS:
        raise ValueError(f"unknown window preset {preset!r}; choose one of {sorted(WINDOWS)} or give a_min and a_max")
    level, width = WINDOWS[preset]
    return level - width / 2, level + width / 2


class HUWindow(Transform):
    """Clip to a HU window (``preset`` name or explicit ``a_min``/``a_max``) and scale it to [0, 1].

    A thin wrapper over MONAI ``ScaleIntensityRange(clip=True)``; numpy or torch in, MONAI's
    output type out (a MetaTensor when meta tracking is on), float32 unless ``dtype`` says otherwise.
    """

    backend = ScaleIntensityRange.backend

    def __init__(self, preset: str | None = "lung", a_min: float | None = None, a_max: float | None = None, dtype=np.float32):
        self.a_min, self.a_max = window_range(preset, a_min, a_max)
        self.scaler = ScaleIntensityRange(a_min=self.a_min, a_max=self.a_max, b_min=0.0, b_max=1.0, clip=True, dtype=dtype)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        return self.scaler(img)


class HUWindowd(MapTransform):
    """Dictionary version of :class:`HUWindow`."""

    backend = HUWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        preset: str | None = "lung",
        a_min: float | None = None,
        a_max: float | None = None,
        dtype=np.float32,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.windower = HUWindow(preset, a_min, a_max, dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d
