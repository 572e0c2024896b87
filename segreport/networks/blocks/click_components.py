"""Which parts of a predicted mask the clicks are about: the connected components a positive click touches.

A positive click says "this is the lesion". A mask prediction can hold other lesion-looking regions of
the ROI as well: next to diffuse ground glass, one click on a small solid nodule gave a mask with the
nodule AND 10-20 ground-glass pieces (measured: 37 of 5,834 predicted voxels were the clicked nodule's
component, Dice 0.007). So the components of ``logits > 0`` that hold a positive click, or come within
``reach`` voxels of one, are kept; the others are pushed under the threshold. A mask that misses every
positive click is then empty: the model finds no lesion where the person clicked, and other regions
would answer a question nobody asked (measured on the quick bench's model: attributes 0.711 with such
masks kept whole, 0.756 with them empty; the Dice is the same). A prediction without a positive click
(the automatic mode's windows) is left whole.

The labelling is scipy's, on the CPU (a GPU batch is copied to the host): about 0.7 ms per click for a
32³ ROI half covered by the mask (benchmarks/bench_click_latency.py, docs/results.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["clicked_components", "keep_clicked"]

DROPPED_LOGIT = -10.0  # a dropped component's logits are capped here (probability 5e-5: under any threshold)
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as the lesion instances are labelled


@torch.no_grad()
def clicked_components(logits: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, reach: int = 1) -> torch.Tensor:
    """(B, 1, D, H, W) bool, False on the components of ``logits`` (B, 1, D, H, W) > 0 that neither hold a
    positive click (``points`` (B, N, 3) ROI voxels, ``labels`` (B, N)) nor come within ``reach`` voxels
    (Chebyshev) of one: when the mask misses every positive click, no component is kept. Everything is
    True for an item without a positive click."""
    fg = (logits[:, 0] > 0).cpu().numpy()
    keep = np.ones_like(fg)
    size = np.array(fg.shape[1:])
    pts, labs = points.detach().cpu().numpy(), labels.cpu().numpy()
    for b in range(fg.shape[0]):
        clicks = np.rint(pts[b][labs[b] == 1]).astype(int)
        clicks = clicks[np.all((clicks >= 0) & (clicks < size), axis=1)]
        if not len(clicks) or not fg[b].any():
            continue
        components, n = ndimage.label(fg[b], _CONNECTIVITY)
        kept = np.zeros(n + 1, dtype=bool)  # a lookup per component id: one gather, not an isin
        for c in clicks:
            lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, size)
            kept[components[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]] = True
        kept[0] = True  # the background stays: the kept lesion's soft edge (p < 0.5) is there
        if not kept.all():
            keep[b] = kept[components]
    return torch.from_numpy(keep).to(logits.device)[:, None]


def keep_clicked(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, M, ...) capped at :data:`DROPPED_LOGIT` outside ``keep`` (B, 1, D, H, W), which is
    max-pooled to the logits' size when that is smaller (the ViT's low-resolution mask)."""
    if bool(keep.all()):  # one component, clicked: nothing to drop
        return logits
    if keep.shape[2:] != logits.shape[2:]:
        keep = F.adaptive_max_pool3d(keep.float(), logits.shape[2:]) > 0
    return torch.where(keep, logits, logits.clamp(max=DROPPED_LOGIT))
