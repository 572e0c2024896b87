"""MedSegText (seed 000): one ConvNeXt encoder, a U-Net mask decoder and a Transformer text decoder.

A CT slice goes through the shared encoder once; f1..f4 feed the U-Net decoder (mask logits at the
input size) and the flattened f4 is the cross-attention memory of the text decoder (next-token
logits under teacher forcing, or generated ids).
"""

from __future__ import annotations

import copy
import os
import tempfile
from os import PathLike
from typing import Any

import torch
from torch import nn

from .blocks.encoders import ConvNeXtEncoder
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
        # Everything needed to rebuild this model; stored in checkpoints. The weights path is left
        # out: a checkpoint already holds the encoder weights.
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

    # ---- named configurations --------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | dict[str, Any], **overrides: Any) -> MedSegText:
        """Build from a name in ``MEDSEGTEXT_CONFIGS`` or a config dict (e.g. a checkpoint's)."""
        if isinstance(config, str):
            if config not in MEDSEGTEXT_CONFIGS:
                raise ValueError(f"unknown MedSegText config {config!r}; known: {sorted(MEDSEGTEXT_CONFIGS)}")
            config = MEDSEGTEXT_CONFIGS[config]
        return cls(**{**copy.deepcopy(config), **overrides})

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

    def forward(self, image: torch.Tensor, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mask logits and, with ``tokens`` [B, L] (input ids starting with BOS), next-token logits.

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
                memory = self.text_decoder.encode_memory(features[-1])
                out["text_logits"] = self.text_decoder(tokens, memory)
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
    ) -> torch.Tensor:
        """Finding token ids [B, T] (no BOS; EOS then pad). Greedy for ``beam_size=1``.
        See ``TransformerTextDecoder.generate``; call ``model.eval()`` first."""
        decoder = self._require_text()
        self._check_image(image)
        memory = decoder.encode_memory(self.encoder(image)[-1])
        return decoder.generate(memory, max_length, beam_size, length_penalty, use_cache)

    @torch.no_grad()
    def predict(
        self,
        image: torch.Tensor,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One encoder pass for both outputs: ``seg_logits`` (if the mode has it) and generated
        ``tokens`` (if it has a text head)."""
        self._check_image(image)
        features = self.encoder(image)
        out = {}
        if self.seg_decoder is not None:
            out["seg_logits"] = self.seg_decoder(features, image.shape[-2:])
        if self.text_decoder is not None:
            memory = self.text_decoder.encode_memory(features[-1])
            out["tokens"] = self.text_decoder.generate(memory, max_length, beam_size, length_penalty, use_cache)
        return out

    # ---- checkpoints -----------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """The config travels inside ``state_dict()`` (key ``_extra_state``), so any saver,
        including MONAI's ``CheckpointSaver`` that writes bare state dicts, keeps it."""
        return {"config": self.config}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore: this instance already has its architecture, and
        ``load_checkpoint`` compares shapes and vocabularies before loading."""

    def save_checkpoint(self, path: str | PathLike, **extra: Any) -> None:
        """Write ``{"config", "state_dict", **extra}`` atomically (temp file + rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"config": self.config, "state_dict": self.state_dict(), **extra}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | PathLike,
        vocab_size: int | None = None,
        map_location: str | torch.device = "cpu",
        **overrides: Any,
    ) -> MedSegText:
        """Rebuild the model a checkpoint was saved from and load it. Pass the tokenizer's
        ``vocab_size`` to have a mismatch reported before anything is built."""
        checkpoint = _read(path, map_location)
        config = _stored_config(checkpoint)
        if config is None:
            raise ValueError(
                f"{path}: the checkpoint carries no MedSegText config; build the model with the settings it "
                "was trained with (e.g. MedSegText.from_config('tiny', ...)) and call load_checkpoint(path)"
            )
        if vocab_size is not None and config["vocab_size"] is not None and vocab_size != config["vocab_size"]:
            raise ValueError(
                f"{path}: checkpoint was trained with a vocabulary of {config['vocab_size']} tokens but the "
                f"tokenizer has {vocab_size}. Use the tokenizer saved with this checkpoint (same vocabulary "
                "and special tokens), or train a new text decoder for this tokenizer."
            )
        model = cls.from_config(config, **overrides).to(map_location)
        model._load_state(path, checkpoint)
        return model

    def load_checkpoint(
        self, path: str | PathLike, map_location: str | torch.device = "cpu", strict: bool = True
    ) -> dict[str, Any]:
        """Load weights saved by ``save_checkpoint`` or any saver of ``state_dict()``; returns the
        checkpoint. One from another configuration raises a ``ValueError`` that lists the
        mismatching keys and says which configuration fits."""
        checkpoint = _read(path, map_location)
        self._load_state(path, checkpoint, strict)
        return checkpoint

    def _load_state(self, path: str | PathLike, checkpoint: dict[str, Any], strict: bool = True) -> None:
        state = dict(checkpoint.get("state_dict", checkpoint))
        # State dicts saved without the config (other tools, older files) still load: the config
        # is only needed to rebuild a model, and this one is already built.
        state.setdefault("_extra_state", self.get_extra_state())
        own = self.state_dict()
        emb = "text_decoder.embed.weight"
        if emb in state and emb in own and state[emb].shape[0] != own[emb].shape[0]:
            raise ValueError(
                f"{path}: vocabulary mismatch: the checkpoint's text embedding has {state[emb].shape[0]} tokens, "
                f"this model {own[emb].shape[0]} (vocab_size). Build the model with vocab_size="
                f"{state[emb].shape[0]} and the tokenizer the checkpoint was trained with."
            )
        shapes = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and torch.is_tensor(own[k]) and state[k].shape != own[k].shape
        ]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if shapes or (strict and (missing or unexpected)):
            lines = [f"{path}: checkpoint does not fit this MedSegText (mode={self.mode!r}, "
                     f"encoder={self.config['encoder']!r}, d_model={self.config['d_model']})."]
            for title, keys in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
                if keys:
                    lines.append(f"  {title} ({len(keys)}): " + "; ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
            lines.append("  " + _fitting_config_hint(checkpoint, state))
            raise ValueError("\n".join(lines))
        self.load_state_dict(state, strict=strict)


def _read(path: str | PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def _stored_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The config saved beside the weights or inside the state dict's extra state."""
    if "config" in checkpoint:
        return checkpoint["config"]
    extra = checkpoint.get("state_dict", checkpoint).get("_extra_state")
    return extra.get("config") if isinstance(extra, dict) else None


def _fitting_config_hint(checkpoint: dict[str, Any], state: dict[str, Any]) -> str:
    """Say which configuration would load this checkpoint."""
    config = _stored_config(checkpoint)
    if config is not None:
        return (f"It was saved from config {config}; rebuild it with MedSegText.from_checkpoint(path) "
                "or MedSegText.from_config(config).")
    shapes = {k: v.shape for k, v in state.items() if torch.is_tensor(v)}
    text = _text_ids(state)
    for name, preset in MEDSEGTEXT_CONFIGS.items():
        for mode in MODES:
            if (mode == "segmentation") != (text is None):
                continue
            # Built on the meta device: shapes only, no memory or init cost.
            with torch.device("meta"):
                model = MedSegText.from_config(preset, mode=mode, **(text or {}))
            own = {k: v.shape for k, v in model.state_dict().items() if torch.is_tensor(v)}
            if own == shapes:
                return f"It fits MedSegText.from_config({name!r}, mode={mode!r}, ...)."
    return "No named configuration fits it; it was saved from a custom configuration."


def _text_ids(state: dict[str, Any]) -> dict[str, int] | None:
    """Placeholder special ids for the vocabulary size read off a state dict (shapes only)."""
    emb = state.get("text_decoder.embed.weight")
    if emb is None:
        return None
    n = emb.shape[0]
    return dict(vocab_size=n, pad_id=0, bos_id=min(1, n - 1), eos_id=min(2, n - 1))
