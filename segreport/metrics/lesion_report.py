"""The 3D lesion report's validation score: lesion Dice and attribute accuracy, one number to select on."""

from __future__ import annotations

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from ..transforms.attributes import IGNORE_INDEX
from ..vocab import ATTRIBUTE_NAMES
from .segmentation import dice as dice_score


class LesionReportScore(Metric):
    """Validation score for checkpoint selection: mean of lesion Dice and average attribute accuracy.

    Selecting on Dice alone would keep a model whose attribute head has collapsed (and vice versa);
    a task a model does not have (U-Net: attributes; CNN: masks) is left out of the mean. Kept as
    sums, so ignite all-reduces them across ranks in distributed validation.
    """

    @reinit__is_reduced
    def reset(self):
        self._dice_sum = torch.zeros((), dtype=torch.float64)
        self._n_dice = torch.zeros((), dtype=torch.float64)
        self._correct = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float64)
        self._labelled = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output):
        pred, targets = output
        if "mask_logits" in pred:
            p = (pred["mask_logits"][:, :1] > 0).cpu().numpy()
            g = (targets["label"] > 0.5).cpu().numpy()
            self._dice_sum += sum(dice_score(p[i, 0], g[i, 0]) for i in range(len(p)))
            self._n_dice += len(p)
        if "attr_logits" in pred:
            true = targets["attributes"].cpu()
            for i, group in enumerate(ATTRIBUTE_NAMES):
                known = true[:, i] != IGNORE_INDEX
                hit = pred["attr_logits"][group].argmax(-1).cpu() == true[:, i]
                self._correct[i] += float((hit & known).sum())
                self._labelled[i] += float(known.sum())

    @sync_all_reduce("_dice_sum", "_n_dice", "_correct", "_labelled")
    def compute(self):
        parts = []
        if self._n_dice > 0:
            parts.append(float(self._dice_sum / self._n_dice))
        labelled = self._labelled > 0
        if labelled.any():  # mean over the groups that have labels, as attribute_accuracy's average
            parts.append(float((self._correct[labelled] / self._labelled[labelled]).mean()))
        return float(np.mean(parts)) if parts else 0.0
