"""Slice-wise inference of a text-guided 2D model (TMC, LAPFT) from ONE case-level sentence.

A case sentence ("Bilateral pulmonary infection, two infected areas, lower left lung and upper right
lung.") names zones of the whole lung; an axial slice only cuts through some of them. Each slice is
given the case sentence restricted to the zones of the lung zone map (:mod:`segreport.transforms.
lung_regions`: thirds of each lung's craniocaudal extent, sides from the affine) that the slice
contains, :func:`segreport.text.findings.restrict_finding`. A slice through the lower lung of the
example above reads "Unilateral pulmonary infection, one infected area, lower left lung."; a slice
above or below the lungs, or at a level the sentence does not name, reads "No pulmonary infection.".
Training builds its slice sentences with the same rule (:mod:`segreport.training.slices2d`,
``text="level"``), so the model sees at inference what it learned from.

Bad text is refused with :class:`~segreport.errors.InputError`: empty text, and text from which the
LViT parser reads neither a lung zone nor "no infection" (another grammar: the model would be guided
by nothing). The text given, the per-level sentences and the slices each was given to are recorded
in the prediction's extras (and so in the report).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from ..text.findings import NO_FINDING, parse_finding, restrict_finding
from ..transforms.lung_mask import lung_label_from_ct
from ..transforms.lung_regions import lung_zone_map
from ..transforms.slicing import axial_axis
from ..transforms.text import TokenizeText
from ..vocab import ZONES
from .slicewise import SliceWisePredictor


def check_guide_text(text: Any, source=None) -> str:
    """The text, stripped, or a clear :class:`InputError` (module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(source, f"the guide text is empty ({text!r}): give the case's finding sentence "
                                 "(--text, --texts CSV or --text-from bundles/medsegtext)")
    parsed = parse_finding(text)
    if not parsed.zones and parsed.n_areas != 0:
        raise InputError(source, f"no lung zone can be read from the guide text {text!r}: write it in the LViT grammar, "
                                 f"e.g. 'Unilateral pulmonary infection, one infected area, lower left lung.' "
                                 f"or {NO_FINDING!r}")
    return text.strip()


def zones_per_slice(zone_map: np.ndarray, axis: int) -> list[set[str]]:
    """The set of zone names present in each slice along ``axis`` of a zone map."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.stack([(zone_map == code).any(axis=other) for code in range(1, len(ZONES) + 1)])  # (6, n)
    return [{ZONES[c] for c in np.flatnonzero(present[:, k])} for k in range(zone_map.shape[axis])]


def level_sentences(text: str, image: np.ndarray, affine: np.ndarray, lung: np.ndarray | None = None) -> list[str]:
    """The sentence of each FILE axial slice (module docstring); the lung label (1 right, 2 left) is
    thresholded from the CT when not given."""
    if lung is None:
        lung = lung_label_from_ct(image, affine)
    if not np.any(lung):  # no lung to cut into levels: every slice gets the whole sentence
        return [text] * image.shape[axial_axis(affine)]
    zones = lung_zone_map(lung, affine)
    return [restrict_finding(text, present) for present in zones_per_slice(zones, axial_axis(affine))]


class TextGuidedPredictor(SliceWisePredictor):
    """A :class:`SliceWisePredictor` whose ``forward(images, tokens, tokens_mask)`` reads one sentence
    per slice. ``predict(image, affine, text=..., lung=...)``; ``tokenizer``/``max_length`` from the spec."""

    takes_text = True

    def __init__(self, name: str, forward: Callable[..., dict], tokenizer, max_length: int, **kwargs):
        super().__init__(name, forward, **kwargs)
        self.tokenize = TokenizeText(tokenizer, max_length)
        self.max_length = int(max_length)

    def predict(self, image, affine, points=None, point_labels=None, lung=None, text=None, **prompts):
        text = check_guide_text(text)
        sentences = level_sentences(text, image, affine, lung)
        unique = sorted(set(sentences))
        ids, mask = zip(*(self.tokenize(s) for s in unique))
        ids, mask = torch.stack(ids), torch.stack(mask)
        row = {s: i for i, s in enumerate(unique)}
        slice_rows = np.array([row[s] for s in sentences])

        def slice_prompts(file_indices: np.ndarray) -> dict:
            rows = torch.as_tensor(slice_rows[np.asarray(file_indices)])
            return {"tokens": ids[rows], "tokens_mask": mask[rows]}

        prediction = super().predict(image, affine, points=points, point_labels=point_labels, lung=lung,
                                     slice_prompts=slice_prompts, **prompts)
        n_words = [len(self.tokenize.tokenizer.encode(s, add_special_tokens=False)) for s in unique]
        prediction.extras.update(
            guide_texts=[text],
            level_sentences={s: [int(k) for k in np.flatnonzero(slice_rows == row[s])] for s in unique},
            guide_text_truncated=[s for s, n in zip(unique, n_words) if n > self.max_length - 2],
        )
        return prediction
