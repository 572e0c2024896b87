"""What the text-guided 2D adapters (TMC, LAPFT) share: their spec, and the slice predictor built from it.

A text-guided checkpoint's spec holds the network's class and config, the 2D pre-processing (display
orientation, HU window, image size), the text length, the threshold and minimum lesion size, and the
tokenizer itself. Baselines of a bundle (e.g. TMC's U-Net) are checkpoints of the same kind: the spec's
network target says which network.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..inference.text_guided import TextGuidedPredictor
from .spec import slice_spec, trained_with_tokenizer


def spec_for(kind: str, network, tokenizer, image_size: int, max_length: int, **kwargs) -> dict:
    """The spec of ``network`` under ``kind``, its target the network's own class (baselines included)."""
    net = getattr(network, "module", network)
    return slice_spec(kind, f"{type(net).__module__}.{type(net).__qualname__}", net.config, tokenizer, image_size,
                      max_length, **kwargs)


trained = trained_with_tokenizer  # (network in eval mode, tokenizer) of a text-guided spec


def predictor(kind: str, spec: Mapping, weights: Mapping, outputs: Callable[[dict], dict] | None = None,
              device: str = "cpu", batch_size: int = 16, bf16: bool = False, threshold: float | None = None,
              extras: dict | None = None) -> TextGuidedPredictor:
    """A :class:`TextGuidedPredictor` over the spec's network. ``outputs(network output) -> extra
    per-slice outputs`` (``slice_values``/``slice_points``, see :mod:`segreport.inference.slicewise`)."""
    network, tokenizer = trained(spec, weights)
    network = network.to(device)
    inf, pre = spec["inference"], spec["preprocessing"]

    def forward(images: torch.Tensor, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> dict:
        out = network(images, tokens, tokens_mask)
        return {"seg_logits": out["seg_logits"], **(outputs(out) if outputs else {})}

    return TextGuidedPredictor(
        kind, forward, tokenizer, inf["max_length"], image_size=pre["image_size"], window=pre["window"], device=device,
        batch_size=batch_size, bf16=bf16, threshold=inf["threshold"] if threshold is None else threshold,
        extras={"guide": "the case sentence restricted to each axial slice's lung zones (inference.text_guided)",
                **(extras or {})},
        needs_lungs=True,
    )
