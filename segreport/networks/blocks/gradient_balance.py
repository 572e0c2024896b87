"""Gradient normalisation between two tasks that read the same features.

Measured on the interactive 3D model at initialisation: the attribute cross-entropy sends a gradient
60-90x larger than the mask loss into the shared encoder, because the mask logits start near zero. A
loss weight cannot fix that ratio for long (it changes as the mask learns); normalising the gradient
where the tasks share features can. :class:`GradientBalance` splits a shared tensor into a main view
(the mask's) and an auxiliary view (the attributes'); in backward the auxiliary gradient is rescaled
to at most ``ratio`` times the running norm of the main one (GradNorm's idea, Chen et al. ICML 2018,
without its extra backward pass). The attribute head itself still trains at full strength: only what
flows on into the shared trunk is bounded.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GradientBalance"]


class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.owner.rescale(grad), None


class GradientBalance(nn.Module):
    """``main, aux = balance(x)``: both equal ``x``; the gradient through ``aux`` is capped at ``ratio`` x
    the running (EMA) norm of the gradient through ``main`` (``ratio=0``: none at all). Until a main
    gradient has been seen, the auxiliary one passes unchanged. Identity in eval / without grad."""

    def __init__(self, ratio: float = 1.0, momentum: float = 0.9):
        super().__init__()
        self.ratio, self.momentum = float(ratio), float(momentum)
        self.register_buffer("main_norm", torch.zeros(()), persistent=False)

    def _observe(self, grad: torch.Tensor) -> None:
        n = grad.detach().float().norm()
        self.main_norm.copy_(n if float(self.main_norm) == 0 else self.momentum * self.main_norm + (1 - self.momentum) * n)

    def rescale(self, grad: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0:  # detached: the auxiliary task reads x, never moves it
            return torch.zeros_like(grad)
        ref = float(self.main_norm)
        n = float(grad.detach().float().norm())
        return grad if ref == 0 or n == 0 else grad * min(1.0, self.ratio * ref / n)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.training and torch.is_grad_enabled() and x.requires_grad):
            return x, x
        main = x.view_as(x)
        main.register_hook(self._observe)
        return main, _Rescale.apply(x, self)
