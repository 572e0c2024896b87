"""Dual-objective loss of seed 001: L_total = L_seg + λ·L_attr (+ SAM's IoU-prediction MSE).

L_seg is soft Dice (eq. 5; MONAI ``DiceLoss``), optionally plus voxel BCE; L_attr is categorical
cross-entropy summed over the attribute groups (eq. 6), with ``ignore_index`` for lesions whose
attribute is unknown. The paper calls λ "adaptive" without saying how; ``adaptive_lambda=True`` learns
it by homoscedastic uncertainty weighting (Kendall et al., CVPR 2018), which needs the loss module's
parameter in the optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from segreport.transforms.attributes import IGNORE_INDEX
from segreport.vocab import ATTRIBUTE_NAMES

__all__ = ["LesionReportLoss", "attribute_cross_entropy"]


def attribute_cross_entropy(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = -100,
                            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over the annotated samples; with ``weight`` (B,) each sample's CE is scaled by it first
    (importance weights of a balanced loader: the mean is then that of the natural mix, so the head keeps
    the natural prior of the classes while the masks see the rare lesions more often)."""
    y = y.to(logits.device).long()
    if weight is None:
        return F.cross_entropy(logits, y, ignore_index=ignore_index)
    ce = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")
    valid = y != ignore_index
    return (ce * weight.to(ce))[valid].sum() / valid.sum().clamp(min=1)


