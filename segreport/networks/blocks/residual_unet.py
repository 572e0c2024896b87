"""A promptable residual-encoder U-Net from MONAI blocks (nnInteractive-style, with a cached encoder).

nnInteractive (Isensee et al., CVPR 2025 interactive 3D segmentation challenge winner) is a
residual-encoder U-Net (nnU-Net's ResEnc) that takes the positive clicks, the negative clicks and the
previous mask as extra input channels. Putting them at the input means the whole network reruns per
click. Here the same three prompt channels enter the DECODER instead, at every resolution, so the
encoder (the deep part: nnU-Net's ResEnc puts several residual blocks per stage in the encoder and a
single conv per stage in the decoder) runs once per ROI and is cached, and a click reruns the decoder
only (measured in benchmarks/bench_click_latency.py).

* :class:`ResidualEncoder3D`: stem + stages of MONAI ``UnetResBlock`` (conv-norm-act-conv-norm +
  residual, nnU-Net's block), stride 2 between stages, a 1x1 neck to the token width at the bottom.
* :func:`prompt_maps`: clicks -> positive/negative Gaussian balls, previous mask -> probability, at
  the ROI's size (what nnInteractive feeds as input channels).
* :class:`PromptFusionDecoder3D`: per level, transposed conv up + encoder skip + a 1x1 projection of
  the prompt maps at that resolution, then one conv; at full resolution the sum is normalised and
  activated only (a dense 3x3x3 conv there costs as much as the encoder's first stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.utils import ensure_tuple_rep
from torch import nn

from .vit3d import channel_layer_norm_3d

__all__ = ["ResidualEncoder3D", "PromptFusionDecoder3D", "PointwiseConv3d", "prompt_maps", "PROMPT_CHANNELS"]

PROMPT_CHANNELS = 3  # positive clicks, negative clicks, previous mask probability
_TAIL = 1e-8  # prompt-map values under this are 0 (prompt_maps)
_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})  # nnU-Net's


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 ``Conv3d`` (same parameters and state dict) computed as one matrix product over the channels.

    At batch 1, PyTorch's CPU heuristic sends small 3D convolutions to its generic im2col kernel
    (``slow_conv3d``), whose per-call overhead dominates a 1x1x1 kernel: measured 1-2 ms for the three
    prompt projections of a 32³ ROI, against a few hundredths of that for the product. Used for every
    1x1x1 convolution of the promptable U-Net, the encoder's neck included."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.weight.flatten(1), x.flatten(2))  # (O, C) @ (B, C, N) -> (B, O, N)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.view(x.shape[0], self.out_channels, *x.shape[2:])


class ResidualEncoder3D(nn.Module):
    """nnU-Net-style residual encoder: ``features[i]`` channels and ``blocks[i]`` residual blocks at stage i
    (stage 0 at full resolution, each later one at half the previous), then a neck to ``out_channels``.

    ``forward`` returns ``(grid, skips)``: the neck output at 1/2^(L-1) of the image (the token grid of
    the hybrid token encoder) and the stage outputs ``skips[i]`` (features[i] channels) for i < L - 1.
    """

    def __init__(self, in_channels: int = 1, features: Sequence[int] = (8, 16, 32, 64),
                 blocks: Sequence[int] = (1, 2, 3, 4), out_channels: int = 64):
        super().__init__()
        if len(features) != len(blocks) or len(features) < 2:
            raise ValueError(f"features and blocks need the same length >= 2, got {tuple(features)}, {tuple(blocks)}")
        self.features = tuple(int(f) for f in features)
        block = dict(spatial_dims=3, kernel_size=3, norm_name=_NORM, act_name=_ACT)
        self.stem = Convolution(3, in_channels, self.features[0], kernel_size=3, norm=_NORM, act=_ACT)
        stages, prev = [], self.features[0]
        for i, (f, n) in enumerate(zip(self.features, blocks)):
            layers = [UnetResBlock(in_channels=prev, out_channels=f, stride=1 if i == 0 else 2, **block)]
            layers += [UnetResBlock(in_channels=f, out_channels=f, stride=1, **block) for _ in range(int(n) - 1)]
            stages.append(nn.Sequential(*layers))
            prev = f
        self.stages = nn.ModuleList(stages)
        self.neck = nn.Sequential(PointwiseConv3d(prev, out_channels, bias=False), channel_layer_norm_3d(out_channels))
        self.downsampling = 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by {self.downsampling}")
        x, skips = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return self.neck(skips.pop()), skips


def _flush_tail(t: torch.Tensor) -> torch.Tensor:
    """``t`` with values under ``_TAIL`` set to 0. A product of three such factors, or sigmoid of a logit
    under -87, is a subnormal float (< 1.2e-38), and every layer that reads a map full of subnormals runs
    several times slower (measured: the decoder's full-resolution prompt projection 1.6 -> 0.3 ms); a
    change of at most 1e-8."""
    return torch.where(t < _TAIL, 0.0, t)


def _balls(points: torch.Tensor, size: tuple[int, ...], sigma: float) -> torch.Tensor:
    """(B, N, *size) Gaussian balls (peak 1, ``sigma`` voxels) at ``points`` (B, N, 3)."""
    axes = [torch.arange(s, device=points.device, dtype=torch.float32) for s in size]
    # separable: exp(-|x-p|^2 / 2s^2) = product over axes, so no (B, N, D*H*W) distance tensor
    g = [torch.exp(-((a.view(1, 1, -1) - points[..., i : i + 1].float()) ** 2) / (2 * sigma**2)) for i, a in enumerate(axes)]
    g = [_flush_tail(t) for t in g]
    return g[0][..., :, None, None] * g[1][..., None, :, None] * g[2][..., None, None, :]


@torch.no_grad()
def prompt_maps(points: torch.Tensor, labels: torch.Tensor, size: Sequence[int],
                mask_prompt: torch.Tensor | None = None, sigma: float = 1.5) -> torch.Tensor:
    """(B, 3, *size): Gaussian balls (peak 1, ``sigma`` voxels) at the positive and at the negative
    clicks (max over clicks), and the previous mask's probability (sigmoid of ``mask_prompt`` logits,
    resized; 0 without one). ``points`` (B, N, 3) are ROI voxel coordinates; padding (-1) labels count in neither.
    """
    size = tuple(int(s) for s in ensure_tuple_rep(size, 3))
    b = labels.shape[0]
    out = points.new_zeros((b, PROMPT_CHANNELS, *size), dtype=torch.float32)
    if points.shape[1]:
        balls = _balls(points, size, sigma)  # (B, N, D, H, W)
        for channel, label in ((0, 1), (1, 0)):
            keep = (labels == label).to(balls.dtype).view(b, -1, 1, 1, 1)
            out[:, channel] = (balls * keep).amax(1)
    if mask_prompt is not None:
        prob = torch.sigmoid(mask_prompt.float())
        if tuple(prob.shape[2:]) != size:
            prob = F.interpolate(prob, size=size, mode="trilinear", align_corners=False)
        out[:, 2] = _flush_tail(prob[:, 0])
    return out


class PromptFusionDecoder3D(nn.Module):
    """The decoder of :class:`ResidualEncoder3D` with the prompt maps fused in at every level.

    Level i (from the bottom up): ``x = up_i(x) + skip_i + proj_i(maps at level i)``, then one conv
    (conv-norm-act) for i > 0; at full resolution (i = 0) norm + activation only. Returns the
    full-resolution features (``features[0]`` channels), the ones the mask hypernetwork and the attribute
    pooling read. (A 3x3x3 conv at full resolution was measured: better clicks, worse attributes, ROI
    growth and zero-click recall; docs/results-history.md.)
    """

    def __init__(self, features: Sequence[int], in_channels: int, prompt_channels: int = PROMPT_CHANNELS):
        super().__init__()
        self.features = tuple(int(f) for f in features)
        ups, projs, convs, prev = [], [], [], in_channels
        for i in reversed(range(len(self.features) - 1)):
            f = self.features[i]
            ups.append(get_conv_layer(3, prev, f, kernel_size=2, stride=2, conv_only=True, is_transposed=True))
            projs.append(PointwiseConv3d(prompt_channels, f))
            convs.append(Convolution(3, f, f, kernel_size=3, norm=_NORM, act=_ACT) if i > 0
                         else nn.Sequential(nn.InstanceNorm3d(f, affine=True), nn.LeakyReLU(0.01)))
            prev = f
        self.ups, self.projs, self.convs = nn.ModuleList(ups), nn.ModuleList(projs), nn.ModuleList(convs)
        # the bottleneck sees the prompt maps too (max-pooled, so a click never vanishes)
        self.bottleneck_proj = PointwiseConv3d(prompt_channels, in_channels)

    def fuse_bottleneck(self, grid: torch.Tensor, maps: torch.Tensor | PromptPyramid) -> torch.Tensor:
        return grid + self.bottleneck_proj(PromptPyramid.of(maps).at(grid.shape[2:]))

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], maps: torch.Tensor | PromptPyramid) -> torch.Tensor:
        maps = PromptPyramid.of(maps)
        for up, proj, conv, skip in zip(self.ups, self.projs, self.convs, reversed(skips)):
            x = conv(up(x) + skip + proj(maps.at(skip.shape[2:])))
        return x


class PromptPyramid:
    """The prompt maps max-pooled to each size asked for, each level from the one twice its size (the
    U-Net's sizes halve, and a 2³ pool of a 2³ pool is exactly the 4³ pool): a click's decoder reads
    the full-size maps once, not once per level."""

    def __init__(self, maps: torch.Tensor):
        self.full = tuple(int(s) for s in maps.shape[2:])  # ints, also when traced (sizes are tensors then)
        self.levels = {self.full: maps}

    @classmethod
    def of(cls, maps: torch.Tensor | PromptPyramid) -> PromptPyramid:
        return maps if isinstance(maps, PromptPyramid) else cls(maps)

    def at(self, size: Sequence[int]) -> torch.Tensor:
        size = tuple(int(s) for s in size)
        if size not in self.levels:
            double = tuple(2 * s for s in size)
            parent = double if all(f % d == 0 for f, d in zip(self.full, double)) else self.full
            source = self.at(parent)
            factor = [a // b for a, b in zip(parent, size)]
            self.levels[size] = _halve_max(source) if factor == [2, 2, 2] else F.max_pool3d(source, kernel_size=factor, stride=factor)
        return self.levels[size]


def _halve_max(x: torch.Tensor) -> torch.Tensor:
    """``max_pool3d(x, 2, 2)`` of even-sized (B, C, D, H, W) as three maxima of even and odd slices: the
    same numbers, about ten times faster on a CPU at batch 1 (measured 0.09 vs 0.96 ms for 3 x 32³)."""
    x = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    x = torch.maximum(x[:, :, :, 0::2], x[:, :, :, 1::2])
    return torch.maximum(x[..., 0::2], x[..., 1::2])
