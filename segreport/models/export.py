"""A bundle's model step in MONAI's own terms, for MONAI's bundle tools and for use outside segreport.

``python -m monai.bundle verify_net_in_out | ckpt_export``, ``monai.bundle.load`` and ``CheckpointLoader``
expect a ``network_def`` that takes one image tensor and returns one tensor, plus ``preprocessing``,
``inferer`` and ``postprocessing``. segreport's networks return dicts (mask logits beside token or attribute
logits) and the text-guided ones read a sentence, so each inference config builds these here from the
checkpoint's spec (its ``spec`` id, read once):

- :func:`network_def`: the spec's network (random weights, as MONAI's ``network_def``; the checkpoint's
  ``model`` entry is its plain state dict) wrapped by :class:`MaskLogits`: image in, mask logits out,
  a text-guided network reading the config's fixed sentence;
- :func:`preprocessing`, :func:`inferer`, :func:`postprocessing`: what the predictor does to one 2D slice
  or one 3D volume around the network (HU window, size, sliding window, sigmoid and threshold).

The ``predictor`` of the same config runs this step over a whole CT (orientation, lung mask, report);
``tests/test_bundle_tools.py`` checks that both give the same mask.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .spec import build_network


class MaskLogits(nn.Module):
    """``network(image, *fixed prompts)[key]``: one tensor out, so MONAI's tools can call and trace it.

    Its state dict is the wrapped network's own (no ``network.`` prefix), so a bundle checkpoint's
    ``model`` entry loads into it as it is."""

    def __init__(self, network: nn.Module, key: str = "seg_logits", tokens: torch.Tensor | None = None,
                 tokens_mask: torch.Tensor | None = None):
        super().__init__()
        self.network, self.key = network, key
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("tokens_mask", tokens_mask, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return self.network(image)[self.key]
        b = image.shape[0]
        return self.network(image, self.tokens.expand(b, -1), self.tokens_mask.expand(b, -1))[self.key]

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def network_def(spec: Mapping, text: str | None = None) -> MaskLogits:
    """The spec's network, randomly initialised, as one tensor in and one out (module docstring).
    ``text``: the sentence a text-guided network reads (ignored by the others)."""
    network = build_network(spec).eval()
    if spec["kind"] == "lesion_report_3d":
        return MaskLogits(network, "mask_logits")
    if spec["kind"] in ("tmc", "lapft"):
        from ..text.tokenizers import tokenizer_from_files
        from ..transforms.text import TokenizeText

        tokenize = TokenizeText(tokenizer_from_files(spec["tokenizer"]), spec["inference"]["max_length"])
        tokens, mask = tokenize(text or "")
        return MaskLogits(network, "seg_logits", tokens[None], mask[None])
    return MaskLogits(network, "seg_logits")


def preprocessing(spec: Mapping):
    """2D: one axial slice (1, H, W) in HU in display orientation -> HU window -> the model's image size.
    3D: ``{"image": (1, X, Y, Z) MetaTensor in HU with its affine}`` -> orientation, spacing, window."""
    from monai.transforms import Compose, Resize

    from ..transforms.intensity import HUWindow
    from ..transforms.volume import volume_transforms

    pre = spec["preprocessing"]
    if spec["kind"] == "lesion_report_3d":
        return volume_transforms(pre["spacing"], pre["window"], pre["axcodes"], keys=("image",))
    size = int(pre["image_size"])
    return Compose([HUWindow(preset=pre["window"]), Resize((size, size), mode="bilinear", align_corners=False)])


def inferer(spec: Mapping, overlap: float = 0.5, sw_batch_size: int = 4):
    """2D: the network on a batch of slices. 3D: the automatic mode's first pass, a Gaussian-weighted
    sliding window of the network's ROI with no click (:mod:`segreport.inference.automatic`)."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    if spec["kind"] == "lesion_report_3d":
        roi = int(spec["preprocessing"]["roi_size"])
        return SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    return SimpleInferer()


def postprocessing(spec: Mapping):
    """Mask logits -> probability -> the spec's threshold."""
    from monai.transforms import Activations, AsDiscrete, Compose

    threshold = float(spec["inference"].get("threshold", 0.5))
    return Compose([Activations(sigmoid=True), AsDiscrete(threshold=threshold)])