class LesionReportLoss(nn.Module):
    """Segmentation + attribute (+ IoU) loss for ``LesionPromptNet`` outputs.

    Args:
        lambda_attr: weight λ of the attribute term (the starting value when ``adaptive_lambda``).
        lambda_bce: weight of voxel BCE added to Dice (0 = Dice only, as eq. 5). In our single-sample
            overfit runs 0.2 converged fastest; 1.0 first collapsed to an empty mask.
        lambda_iou: weight of the IoU-prediction MSE (0 disables it).
        adaptive_lambda: learn λ = exp(-s) with the regulariser s/2 (uncertainty weighting).
        attribute_names: group order used when attribute targets come as a (B, G) tensor.
        ignore_index: attribute target value meaning "not annotated".
        lambda_warmup: loss scheduling: λ ramps linearly from 0 over this many training calls (0 = off),
            so the mask learns first; counted on calls with gradient enabled.

    With several masks per sample (multimask output) the segmentation loss keeps, per sample, the best
    mask only, as SAM does, so the masks can specialise.

    Measured on the tiny ``LesionPromptNet`` at initialisation: the attribute CE sends a gradient 60-90x
    larger than the segmentation term into the shared encoders (the mask logits start near 0), and with
    λ = 1 a single-sample overfit does not learn its mask within 60 Adam steps (λ = 0: 40-65 steps).
    Start with a small λ (``lambda_attr`` is a plain attribute, so a schedule can raise it) if the mask
    lags early in training.
    """

    def __init__(
        self,
        lambda_attr: float = 1.0,
        lambda_bce: float = 0.0,
        lambda_iou: float = 1.0,
        adaptive_lambda: bool = False,
        attribute_names: Sequence[str] = ATTRIBUTE_NAMES,
        ignore_index: int = -100,
        lambda_warmup: int = 0,
    ):
        super().__init__()
        self.lambda_warmup = int(lambda_warmup)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training calls so far (the schedule's clock)
        if lambda_attr <= 0 and adaptive_lambda:
            raise ValueError("adaptive_lambda needs a positive starting lambda_attr")
        self.lambda_bce, self.lambda_iou = lambda_bce, lambda_iou
        self.attribute_names = tuple(attribute_names)
        self.ignore_index = ignore_index
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        self.lambda_attr = lambda_attr
        # s = -log λ, so λ starts at lambda_attr
        self.log_var = nn.Parameter(-torch.log(torch.tensor(float(lambda_attr)))) if adaptive_lambda else None

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]],
        target_mask: torch.Tensor | None = None,
        target_attributes: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        attribute_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args:
            outputs: model outputs: ``mask_logits`` (B, M, D, H, W), ``iou_pred`` (B, M) and
                ``attr_logits`` {group: (B, classes)}, each optional (a seg-only or attribute-only
                baseline gives just one; wrap ``AttributeCNN``'s dict as ``{"attr_logits": ...}``).
            target_mask: (B, 1, D, H, W) binary lesion mask, needed with ``mask_logits``.
            target_attributes: {group: (B,) class ids} or (B, G) in ``attribute_names`` order; None or
                ``ignore_index`` entries contribute nothing.
            attribute_weight: (B,) per-sample weight of the attribute CE (:func:`attribute_cross_entropy`).

        Returns:
            (total, components): components holds detached ``seg``, ``dice_loss``, ``bce``, ``attr``,
            ``attr/<group>``, ``iou`` and ``lambda_attr``.
        """
        ref = outputs.get("mask_logits")
        if ref is None:
            ref = next(iter(outputs["attr_logits"].values()))
        zero = ref.new_zeros(())
        seg = attr = iou = zero
        parts: dict[str, torch.Tensor] = {}
        logits = outputs.get("mask_logits")
        if logits is not None:
            if target_mask is None:
                raise ValueError("outputs have mask_logits but no target_mask was given")
            target = target_mask.to(logits.dtype).expand_as(logits)
            dice = self.dice(logits, target).flatten(1)  # (B, M)
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)
            seg_per_mask = dice + self.lambda_bce * bce
            best = seg_per_mask.detach().argmin(1, keepdim=True)
            seg = seg_per_mask.gather(1, best).mean()
            parts.update(dice_loss=dice.gather(1, best).mean(), bce=bce.gather(1, best).mean())

        if target_attributes is not None and "attr_logits" in outputs:
            for name, group_logits in outputs["attr_logits"].items():
                y = self._group_target(target_attributes, name)
                if y is None or not bool((y != self.ignore_index).any()):
                    continue  # CE over zero labelled samples is NaN; skip the group
                ce = attribute_cross_entropy(group_logits, y, self.ignore_index, attribute_weight)
                parts[f"attr/{name}"] = ce
                attr = attr + ce

        if self.lambda_iou > 0 and logits is not None and "iou_pred" in outputs:
            with torch.no_grad():  # the target IoU of each predicted mask is a constant
                pred = logits > 0
                inter = (pred & (target > 0.5)).flatten(2).sum(-1).float()
                union = (pred | (target > 0.5)).flatten(2).sum(-1).float()
                iou_target = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            iou = F.mse_loss(outputs["iou_pred"].float(), iou_target)

        ramp = 1.0
        if self.lambda_warmup > 0:
            ramp = min(1.0, float(self.steps) / self.lambda_warmup)
            if torch.is_grad_enabled():
                self.steps += 1
        if self.log_var is None:
            lam = ref.new_tensor(self.lambda_attr * ramp)
            total = seg + lam * attr + self.lambda_iou * iou
        else:
            lam = torch.exp(-self.log_var) * ramp
            # the regulariser only where the attribute term exists, else it would drive s to -inf
            reg = 0.5 * self.log_var * ramp if any(k.startswith("attr/") for k in parts) else zero
            total = seg + lam * attr + reg + self.lambda_iou * iou
        parts.update(seg=seg, attr=attr, iou=iou, lambda_attr=lam)
        return total, {k: v.detach() for k, v in parts.items()}

    def _group_target(
        self, targets: Mapping[str, torch.Tensor] | torch.Tensor, name: str
    ) -> torch.Tensor | None:
        if isinstance(targets, Mapping):
            return targets.get(name)
        if name not in self.attribute_names:
            raise KeyError(f"attribute group {name!r} is not in attribute_names {self.attribute_names}")
        return targets[:, self.attribute_names.index(name)]


class LesionReportObjective(nn.Module):
    """The engine's ``loss(pred, targets)``: seed 001's L_seg + λ·L_attr (:class:`LesionReportLoss`) for
    the interactive model and the U-Net; attribute cross-entropy alone for the CNN attribute baseline.

    The last loss components are kept on ``self.last`` (floats) for logging.
    """

    def __init__(self, loss: LesionReportLoss | None = None, **loss_kwargs: Any):
        super().__init__()
        self.loss = loss if loss is not None else LesionReportLoss(ignore_index=IGNORE_INDEX, **loss_kwargs)
        self.last: dict[str, float] = {}

    def forward(self, pred: Mapping, targets: Mapping) -> torch.Tensor:
        attrs = targets.get("attributes")
        if "mask_logits" in pred:
            total, parts = self.loss(pred, targets["label"], attrs, targets.get("attr_weight"))
        else:
            total, parts = _attribute_ce(pred["attr_logits"], attrs, targets.get("attr_weight"))
        self.last = {k: float(v) for k, v in parts.items()}
        return total


def _attribute_ce(logits: Mapping[str, torch.Tensor], targets: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sum over groups of categorical CE (eq. 6); groups with no annotated sample are skipped."""
    total = next(iter(logits.values())).new_zeros(())
    parts = {}
    for i, group in enumerate(ATTRIBUTE_NAMES):
        y = targets[:, i].long()
        if bool((y != IGNORE_INDEX).any()):
            ce = attribute_cross_entropy(logits[group], y, IGNORE_INDEX, weight)
            parts[f"attr/{group}"] = ce.detach()
            total = total + ce
    parts["attr"] = total.detach()
    return total, parts
