"""Baselines of seed 001's comparison tables, as thin factories over MONAI networks.

* Table 2 "Baseline (UNet)": a 3D U-Net segmenting the lesion ROI without prompts (MONAI ``BasicUNet``,
  two conv blocks per level like Ronneberger et al.).
* Table 3 "Baseline (CNN)": a 3D CNN classifying the five attribute groups from the ROI (a MONAI 3D
  ``ResNet`` trunk, pooled, one softmax head per group).

Both take the same (B, C, D, H, W) ROI as ``LesionPromptNet``; the attribute classifier returns the
same ``{group: logits}`` dict, so ``LesionReportLoss`` and the attribute metrics apply unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import BasicUNet, ResNet
from torch import nn

from segreport.vocab import ATTRIBUTE_NUM_CLASSES

__all__ = ["unet_baseline", "AttributeCNN"]


def unet_baseline(
    in_channels: int = 1, out_channels: int = 1, features: Sequence[int] = (32, 32, 64, 128, 256, 32)
) -> BasicUNet:
    """Seg-only 3D U-Net baseline; ``features`` are BasicUNet's six widths (use e.g. (4,)*6 in tests)."""
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=tuple(features))


class AttributeCNN(nn.Module):
    """3D ResNet attribute classifier: pooled trunk features -> one linear head per attribute group.

    Args:
        in_channels: ROI channels (1 for the image; 2 to also give it the lesion mask).
        layers, block_inplanes: ResNet stages (default ResNet-10 widths 64..512).
        attribute_groups: {group: number of classes}; default the five groups of ``segreport.vocab``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        layers: Sequence[int] = (1, 1, 1, 1),
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        attribute_groups: Mapping[str, int] | None = None,
    ):
        super().__init__()
        groups = dict(ATTRIBUTE_NUM_CLASSES if attribute_groups is None else attribute_groups)
        self.trunk = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=3,
            n_input_channels=in_channels,
            feed_forward=False,  # return pooled features; the per-group heads replace the single fc
        )
        self.heads = nn.ModuleDict({name: nn.Linear(block_inplanes[-1], n) for name, n in groups.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        return {name: head(features) for name, head in self.heads.items()}
