"""LAPFT (seed 004) adapter: the shared text-guided spec and predictor (:mod:`.text_guided`), reporting
per slice the GPFC six-zone probabilities (last stage) and the prompt points (file IJK and RAS mm)."""

from __future__ import annotations

from typing import Mapping

import torch

from ..vocab import ZONES
from . import text_guided

KIND = "lapft"
trained = text_guided.trained


def spec_for(network, tokenizer, image_size: int, max_length: int, **kwargs) -> dict:
    return text_guided.spec_for(KIND, network, tokenizer, image_size, max_length, **kwargs)


def _outputs(out: dict) -> dict:
    extra = {"slice_points": out["points"], "slice_points_valid": out["points_valid"]}
    if out["zone_logits"].shape[1]:
        extra["slice_values"] = {"gpfc_zone_probabilities": torch.sigmoid(out["zone_logits"][:, -1])}
    return extra


def predictor(spec: Mapping, weights: Mapping, device: str = "cpu", **run_time):
    return text_guided.predictor(KIND, spec, weights, outputs=_outputs, device=device,
                                 extras={"zones_order": list(ZONES)}, **run_time)
