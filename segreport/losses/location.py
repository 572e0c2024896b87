"""LAPFT's objective (seed 004, eq. 4): 0.3·ℓ_s(M) + 0.6·ℓ_s(S) + 0.1·ℓ_c.

ℓ_s = 0.5·Dice + 0.5·CE on the coarse mask M and on the final mask S (logits, sigmoid); ℓ_c, the GPFC
location loss, is BCE-with-logits of each stage's six-zone logits against the zones of the sentence
(:class:`segreport.transforms.findings.LungZonesFromText`), summed over the four stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocationAwareLoss(nn.Module):
    """Called by the engine as ``loss(pred, targets)`` with ``targets = {"label", "zones"}``; the last
    components are kept on ``self.last`` for logging. ``w_zones=0`` drops ℓ_c (QGAF without GPFC)."""

    def __init__(self, w_coarse: float = 0.3, w_final: float = 0.6, w_zones: float = 0.1):
        super().__init__()
        from monai.losses import DiceCELoss

        self.seg = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)
        self.w_coarse, self.w_final, self.w_zones = float(w_coarse), float(w_final), float(w_zones)
        self.last: dict[str, float] = {}

    def forward(self, pred: dict, targets: dict) -> torch.Tensor:
        label = targets["label"]
        coarse, final = self.seg(pred["coarse_logits"], label), self.seg(pred["seg_logits"], label)
        total = self.w_coarse * coarse + self.w_final * final
        self.last = {"coarse": float(coarse), "final": float(final)}
        zone_logits = pred.get("zone_logits")
        if self.w_zones and zone_logits is not None and zone_logits.shape[1]:
            zones = targets["zones"].float()[:, None].expand_as(zone_logits)
            location = F.binary_cross_entropy_with_logits(zone_logits, zones, reduction="none").mean((0, 2)).sum()
            total = total + self.w_zones * location
            self.last["location"] = float(location)
        return total
