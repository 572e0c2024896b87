"""TMC (seeds 002/003) adapter: the shared text-guided spec and predictor (:mod:`.text_guided`).

The TMC bundle's baselines (MONAI U-Net, single-stage fusion) are checkpoints of this kind too.
"""

from __future__ import annotations

from typing import Mapping

from . import text_guided

KIND = "tmc"
trained = text_guided.trained


def spec_for(network, tokenizer, image_size: int, max_length: int, **kwargs) -> dict:
    return text_guided.spec_for(KIND, network, tokenizer, image_size, max_length, **kwargs)


def predictor(spec: Mapping, weights: Mapping, device: str = "cpu", **run_time):
    return text_guided.predictor(KIND, spec, weights, device=device, **run_time)
