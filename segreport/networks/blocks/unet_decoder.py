"""U-Net decoder over a four-level feature pyramid (MedSegText's segmentation branch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.basic_unet import UpCat
from torch import nn

__all__ = ["UNetDecoder"]


class UNetDecoder(nn.Module):
    """From the deepest map: transpose-conv up, concatenate the skip, DoubleConv; 1x1 head; resize.

    ``features`` are [f1, ..., fN] from shallow to deep. Each stage is MONAI's ``UpCat``: a 2x2
    transpose convolution halving the channels (classic U-Net), concatenation with the skip
    (padding by one pixel where a floor-halving encoder left an odd size), then two Conv-BN-ReLU
    blocks (the paper's DoubleConv). A 1x1 convolution gives the logits, which are bilinearly
    resized to the input size because f1 is already at stride 4.

    Args:
        encoder_channels: channels of f1..fN.
        out_channels: output logit channels (1 for a binary lesion mask).
        decoder_channels: output channels of the N-1 up stages, deepest first; defaults to the skip
            channels (f_{N-1}, ..., f1), the classic symmetric U-Net.
        spatial_dims: 2 for slices; 3 works too (trilinear resize).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        out_channels: int = 1,
        decoder_channels: Sequence[int] | None = None,
        spatial_dims: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        skips = list(encoder_channels[:-1])[::-1]
        decoder_channels = list(decoder_channels or skips)
        if len(decoder_channels) != len(skips):
            raise ValueError(f"decoder_channels needs {len(skips)} entries (one per skip), got {decoder_channels}")
        self.spatial_dims = spatial_dims
        stages = []
        in_ch = encoder_channels[-1]
        for skip_ch, out_ch in zip(skips, decoder_channels):
            stages.append(
                UpCat(spatial_dims, in_ch, skip_ch, out_ch, act="relu", norm="batch", bias=False,
                      dropout=dropout, upsample="deconv", halves=True)
            )
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.head = Convolution(spatial_dims, in_ch, out_channels, kernel_size=1, conv_only=True)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        x = features[-1]
        for stage, skip in zip(self.stages, reversed(features[:-1])):
            x = stage(x, skip)
        x = self.head(x)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return F.interpolate(x, size=tuple(output_size), mode=mode, align_corners=False)
