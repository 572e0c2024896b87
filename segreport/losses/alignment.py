"""Multi-stage image-text alignment loss (TMC, Sec. 3.2), as printed and as in-batch contrastive variants.

Each stage gives a pooled visual embedding, the stage's [CLS] embedding and a learnable logit scale
1/τ (the network holds it, so the optimiser sees it). ``s = cos(z_v, z_t) / τ``.

- ``"paper"``: the formula as printed, ``-log σ(s) - log(1 - σ(s))``. Its minimum is at ``s = 0``: it
  pushes every image and its own text to orthogonality, whatever the text says. Kept as written, for
  the paper's configuration and the comparison in ``benchmarks/bench_tmc_quality.py``.
- ``"infonce"``: CLIP's symmetric cross-entropy over the batch's image-text similarity matrix.
  Slices of one case often share a sentence, so every pair whose texts are identical counts as a
  positive (soft targets spread over them), never as a negative.
- ``"sigmoid"``: SigLIP's pairwise loss, ``-log σ(±s)`` with + for same-text pairs and - otherwise.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("paper", "infonce", "sigmoid")


def same_text(tokens: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows whose token ids are identical (the same sentence)."""
    return (tokens[:, None, :] == tokens[None, :, :]).all(-1)


class MultiStageAlignmentLoss(nn.Module):
    """Mean over stages of the chosen variant (module docstring); 0 when the network aligns no stage."""

    def __init__(self, variant: str = "infonce"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"alignment loss variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    def forward(self, align: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        if not align:
            return torch.zeros(())
        losses = []
        for z_v, z_t, scale in align:
            z_v, z_t = F.normalize(z_v.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
            if self.variant == "paper":
                s = (z_v * z_t).sum(-1) * scale
                losses.append((-F.logsigmoid(s) - F.logsigmoid(-s)).mean())
                continue
            if tokens is None:
                raise ValueError(f"the {self.variant!r} alignment loss needs the batch's tokens (which pairs match)")
            logits = z_v @ z_t.T * scale
            positive = same_text(tokens).float()
            if self.variant == "infonce":
                targets = positive / positive.sum(1, keepdim=True)
                losses.append(0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)))
            else:
                losses.append(-F.logsigmoid((2 * positive - 1) * logits).mean())
        return torch.stack(losses).mean()


class SegAlignLoss(nn.Module):
    """TMC's objective (Sec. 3.4): BCE (+ ``w_dice``·Dice, optional) + ``lambda_align``·L_align.

    Called by the engine as ``loss(pred, targets)`` with ``targets = {"label", "tokens"}``; the last
    components are kept on ``self.last`` for logging.
    """

    def __init__(self, lambda_align: float = 0.1, variant: str = "infonce", w_dice: float = 0.0):
        super().__init__()
        from monai.losses import DiceCELoss

        self.seg = DiceCELoss(sigmoid=True, lambda_dice=float(w_dice), lambda_ce=1.0)
        self.align = MultiStageAlignmentLoss(variant)
        self.lambda_align = float(lambda_align)
        self.last: dict[str, float] = {}

    def forward(self, pred: dict, targets: dict) -> torch.Tensor:
        seg = self.seg(pred["seg_logits"], targets["label"])
        total = seg
        if self.lambda_align and pred.get("align"):
            align = self.align(pred["align"], targets.get("tokens"))
            total = total + self.lambda_align * align
            self.last = {"seg": float(seg), "align": float(align)}
        else:
            self.last = {"seg": float(seg)}
        return total
