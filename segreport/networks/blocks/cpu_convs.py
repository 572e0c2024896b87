"""Batch-1 3D convolutions on the CPU at the speed PyTorch gives batch 2.

At batch 1 PyTorch's CPU heuristic sends a ``Conv3d`` to its generic im2col kernel (``slow_conv3d``) and a
``ConvTranspose3d`` to ``slow_conv_transpose3d``; from batch 2 on it calls oneDNN. An interactive session
runs batch 1 (one ROI, one click), so it paid the slow path: measured on one CPU thread, a 16 -> 16
channel 3³ convolution over 16³ took 9.6 ms at batch 1 and 2.0 ms at batch 2 (both samples), 0.78 ms
through oneDNN at batch 1; the bundle's full pass 127 -> 48 ms. Same parameters, same state dict, same
numbers (to float rounding):

* :class:`OneDNNConv3d`: ``torch.mkldnn_convolution`` for batch-1 float32 CPU inputs without gradient
  (training runs batch 4, oneDNN already, and keeps autograd's own path);
* :class:`PatchConvTranspose3d`: a transposed convolution whose kernel equals its stride (a U-Net's
  up-sampling) is one matrix product per voxel, reshaped into the patches it writes.

:func:`fast_cpu_convs` switches a model's layers to them in place.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OneDNNConv3d", "PatchConvTranspose3d", "fast_cpu_convs"]


def _onednn_applies(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether ``x`` is a batch-1 float32 CPU input without gradient: PyTorch would run its reference kernel,
    and oneDNN is exact and faster."""
    return (x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and not (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, *params))))


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that calls oneDNN at batch 1 on the CPU (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not _onednn_applies(x, self.weight, self.bias):
            return super().forward(x)
        return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)


class PatchConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with kernel = stride, no padding, one group: each input voxel writes its own
    kernel-sized patch, so the layer is (C_in) @ (C_in, C_out * k³) per voxel and a reshape."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        k = tuple(self.kernel_size)
        if output_size is not None or not _onednn_applies(x, self.weight, self.bias):
            return super().forward(x, output_size)
        b, c, d, h, w = x.shape
        o = self.out_channels
        y = torch.matmul(x.flatten(2).transpose(1, 2), self.weight.reshape(c, -1))  # (B, DHW, O * k³)
        y = y.view(b, d, h, w, o, *k).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, o, d * k[0], h * k[1], w * k[2])
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1, 1)


def fast_cpu_convs(module: nn.Module) -> nn.Module:
    """Switch ``module``'s plain ``Conv3d`` layers to :class:`OneDNNConv3d` and its patch-writing
    ``ConvTranspose3d`` layers to :class:`PatchConvTranspose3d`, in place (same parameters: the class
    changes, nothing else). Subclasses with their own forward (``PointwiseConv3d``) are left alone."""
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = OneDNNConv3d
        elif (type(m) is nn.ConvTranspose3d and tuple(m.kernel_size) == tuple(m.stride) and not any(m.padding)
              and not any(m.output_padding) and m.groups == 1 and tuple(m.dilation) == (1, 1, 1)):
            m.__class__ = PatchConvTranspose3d
    return module
