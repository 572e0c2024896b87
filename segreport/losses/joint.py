"""MedSegText's joint loss: w_seg·(Dice + BCE) + w_text·CE, fixed or uncertainty-weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["JointLoss"]

WEIGHTINGS = ("fixed", "uncertainty")


class JointLoss(nn.Module):
    """Segmentation (Dice + BCE on logits) plus next-token cross-entropy with PAD ignored.

    ``weighting="fixed"`` is the paper's ``w_seg·L_seg + w_text·L_text``. ``"uncertainty"`` learns
    one log-variance s_i per task (Kendall, Gal & Cipolla, CVPR 2018) and minimises
    ``Σ exp(-s_i)·w_i·L_i + s_i``: the seed's text head collapsed under fixed Seg=1 / Text=0.5
    (BLEU-4 0.0035) and only recovered after re-tuning weights and learning rate by hand; learned
    weights rebalance the two tasks by their own noise level instead. In that mode optimise
    ``loss.parameters()`` together with the model's.

    Call ``loss(outputs, seg_target=None, text_target=None) -> dict`` where ``outputs`` is the
    model's dict and ``text_target`` [B, L] is aligned with ``text_logits`` [B, L, V] (teacher
    forcing: feed ``tokens[:, :-1]``, score on ``tokens[:, 1:]``). A task whose output or target is
    missing is skipped (seg-only and text-only models). The dict holds ``"total"`` (to
    backpropagate) and detached components for logging: ``seg``, ``dice``, ``bce``, ``text`` and,
    with uncertainty weighting, ``s_seg``/``s_text``.
    """

    def __init__(self, w_seg: float = 1.0, w_text: float = 1.0, pad_id: int = 0, weighting: str = "fixed"):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.w_seg, self.w_text, self.pad_id, self.weighting = w_seg, w_text, pad_id, weighting
        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()
        # log-variances s_seg, s_text; 0 = weight 1 at the start, i.e. the fixed loss.
        self.log_vars = nn.Parameter(torch.zeros(2)) if weighting == "uncertainty" else None

    def segmentation_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Dice, BCE) of mask logits [B, C, H, W] against a binary target [B, C, H, W] or [B, H, W]."""
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape != logits.shape:
            raise ValueError(f"seg_target shape {tuple(target.shape)} does not match seg_logits {tuple(logits.shape)}")
        target = target.to(logits.dtype)
        return self.dice(logits, target), self.bce(logits, target)

    def text_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of next-token logits [B, L, V] against aligned targets [B, L] (PAD ignored)."""
        if logits.shape[:2] != target.shape:
            raise ValueError(
                f"text_logits {tuple(logits.shape)} and text_target {tuple(target.shape)} are not aligned: "
                "feed the model tokens[:, :-1] and pass tokens[:, 1:] as text_target"
            )
        if not (target != self.pad_id).any():
            return logits.sum() * 0.0  # nothing to predict; keeps the graph without a NaN mean
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=self.pad_id)

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        seg_target: torch.Tensor | None = None,
        text_target: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        terms: list[tuple[int, float, torch.Tensor]] = []  # (task index, weight, loss)
        parts: dict[str, torch.Tensor] = {}
        if "seg_logits" in outputs and seg_target is not None:
            dice, bce = self.segmentation_loss(outputs["seg_logits"], seg_target)
            terms.append((0, self.w_seg, dice + bce))
            parts.update(dice=dice.detach(), bce=bce.detach(), seg=(dice + bce).detach())
        if "text_logits" in outputs and text_target is not None:
            ce = self.text_loss(outputs["text_logits"], text_target)
            terms.append((1, self.w_text, ce))
            parts["text"] = ce.detach()
        if not terms:
            raise ValueError(
                "JointLoss got nothing to score: pass seg_target with seg_logits and/or text_target with text_logits"
            )

        total = 0.0
        for task, weight, loss in terms:
            if self.log_vars is None:
                total = total + weight * loss
            else:
                s = self.log_vars[task]
                total = total + torch.exp(-s) * weight * loss + s
                parts[("s_seg", "s_text")[task]] = s.detach()
        return {"total": total, **parts}


class MedSegTextLoss(nn.Module):
    """Adapts :class:`segreport.losses.JointLoss` to the engine's ``loss(pred, targets)`` call.

    The last components are kept on ``self.last`` so a handler can log seg and text losses apart.
    """

    def __init__(self, joint_loss: torch.nn.Module):
        super().__init__()
        self.joint = joint_loss
        self.last: dict[str, float] = {}

    def forward(self, pred: dict, targets: dict) -> torch.Tensor:
        text_target = targets["tokens"][:, 1:] if "tokens" in targets else None
        out = self.joint(pred, seg_target=targets["label"], text_target=text_target)
        self.last = {k: float(v) for k, v in out.items() if k != "total"}
        return out["total"]
