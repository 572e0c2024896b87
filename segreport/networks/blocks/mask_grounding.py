"""Memory tokens that ground a finding sentence in a mask's lesions and in the slice's level.

A finding sentence names the sides, the number of infected areas and the lung level of a lesion mask.
Cross-attending to encoder features alone, MedSegText's text decoder wrote sentences that disagreed
with its own mask on three of four real test slices (docs/results.md): nothing tied the two heads.

Here the text decoder also attends to one token per lesion of the mask, as image captioning attends
to detected regions ("bottom-up attention", Anderson et al., CVPR 2018): the mask's connected
components (8-connected, at least ``min_fraction`` of the slice, largest first, at most
``max_regions``), each embedded from its geometry (centroid, its offset from the patient's midline,
size, extent) and the encoder features pooled inside it, plus its rank and the number of lesions;
empty slots get a learned "no lesion" token. Every token also carries the slice's level, which one
axial slice does not show: its place between the lung bases (0) and apices (1) in Fourier features, or
a learned "unknown" code.

The mask is the reference mask under teacher forcing (training) and the model's own thresholded mask
at inference, so the sentence describes the mask the model returns.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn
import torch.nn.functional as F

#: per lesion: centroid row and column, the column's offset from the patient's midline (x4: about -1..1),
#: sqrt(area share), height share, width share
GEOMETRY = 6
LEVEL_FREQUENCIES = (1, 2, 3, 4)  # Fourier features of the level: its thirds are easy to tell apart


def level_features(level: torch.Tensor) -> torch.Tensor:
    """[..., 1] level in [0, 1] -> [..., 1 + 2 * len(LEVEL_FREQUENCIES)] (the level, sin and cos of it)."""
    angles = torch.pi * level * torch.tensor(LEVEL_FREQUENCIES, dtype=level.dtype, device=level.device)
    return torch.cat([level, torch.sin(angles), torch.cos(angles)], -1)


def body_midline(image: np.ndarray) -> float:
    """Column of the patient's midline on a slice: the mean column of its bright half (soft tissue and
    bone; air and lung are dark in any lung window), the image centre when nothing is bright."""
    cols = np.nonzero(image > 0.5 * image.max())[1] if image.max() > 0 else np.zeros(0)
    return float(cols.mean()) if cols.size else (image.shape[1] - 1) / 2


def mask_regions(mask: torch.Tensor, image: torch.Tensor, max_regions: int,
                 min_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lesion regions of a binary mask [B, 1, H, W] on its image [B, 1, H, W]: ``(weights [B, K, H, W],
    geometry [B, K, GEOMETRY])``; a slot without a region has zero weights and zero geometry."""
    b, _, h, w = mask.shape
    weights = torch.zeros(b, max_regions, h, w)
    geometry = torch.zeros(b, max_regions, GEOMETRY)
    min_pixels = max(1, int(round(min_fraction * h * w)))
    grid = np.mgrid[0:h, 0:w].astype(np.float32)
    images = image[:, 0].detach().float().cpu().numpy()
    for i, m in enumerate(mask[:, 0].detach().cpu().numpy() > 0.5):
        midline = body_midline(images[i])
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        kept = [k + 1 for k in np.argsort(-sizes, kind="stable") if sizes[k] >= min_pixels][:max_regions]
        for slot, k in enumerate(kept):
            region = labels == k
            rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
            weights[i, slot] = torch.from_numpy(region / region.sum())
            geometry[i, slot] = torch.tensor([
                grid[0][region].mean() / h, grid[1][region].mean() / w, 4 * (grid[1][region].mean() - midline) / w,
                np.sqrt(region.sum() / (h * w)),
                (rows[-1] - rows[0] + 1) / h, (cols[-1] - cols[0] + 1) / w])
    return weights.to(mask.device), geometry.to(mask.device)


class MaskGrounding(nn.Module):
    """``(mask [B, 1, H, W], image [B, 1, H, W], features [B, C, h, w], level [B] or None)``
    -> tokens ``[B, max_regions, d_model]``.

    Args:
        d_model: width of the text decoder's memory.
        feature_channels: channels of the encoder features pooled inside each region.
        max_regions: lesion slots (a finding counts up to "multiple" areas; more are dropped, smallest first).
        min_fraction: smallest region, as a share of the slice (the slice findings' rule).
    """

    def __init__(self, d_model: int, feature_channels: int, max_regions: int = 8, min_fraction: float = 1e-3):
        super().__init__()
        self.d_model, self.max_regions, self.min_fraction = d_model, max_regions, min_fraction
        self.geometry = nn.Sequential(nn.Linear(GEOMETRY, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.features = nn.Linear(feature_channels, d_model)
        self.rank = nn.Embedding(max_regions, d_model)
        self.count = nn.Embedding(max_regions + 1, d_model)
        self.empty = nn.Parameter(torch.zeros(1, 1, d_model))
        self.level = nn.Sequential(nn.Linear(1 + 2 * len(LEVEL_FREQUENCIES), d_model), nn.GELU(),
                                   nn.Linear(d_model, d_model))
        self.unknown_level = nn.Parameter(torch.zeros(1, 1, d_model))

    def forward(self, mask: torch.Tensor, image: torch.Tensor, features: torch.Tensor,
                level: torch.Tensor | None = None) -> torch.Tensor:
        b = mask.shape[0]
        weights, geometry = mask_regions(mask, image, self.max_regions, self.min_fraction)
        pooled_weights = F.adaptive_avg_pool2d(weights, features.shape[-2:])
        pooled_weights = pooled_weights / pooled_weights.sum((-2, -1), keepdim=True).clamp_min(1e-6)
        pooled = torch.einsum("bkhw,bchw->bkc", pooled_weights.to(features), features)
        filled = (weights.flatten(2).sum(-1) > 0)[..., None]
        slots = self.geometry(geometry.to(features)) + self.features(pooled) + self.rank.weight[None].to(features)
        slots = torch.where(filled, slots, self.empty.to(slots) + self.rank.weight[None].to(slots))
        slots = slots + self.count(filled[..., 0].sum(1))[:, None]  # how many lesions, on every token
        if level is None:
            level = torch.full((b,), float("nan"))
        level = torch.as_tensor(level, device=slots.device, dtype=slots.dtype).reshape(b, 1, 1)
        known = torch.isfinite(level)  # both branches always in the graph (DDP wants every parameter used)
        level_code = torch.where(known, self.level(level_features(torch.nan_to_num(level, nan=0.5))),
                                 self.unknown_level.expand(b, 1, -1).to(slots))
        return slots + level_code  # each lesion token carries its zone: side (geometry) and level
