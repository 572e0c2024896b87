"""3D ViT image encoder with windowed local attention and interleaved global attention (SAM/ViTDet, in 3D).

Built from MONAI blocks: ``PatchEmbeddingBlock`` (conv patchify + learnable absolute position embedding)
and ``TransformerBlock`` (pre-norm self-attention + MLP). MONAI has no windowed 3D ViT, so the only
hand-written parts are the window partition around a ``TransformerBlock`` and SAM's neck.
Unlike SAM's encoder there is no relative position bias in the attention (MONAI's ``TransformerBlock``
does not expose one); position comes from the learnable absolute embedding of the patch embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["ViTImageEncoder3D", "WindowedBlock3D", "channel_layer_norm_3d", "self_attention_block"]


def channel_layer_norm_3d(channels: int) -> nn.Sequential:
    """LayerNorm over the channel axis of a (B, C, D, H, W) map, as SAM's LayerNorm2d.

    torch/MONAI only offer channel-last LayerNorm (GroupNorm(1, C) would also normalise over space),
    so wrap ``nn.LayerNorm`` in two einops rearranges.
    """
    return nn.Sequential(
        Rearrange("b c d h w -> b d h w c"), nn.LayerNorm(channels), Rearrange("b d h w c -> b c d h w")
    )


def self_attention_block(
    hidden_size: int, mlp_dim: int, num_heads: int, use_flash_attention: bool = True, **kwargs
) -> TransformerBlock:
    """MONAI ``TransformerBlock`` without cross-attention and without its unused cross-attention norm.

    ``use_flash_attention`` selects torch SDPA (the fused kernel, also the fastest on CPU). MONAI always
    builds ``norm_cross_attn`` (for checkpoint compatibility); left in, it is a parameter
    that never gets a gradient, which breaks DistributedDataParallel without find_unused_parameters.
    """
    block = TransformerBlock(hidden_size, mlp_dim, num_heads, use_flash_attention=use_flash_attention, **kwargs)
    block.norm_cross_attn = nn.Identity()
    return block


class WindowedBlock3D(nn.Module):
    """A MONAI ``TransformerBlock`` whose self-attention is restricted to non-overlapping w×w×w windows.

    LayerNorm and the MLP act per token, so running the whole block on window-partitioned tokens is
    exactly ViTDet's "partition around the attention only". ``window_size=0`` means global attention.
    The grid must be divisible by the window: padding would let padded tokens enter the attention.
    """

    def __init__(self, block: TransformerBlock, grid_size: Sequence[int], window_size: int = 0):
        super().__init__()
        self.block = block
        self.grid_size = tuple(int(g) for g in grid_size)
        self.window_size = int(window_size)
        if self.window_size and any(g % self.window_size for g in self.grid_size):
            raise ValueError(f"window_size {self.window_size} must divide the patch grid {self.grid_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d*h*w, C) tokens in PatchEmbeddingBlock's (d, h, w) raster order."""
        if not self.window_size:
            return self.block(x)
        w = self.window_size
        nd, nh, nw = (g // w for g in self.grid_size)
        pattern = "b (nd sd nh sh nw sw) c"
        windows = "(b nd nh nw) (sd sh sw) c"
        sizes = dict(nd=nd, nh=nh, nw=nw, sd=w, sh=w, sw=w)
        x = self.block(rearrange(x, f"{pattern} -> {windows}", **sizes))
        return rearrange(x, f"{windows} -> {pattern}", **sizes)


class ViTImageEncoder3D(nn.Module):
    """Vision encoder E_I: patchify → ViT blocks (local windows + global blocks) → neck to ``out_channels``.

    Output is an isotropic feature map (B, out_channels, D/p, H/p, W/p) at one scale, as the seed paper's
    "standard ViT with primary local window attention and several interleaved global attention layers".
    """

    def __init__(
        self,
        img_size: Sequence[int] | int = 128,
        patch_size: Sequence[int] | int = 16,
        in_channels: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 4,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        out_channels: int = 384,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
    ):
        super().__init__()
        self.img_size = ensure_tuple_rep(img_size, 3)
        patch = ensure_tuple_rep(patch_size, 3)
        if any(i % p for i, p in zip(self.img_size, patch)):
            raise ValueError(f"patch_size {patch} must divide img_size {self.img_size}")
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, patch))
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{depth - 1}")
        self.patch_embed = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=patch,
            hidden_size=embed_dim,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            dropout_rate=dropout_rate,
            spatial_dims=3,
        )
        self.blocks = nn.ModuleList(
            WindowedBlock3D(
                self_attention_block(
                    embed_dim, int(embed_dim * mlp_ratio), num_heads, dropout_rate=dropout_rate, qkv_bias=qkv_bias
                ),
                self.grid_size,
                window_size=0 if i in global_attn_indexes else window_size,
            )
            for i in range(depth)
        )
        # SAM's neck: 1x1 conv to the decoder width, then a 3x3 conv, each followed by channel LayerNorm.
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_channels, kernel_size=1, bias=False),
            channel_layer_norm_3d(out_channels),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            channel_layer_norm_3d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"image spatial size {tuple(x.shape[2:])} != encoder img_size {self.img_size}")
        tokens = self.patch_embed(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        d, h, w = self.grid_size
        return self.neck(rearrange(tokens, "b (d h w) c -> b c d h w", d=d, h=h, w=w))
