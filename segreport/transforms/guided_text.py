"""Augmentations that keep a guide text true to its slice (the text-guided models, TMC and LAPFT).

- :class:`RandLateralFlipd` mirrors the slice left-right and swaps the sentence's sides and the
  lesion zone codes with it. A plain flip would teach the model that "left lung" may be on either
  side of the image: a slice in the display orientation (``PLS``) has patient left on the right of
  the image's columns (spatial axis 1), and the sentence must follow the mirror.
- :class:`RandZoneSubsetd` pairs a sentence naming SOME of the slice's zones (one lung, say) with
  the mask restricted to those zones. Training otherwise only ever sees sentences that match the
  whole mask, and a model can then ignore the text and still score; this is what teaches it that
  the text decides which lesions to segment.

Both need ``lesion_zones`` (zone codes 1..6 of the lesion pixels, :data:`segreport.vocab.ZONES`
order), from :func:`segreport.training.slices2d.load_datalists` with ``keep_zones=True``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from ..text.findings import NO_FINDING, format_finding, parse_finding, restrict_finding
from ..vocab import SIDES, ZONES

__all__ = ["RandLateralFlipd", "RandZoneSubsetd", "mirrored_zone_codes"]

LATERAL_AXIS = 1  # spatial axis of a display-orientation slice (1×rows×cols) that runs right -> left


def mirrored_zone_codes() -> np.ndarray:
    """Lookup table: zone code -> the code of the same level on the other side (0 stays 0)."""
    table = np.zeros(len(ZONES) + 1, dtype=np.uint8)
    for i, zone in enumerate(ZONES):
        level, side = zone.split("_")
        other = SIDES[1 - SIDES.index(side)]
        table[i + 1] = ZONES.index(f"{level}_{other}") + 1
    return table


def _mirror_text(text: str) -> str:
    parsed = parse_finding(text)
    if not parsed.zones:
        return text
    mirrored = {f"{z.split('_')[0]}_{SIDES[1 - SIDES.index(z.split('_')[1])]}" for z in parsed.zones}
    return format_finding(parsed.n_areas or len(mirrored), mirrored)


class RandLateralFlipd(RandomizableTransform, MapTransform):
    """With probability ``prob``: flip ``keys`` (and ``zones_key``) along the lateral axis, swap sides in
    ``text_key`` and in the zone codes."""

    def __init__(self, keys=("image", "label"), text_key: str = "text", zones_key: str = "lesion_zones",
                 prob: float = 0.5, allow_missing_keys: bool = True):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.text_key, self.zones_key = text_key, zones_key
        self.table = mirrored_zone_codes()

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = _flip(d[key])
        if self.zones_key in d:
            d[self.zones_key] = self.table[np.asarray(_flip(d[self.zones_key])).astype(np.int64)]
        if self.text_key in d:
            d[self.text_key] = _mirror_text(d[self.text_key])
        return d


def _flip(x):
    axis = LATERAL_AXIS + 1  # channel first
    return torch.flip(x, dims=(axis,)) if isinstance(x, torch.Tensor) else np.ascontiguousarray(np.flip(x, axis))


class RandZoneSubsetd(RandomizableTransform, MapTransform):
    """With probability ``prob``, when the sentence names at least two zones: keep one lung (when both
    are named, half the time) or a random non-empty proper subset of the named zones; the sentence is
    rewritten for them and ``label`` keeps only the lesion pixels in them."""

    def __init__(self, label_key: str = "label", text_key: str = "text", zones_key: str = "lesion_zones",
                 prob: float = 0.5):
        MapTransform.__init__(self, [label_key])
        RandomizableTransform.__init__(self, prob)
        self.label_key, self.text_key, self.zones_key = label_key, text_key, zones_key

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform or self.zones_key not in d:
            return d
        named = sorted(parse_finding(d[self.text_key]).zones)
        if len(named) < 2:
            return d
        sides = sorted({z.split("_")[1] for z in named})
        if len(sides) == 2 and self.R.rand() < 0.5:
            side = sides[self.R.randint(2)]
            kept = {z for z in named if z.endswith(side)}
        else:
            k = self.R.randint(1, len(named))  # 1 .. len-1 zones
            kept = set(self.R.choice(named, size=k, replace=False).tolist())
        codes = [ZONES.index(z) + 1 for z in kept]
        keep = np.isin(np.asarray(d[self.zones_key]), codes)
        label = d[self.label_key]
        d[self.label_key] = label * (torch.as_tensor(keep, dtype=label.dtype) if isinstance(label, torch.Tensor)
                                     else keep.astype(np.asarray(label).dtype))
        d[self.text_key] = restrict_finding(d[self.text_key], kept) if kept else NO_FINDING
        return d
