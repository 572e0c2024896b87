"""A promptable 3D "model" that is a classic region grower, for tests of the session's and the automatic
mode's geometry: exact, so what a test measures is the geometry, not a network.

``encode_image``: the ROI itself; ``decode``: the bright component (windowed > 0.6) under the positive
clicks, without the components under negative ones; ``forward`` with no click (what the automatic mode's
sliding window runs): every bright component of each ROI.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from segreport.vocab import ATTRIBUTE_NUM_CLASSES

BRIGHT = 0.6  # of the lung window: a -50 HU lesion is above, -850 HU lung below


def _logits(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(mask, 8.0, -8.0).astype(np.float32))[None, None]


class RegionGrower(nn.Module):
    """Module docstring. ``false_positives``: decode also returns every other bright component that
    touches the ROI border (what a weak model does)."""

    def __init__(self, roi: int = 16, spacing=(4.0, 4.0, 4.0), false_positives: bool = False):
        super().__init__()
        self.false_positives = false_positives
        self.img_size = (roi,) * 3
        self.spec = {"spacing": list(spacing), "window": "lung", "axcodes": "RAS"}
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode_image(self, roi: torch.Tensor) -> torch.Tensor:
        return roi

    def decode(self, embedding, points=None, point_labels=None, mask_prompt=None, multimask_output=False) -> dict:
        bright, _ = ndimage.label(embedding[0, 0].numpy() > BRIGHT)
        mask = np.zeros(self.img_size, bool)
        if points is not None:
            for p, lab in zip(points[0].numpy(), point_labels[0].numpy()):
                comp = bright[tuple(np.clip(np.rint(p).astype(int), 0, np.asarray(self.img_size) - 1))]
                if comp:
                    mask = mask | (bright == comp) if lab == 1 else mask & (bright != comp)
        if self.false_positives:
            border = np.unique(np.concatenate([bright[0].ravel(), bright[-1].ravel(), bright[:, 0].ravel(),
                                               bright[:, -1].ravel(), bright[:, :, 0].ravel(), bright[:, :, -1].ravel()]))
            mask |= np.isin(bright, border[border > 0])
        logits = _logits(mask)
        return {"mask_logits": logits, "low_res_logits": logits, "iou_pred": torch.ones(1, 1),
                "attr_logits": {g: torch.zeros(1, n) for g, n in ATTRIBUTE_NUM_CLASSES.items()}}

    def forward(self, rois: torch.Tensor, points=None, point_labels=None, mask_prompt=None) -> dict:
        if points is not None:
            return self.decode(self.encode_image(rois), points, point_labels, mask_prompt)
        logits = torch.cat([_logits(roi[0].numpy() > BRIGHT) for roi in rois])
        return {"mask_logits": logits, "iou_pred": torch.ones(len(rois), 1)}
