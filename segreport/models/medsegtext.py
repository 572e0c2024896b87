"""MedSegText (seed 000) adapter: its spec in a checkpoint, and the slice-wise predictor built from it."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..inference.slicewise import SliceWisePredictor
from ..networks.medsegtext import MedSegText
from ..text.tokenizers import decode_tokens
from .spec import slice_spec, trained_with_tokenizer

KIND = "medsegtext"
TARGET = "segreport.networks.MedSegText"


def spec_for(network: MedSegText, tokenizer, image_size: int, max_length: int, **kwargs) -> dict:
    """Everything inference needs: the network's config, the 2D pre-processing, the tokenizer itself
    (``kwargs``: window, threshold, min_lesion_ml, training; :func:`.spec.slice_spec`)."""
    return slice_spec(KIND, TARGET, getattr(network, "module", network).config, tokenizer, image_size, max_length, **kwargs)


def trained(spec: Mapping, weights: Mapping) -> tuple[MedSegText, Any]:
    """(network with weights, tokenizer or None) of a MedSegText spec."""
    return trained_with_tokenizer(spec, weights)


def predictor(spec: Mapping, weights: Mapping, device: str = "cpu", batch_size: int = 16, bf16: bool = False,
              beam_size: int = 1, threshold: float | None = None) -> SliceWisePredictor:
    network, tokenizer = trained(spec, weights)
    network = network.to(device)
    inf, pre = spec["inference"], spec["preprocessing"]

    def forward(images: torch.Tensor, level: torch.Tensor | None = None) -> dict:
        return network.predict(images, max_length=inf["max_length"], beam_size=beam_size, level=level,
                               threshold=inf["threshold"] if threshold is None else threshold)

    return SliceWisePredictor(
        KIND, forward, image_size=pre["image_size"], window=pre["window"],
        decode=None if tokenizer is None else (lambda ids: decode_tokens(tokenizer, ids)), device=device,
        batch_size=batch_size, bf16=bf16,
        threshold=inf["threshold"] if threshold is None else threshold,
        extras={"slice_findings_source": "MedSegText text decoder, one sentence per axial slice"}, needs_lungs=True,
        takes_levels=network.grounding is not None,
    )
