"""TMC (seeds 002/003) adapter: its spec in a checkpoint, and the text-guided slice predictor built from it.

The TMC bundle's baselines (MONAI U-Net, single-stage fusion) are checkpoints of this kind too: the
spec's network target says which network, so one adapter, one evaluation and one inference path serve
all of them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..inference.text_guided import TextGuidedPredictor
from ..text.tokenizers import tokenizer_from_files, tokenizer_to_files
from ..transforms.orientation import DISPLAY_AXCODES
from ..vocab import MIN_LESION_ML
from .spec import build_network, load_weights, make_spec

KIND = "tmc"


def spec_for(network, tokenizer, image_size: int, max_length: int, window: str = "lung", threshold: float = 0.5,
             min_lesion_ml: float = MIN_LESION_ML, training: Mapping | None = None) -> dict:
    """The network's class and config, the 2D pre-processing, the text length and the tokenizer itself."""
    net = getattr(network, "module", network)
    target = f"{type(net).__module__}.{type(net).__qualname__}"
    return make_spec(
        KIND, target, net.config,
        preprocessing={"axcodes": DISPLAY_AXCODES, "window": window, "image_size": int(image_size), "channels": 1},
        inference={"max_length": int(max_length), "threshold": float(threshold), "min_lesion_ml": float(min_lesion_ml)},
        tokenizer=tokenizer_to_files(tokenizer), training=training,
    )


def trained(spec: Mapping, weights: Mapping) -> tuple[torch.nn.Module, Any]:
    """(network with weights, in eval mode; tokenizer) of a TMC-bundle spec."""
    network = load_weights(build_network(spec), weights)
    return network.eval(), tokenizer_from_files(spec["tokenizer"])


def predictor(spec: Mapping, weights: Mapping, device: str = "cpu", batch_size: int = 16, bf16: bool = False,
              threshold: float | None = None, min_lesion_ml: float | None = None) -> TextGuidedPredictor:
    network, tokenizer = trained(spec, weights)
    network = network.to(device)
    inf, pre = spec["inference"], spec["preprocessing"]

    def forward(images: torch.Tensor, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> dict:
        return {"seg_logits": network(images, tokens, tokens_mask)["seg_logits"]}

    return TextGuidedPredictor(
        KIND, forward, tokenizer, inf["max_length"], image_size=pre["image_size"], window=pre["window"], device=device,
        batch_size=batch_size, bf16=bf16, threshold=inf["threshold"] if threshold is None else threshold,
        min_lesion_ml=inf["min_lesion_ml"] if min_lesion_ml is None else min_lesion_ml,
        extras={"guide": "the case sentence restricted to each axial slice's lung zones (inference.text_guided)"},
        needs_lungs=True,
    )
