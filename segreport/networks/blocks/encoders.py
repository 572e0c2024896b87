"""ConvNeXt image encoder returning the four stage feature maps f1..f4 (strides 4, 8, 16, 32)."""

from __future__ import annotations

import re
from os import PathLike
from typing import Any

import timm
from timm.models import adapt_input_conv
import torch
from torch import nn

__all__ = ["ConvNeXtEncoder", "adapt_stem_weight"]

# Classifier-head keys of a full timm ConvNeXt checkpoint; a features-only encoder has no head.
_HEAD_PREFIX = "head."


def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Convert a stem convolution weight [C_out, C_in, k, k] to ``in_channels`` input channels.

    A grey CT slice shown to an RGB-pretrained network would be replicated into three identical
    channels. The convolution is linear, so summing the kernel over its input channels gives exactly
    the response the pretrained network had to that replicated slice (averaging would shrink it by
    3 and shift the statistics the following LayerNorm and blocks were trained on). For other channel
    counts the RGB kernels are tiled and rescaled by ``C_in / in_channels`` so a replicated input
    keeps the same response: timm's ``adapt_input_conv``, which this calls.
    """
    return adapt_input_conv(in_channels, weight, base_chans=weight.shape[1])  # timm's own implementation of that rule


class ConvNeXtEncoder(nn.Module):
    """timm ConvNeXt in ``features_only`` mode: ``forward(x) -> [f1, f2, f3, f4]``.

    Args:
        name: timm model name (``"convnext_tiny"`` for the paper, ``"convnext_atto"`` etc.).
        in_channels: image channels (1 for a CT slice).
        weights: optional local checkpoint (a timm ConvNeXt checkpoint or this encoder's own
            state dict, optionally wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``).
            Never downloaded: there is no model hub at run time.
        **model_kwargs: passed to ``timm.create_model`` to override the architecture, e.g.
            ``dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)`` for a tiny test encoder.
    """

    def __init__(
        self,
        name: str = "convnext_tiny",
        in_channels: int = 1,
        weights: str | PathLike | None = None,
        **model_kwargs: Any,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3), in_chans=in_channels,
            **model_kwargs,
        )
        self.out_channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()
        if weights is not None:
            self.load_weights(weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)

    def _timm_to_feature_keys(self) -> dict[str, str]:
        """Prefix map from a full timm model's names to this features-only model's names.

        timm's feature wrapper flattens the first level of ``nn.Sequential`` children into
        ``parent_index`` names (``stem.0`` -> ``stem_0``, ``stages.2`` -> ``stages_2``).
        """
        prefixes = {}
        for name, _ in self.body.named_children():
            prefixes[re.sub(r"_(\d+)$", r".\1", name) + "."] = name + "."
        return prefixes

    def load_weights(self, path: str | PathLike) -> None:
        """Load a local checkpoint, adapting the stem to ``in_channels``; clear error on mismatch."""
        state = read_state_dict(path)
        prefixes = self._timm_to_feature_keys()
        converted = {}
        for key, value in state.items():
            if key.startswith(_HEAD_PREFIX):
                continue
            for timm_prefix, feat_prefix in prefixes.items():
                if key.startswith(timm_prefix):
                    key = feat_prefix + key[len(timm_prefix):]
                    break
            converted[key] = value
        stem_key = next(iter(self.body.state_dict()))  # the stem convolution is the first parameter of ConvNeXt
        load_checked(self.body, converted, path, self.in_channels, stem_key, f"ConvNeXt ({_describe(self.out_channels)})")


def read_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """A local checkpoint's state dict (optionally wrapped in ``state_dict``/``model``; ``module.`` dropped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_checked(module: nn.Module, state: dict, path, in_channels: int, stem_key: str, what: str) -> None:
    """Load ``state`` into ``module`` (the stem adapted to ``in_channels``), or one clear error listing
    missing/unexpected keys and shape mismatches: a checkpoint of another architecture never half-loads."""
    own = module.state_dict()
    if stem_key in state and state[stem_key].ndim == 4:
        state = {**state, stem_key: adapt_stem_weight(state[stem_key], in_channels)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"{path}: encoder weights do not fit this {what}."]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        lines.append("  Pick the encoder architecture the checkpoint was trained with.")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)


def _describe(channels: list[int]) -> str:
    return "stage channels " + "/".join(map(str, channels))


class SwinStages(nn.Module):
    """timm Swin Transformer run stage by stage, so a fusion module can act between stages (TMC's MCM).

    ``stem(x)`` is the 4×4 patch embedding, ``stage(i, v)`` the i-th stage (0-based; stages 1-3 begin
    with patch merging). Features are channels-last (B, H_i, W_i, C_i) at strides 4/8/16/32 with
    C_i = ``embed_dim``·2^i: Swin-Tiny is 96/192/384/768, depths 2/2/6/2. ``weights``: an optional local
    timm Swin checkpoint (the RGB patch embedding adapted to ``in_channels``), never downloaded.
    """

    def __init__(self, in_channels: int = 1, img_size: int = 224, embed_dim: int = 96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size: int = 7, weights: str | PathLike | None = None):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        self.in_channels = in_channels
        self.body = SwinTransformer(img_size=img_size, patch_size=4, in_chans=in_channels, embed_dim=embed_dim,
                                    depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                                    num_classes=0)
        self.out_channels = [embed_dim * 2**i for i in range(len(depths))]
        if weights is not None:
            state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith(_HEAD_PREFIX)}
            own = set(self.body.state_dict())
            # timm checkpoints keep the final norm and (for older ones) relative-position index buffers
            state = {k: v for k, v in state.items() if k in own or not (k.startswith("norm.") or "relative_position_index" in k)}
            load_checked(self.body, state, weights, in_channels, "patch_embed.proj.weight",
                         f"Swin ({_describe(self.out_channels)})")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.patch_embed(x)

    def stage(self, i: int, v: torch.Tensor) -> torch.Tensor:
        return self.body.layers[i](v)
