"""MedSegText (seed 000): one ConvNeXt encoder, a U-Net mask decoder and a Transformer text decoder.

A CT slice goes through the shared encoder once; f1..f4 feed the U-Net decoder (mask logits at the
input size) and the flattened f4 is the cross-attention memory of the text decoder (next-token
logits under teacher forcing, or generated ids).

Not in the paper (its "future work": the segmentation guiding the text): in the joint model the text
memory also holds :class:`~.blocks.mask_grounding.MaskGrounding` tokens, one per lesion of a mask and
one for the slice's level, the reference mask under teacher forcing and the model's own thresholded mask at inference, so
the sentence describes the returned mask (docs/results.md has the measurement).
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch
from torch import nn

from .blocks.configs import named_config
from .blocks.encoders import ConvNeXtEncoder
from .blocks.mask_grounding import MaskGrounding
from .blocks.text_decoder import TransformerTextDecoder
from .blocks.unet_decoder import UNetDecoder

__all__ = ["MedSegText", "MEDSEGTEXT_CONFIGS"]

MODES = ("joint", "segmentation", "text")

#: Named architectures. "paper" is the seed's (ConvNeXt-Tiny, d_model 768, 8 heads, 6 layers,
#: 50 tokens); "tiny" is a CPU-millisecond version for tests and smoke runs.
MEDSEGTEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "paper": dict(
        encoder="convnext_tiny", encoder_kwargs={}, decoder_channels=None,
        d_model=768, nhead=8, num_layers=6, dim_feedforward=2048, max_length=50, dropout=0.1,
    ),
    "tiny": dict(
        encoder="convnext_atto", encoder_kwargs=dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
        decoder_channels=(32, 16, 16), d_model=32, nhead=2, num_layers=2, dim_feedforward=64,
        max_length=50, dropout=0.0,
    ),
}


class MedSegText(nn.Module):
    """Joint lesion segmentation and one-sentence finding generation from a 2D CT slice.

    Args:
        vocab_size, pad_id, bos_id, eos_id: from the tokenizer; required unless
            ``mode="segmentation"``.
        mode: ``"joint"`` (both heads), ``"segmentation"`` or ``"text"`` (single-task baselines).
        encoder: timm ConvNeXt name; ``encoder_kwargs`` override its dims/depths.
        in_channels: image channels (1 for a CT slice). out_channels: mask logit channels.
        decoder_channels: U-Net decoder widths, deepest first (default: the skip widths).
        d_model, nhead, num_layers, dim_feedforward, max_length, dropout: text decoder sizes;
            ``max_length`` counts BOS and EOS.
        memory_pos: 2D position code on the text memory (see ``TransformerTextDecoder``).
        encoder_weights: optional local ConvNeXt checkpoint for the encoder (never downloaded).

    ``forward(image, tokens=None)`` returns ``{"seg_logits": [B, out, H, W], "text_logits":
    [B, L, vocab]}`` with only the keys this mode has (text logits only when tokens are given).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        mode: str = "joint",
        encoder: str = "convnext_tiny",
        encoder_kwargs: dict[str, Any] | None = None,
        in_channels: int = 1,
        out_channels: int = 1,
        decoder_channels: tuple[int, ...] | None = None,
        d_model: int = 768,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        max_length: int = 50,
        dropout: float = 0.1,
        memory_pos: bool = True,
        encoder_weights: str | PathLike | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        has_text = mode != "segmentation"
        if has_text and None in (vocab_size, pad_id, bos_id, eos_id):
            raise ValueError(f"mode={mode!r} needs vocab_size, pad_id, bos_id and eos_id (from the tokenizer)")
        # Everything needed to rebuild this model: the network part of a checkpoint's spec
        # (segreport.models.medsegtext). The weights path is left out: a checkpoint holds those weights.
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, mode=mode, encoder=encoder,
            encoder_kwargs=dict(encoder_kwargs or {}), in_channels=in_channels, out_channels=out_channels,
            decoder_channels=None if decoder_channels is None else tuple(decoder_channels),
            d_model=d_model, nhead=nhead, num_layers=num_layers, dim_feedforward=dim_feedforward,
            max_length=max_length, dropout=dropout, memory_pos=memory_pos,
        )
        self.mode, self.in_channels = mode, in_channels
        self.encoder = ConvNeXtEncoder(encoder, in_channels, encoder_weights, **(encoder_kwargs or {}))
        channels = self.encoder.out_channels
        self.min_size = self.encoder.reductions[-1]
        self.seg_decoder = (
            UNetDecoder(channels, out_channels, decoder_channels) if mode != "text" else None
        )
        self.text_decoder = (
            TransformerTextDecoder(
                vocab_size, channels[-1], pad_id, bos_id, eos_id, d_model=d_model, nhead=nhead,
                num_layers=num_layers, dim_feedforward=dim_feedforward, max_length=max_length,
                dropout=dropout, memory_pos=memory_pos,
            )
            if has_text
            else None
        )
        self.grounding = MaskGrounding(d_model, channels[0]) if mode == "joint" else None

    # ---- named configurations --------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | dict[str, Any], **overrides: Any) -> MedSegText:
        """Build from a name in ``MEDSEGTEXT_CONFIGS`` or a config dict (e.g. a checkpoint's)."""
        return cls(**named_config(config, MEDSEGTEXT_CONFIGS, "MedSegText", overrides))

    @classmethod
    def tiny(cls, vocab_size: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
             eos_id: int | None = None, **overrides: Any) -> MedSegText:
        """Tiny configuration: milliseconds per 64×64 CPU forward; for tests and smoke runs."""
        return cls.from_config("tiny", vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, **overrides)

    @classmethod
    def paper(cls, vocab_size: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
              eos_id: int | None = None, **overrides: Any) -> MedSegText:
        """The seed paper's configuration (ConvNeXt-Tiny, 768/8/6, 50 tokens)."""
        return cls.from_config("paper", vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, **overrides)

    # ---- forward ---------------------------------------------------------------------------
    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"MedSegText expects an image tensor B×C×H×W with C={self.in_channels}; got shape "
                f"{tuple(image.shape)}. (A 3D volume goes through slice-wise inference.)"
            )
        if min(image.shape[-2:]) < self.min_size:
            raise ValueError(f"image is {tuple(image.shape[-2:])}; each side must be at least {self.min_size} px")

    def _memory(self, image: torch.Tensor, features: list[torch.Tensor], mask: torch.Tensor | None,
                level: torch.Tensor | None) -> torch.Tensor:
        memory = self.text_decoder.encode_memory(features[-1])
        if self.grounding is None:
            return memory
        # the lesion tokens read f1 detached: describing the mask must not pull the features it was segmented from
        return torch.cat([memory, self.grounding(mask, image, features[0].detach(), level)], 1)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                level: torch.Tensor | None = None, threshold: float = 0.5) -> dict[str, torch.Tensor]:
        """Mask logits and, with ``tokens`` [B, L] (input ids starting with BOS), next-token logits.

        ``mask`` [B, 1, H, W]: the mask the sentence describes (teacher forcing: the reference mask);
        without it, the model's own mask at ``threshold``. ``level`` [B]: each slice's place between the
        lung bases (0) and apices (1), NaN or None when unknown. Both only matter to the joint model.
        ``tokens`` are ignored in segmentation mode; text mode requires them (use ``generate``
        for inference).
        """
        self._check_image(image)
        features = self.encoder(image)
        out = {}
        if self.seg_decoder is not None:
            out["seg_logits"] = self.seg_decoder(features, image.shape[-2:])
        if self.text_decoder is not None:
            if tokens is not None:
                if tokens.shape[0] != image.shape[0]:
                    raise ValueError(f"tokens batch {tokens.shape[0]} != image batch {image.shape[0]}")
                if mask is None and self.grounding is not None:
                    mask = (torch.sigmoid(out["seg_logits"].detach()) > threshold).float()
                out["text_logits"] = self.text_decoder(tokens, self._memory(image, features, mask, level))
            elif self.mode == "text":
                raise ValueError("mode='text' forward needs tokens (teacher forcing); use generate() for inference")
        return out

    def _require_text(self) -> TransformerTextDecoder:
        if self.text_decoder is None:
            raise RuntimeError("this MedSegText was built with mode='segmentation': it has no text decoder")
        return self.text_decoder

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        level: torch.Tensor | None = None,
        threshold: float = 0.5,
    ) -> torch.Tensor:
        """Finding token ids [B, T] (no BOS; EOS then pad). Greedy for ``beam_size=1``.
        See ``TransformerTextDecoder.generate``; call ``model.eval()`` first."""
        self._require_text()
        return self.predict(image, max_length, beam_size, length_penalty, use_cache, level, threshold)["tokens"]

    @torch.no_grad()
    def predict(
        self,
        image: torch.Tensor,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        level: torch.Tensor | None = None,
        threshold: float = 0.5,
    ) -> dict[str, torch.Tensor]:
        """One encoder pass for both outputs: ``seg_logits`` (if the mode has it) and generated
        ``tokens`` (if it has a text head), the joint model's sentence describing its mask at
        ``threshold`` on the slices' ``level`` (see ``forward``)."""
        self._check_image(image)
        features = self.encoder(image)
        out = {}
        if self.seg_decoder is not None:
            out["seg_logits"] = self.seg_decoder(features, image.shape[-2:])
        if self.text_decoder is not None:
            mask = None if self.grounding is None else (torch.sigmoid(out["seg_logits"]) > threshold).float()
            memory = self._memory(image, features, mask, level)
            out["tokens"] = self.text_decoder.generate(memory, max_length, beam_size, length_penalty, use_cache)
        return out
