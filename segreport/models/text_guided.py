"""What the text-guided 2D adapters (TMC, LAPFT) share: their spec, and the slice predictor built from it.

A text-guided checkpoint's spec holds the network's class and config, the 2D pre-processing (display
orientation, HU window, image size), the text length, the threshold and minimum lesion size, and the
tokenizer itself. Baselines of a bundle (e.g. TMC's U-Net) are checkpoints of the same kind: the spec's
network target says which network.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..inference.text_guided import TextGuidedPredictor
from ..text.tokenizers import tokenizer_from_files, tokenizer_to_files
from ..transforms.orientation import DISPLAY_AXCODES
from ..vocab import MIN_LESION_ML
from .spec import build_network, load_weights, make_spec


def spec_for(kind: str, network, tokenizer, image_size: int, max_length: int, window: str = "lung",
             threshold: float = 0.5, min_lesion_ml: float = MIN_LESION_ML, training: Mapping | None = None) -> dict:
    net = getattr(network, "module", network)
    return make_spec(
        kind, f"{type(net).__module__}.{type(net).__qualname__}", net.config,
        preprocessing={"axcodes": DISPLAY_AXCODES, "window": window, "image_size": int(image_size), "channels": 1},
        inference={"max_length": int(max_length), "threshold": float(threshold), "min_lesion_ml": float(min_lesion_ml)},
        tokenizer=tokenizer_to_files(tokenizer), training=training,
    )


def trained(spec: Mapping, weights: Mapping) -> tuple[torch.nn.Module, Any]:
    """(network with weights, in eval mode; tokenizer) of a text-guided spec."""
    network = load_weights(build_network(spec), weights)
    return network.eval(), tokenizer_from_files(spec["tokenizer"])


def predictor(kind: str, spec: Mapping, weights: Mapping, outputs: Callable[[dict], dict] | None = None,
              device: str = "cpu", batch_size: int = 16, bf16: bool = False, threshold: float | None = None,
              min_lesion_ml: float | None = None, extras: dict | None = None) -> TextGuidedPredictor:
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
        min_lesion_ml=inf["min_lesion_ml"] if min_lesion_ml is None else min_lesion_ml,
        extras={"guide": "the case sentence restricted to each axial slice's lung zones (inference.text_guided)",
                **(extras or {})},
        needs_lungs=True,
    )
