"""3D point/mask prompt encoder (SAM's, in 3D) and feature-space K-means point refinement (seed 001, eq. 1-2).

Point coordinates are voxel indices (i, j, k) of the ROI tensor, i.e. along its last three axes
(D, H, W); float coordinates are allowed. Point labels: 1 positive, 0 negative, -1 padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.vista3d import PositionEmbeddingRandom
from monai.utils import ensure_tuple_rep
from torch import nn

from segreport.networks.blocks.vit3d import channel_layer_norm_3d

__all__ = ["PromptEncoder3D", "kmeans_refine_points", "PAD_LABEL"]

PAD_LABEL = -1


def _check_points(points: torch.Tensor, labels: torch.Tensor) -> None:
    if points.ndim != 3 or points.shape[-1] != 3 or labels.shape != points.shape[:2]:
        raise ValueError(
            f"points must be (B, N, 3) and labels (B, N); got {tuple(points.shape)}, {tuple(labels.shape)}"
        )
    if labels.numel() and not bool(((labels >= PAD_LABEL) & (labels <= 1)).all()):
        raise ValueError("point labels must be 1 (positive), 0 (negative) or -1 (padding)")


class PromptEncoder3D(nn.Module):
    """Sparse (points) and dense (previous mask) prompt embeddings, following SAM's PromptEncoder in 3D.

    Points: random Fourier features of the normalised coordinate (MONAI VISTA3D's
    ``PositionEmbeddingRandom``, a 3D port of SAM's) plus a learned label embedding; padding points get
    a learned "not a point" embedding instead. Dense: the previous low-res mask logits through a
    strided-conv downscaler to the embedding grid, or a learned "no mask" embedding.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Sequence[int],
        input_image_size: Sequence[int] | int,
        mask_in_chans: int = 16,
    ):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sin/cos halves), got {embed_dim}")
        if mask_in_chans < 8:  # its first LayerNorm runs over mask_in_chans // 4 channels
            raise ValueError(f"mask_in_chans must be >= 8, got {mask_in_chans}")
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(int(s) for s in image_embedding_size)
        self.input_image_size = ensure_tuple_rep(input_image_size, 3)
        # as SAM: the mask prompt lives at 4x the embedding grid (the mask head's low-res output size)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.Embedding(2, embed_dim)  # row 0 negative, row 1 positive
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        hidden = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, hidden, kernel_size=2, stride=2),
            channel_layer_norm_3d(hidden),
            nn.GELU(),
            nn.Conv3d(hidden, mask_in_chans, kernel_size=2, stride=2),
            channel_layer_norm_3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, C, d, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) voxel coordinates + (B, N) labels -> (B, N, C) tokens."""
        _check_points(points, labels)
        # +0.5: voxel centre, so the same normalisation as the grid PE (cell centres at (i+0.5)/size)
        pe = self.pe_layer.forward_with_coords(points.float() + 0.5, self.input_image_size)
        label_embed = self.point_embeddings(labels.clamp(min=0).long())
        pad = (labels == PAD_LABEL).unsqueeze(-1)
        return torch.where(pad, self.not_a_point_embed.weight.to(pe.dtype), pe + label_embed)

    def embed_masks(self, mask_prompt: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Previous mask logits (B, 1, ...) -> dense embedding (B, C, d, h, w); None -> "no mask" embedding.

        A mask at any size (e.g. the full-ROI ``mask_logits``) is resized to ``mask_input_size`` first.
        """
        if mask_prompt is None:
            return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1, *self.image_embedding_size)
        if mask_prompt.ndim != 5 or mask_prompt.shape[1] != 1 or mask_prompt.shape[0] != batch_size:
            raise ValueError(f"mask_prompt must be ({batch_size}, 1, D, H, W), got {tuple(mask_prompt.shape)}")
        if tuple(mask_prompt.shape[2:]) != self.mask_input_size:
            mask_prompt = F.interpolate(mask_prompt.float(), size=self.mask_input_size, mode="trilinear")
        return self.mask_downscaling(mask_prompt)


@torch.no_grad()
def kmeans_refine_points(
    features: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    image_size: Sequence[int],
    window: int = 3,
    k: int = 3,
    iters: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-space clustering point refinement (seed 001, eq. 1-2), batched over all clicks.

    For every click, take the ``window``³ cells of the feature grid around it (eq. 1; the window is
    shifted to stay inside the grid), cluster their feature vectors into ``k`` groups with ``iters``
    Lloyd steps of K-means, and return the cell nearest each centroid among that cluster's members (eq. 2), at the
    cell centre in ROI voxel coordinates, carrying the click's label. Padding clicks yield padding.

    Written in torch rather than sklearn: it runs inside ``decode`` for every click of every batch item,
    so it must stay on the tensors' device, batched (one call, no per-window Python loop or host sync,
    hence a fixed number of Lloyd steps rather than a convergence test) and deterministic
    (farthest-point init from the clicked cell instead of random k-means++).
    Selection is an argmin, not differentiable, hence ``no_grad``.

    Args:
        features: (B, C, d, h, w) image embedding.
        points: (B, N, 3) click voxel coordinates in the ROI of size ``image_size``.
        labels: (B, N) click labels (1, 0 or -1 for padding).

    Returns:
        extra points (B, N*k, 3) and labels (B, N*k), k per click, in click order.
    """
    _check_points(points, labels)
    if window < 1 or k < 1 or iters < 0:
        raise ValueError(f"need window >= 1, k >= 1, iters >= 0; got {window}, {k}, {iters}")
    b, c = features.shape[:2]
    n = points.shape[1]
    out_dtype = points.dtype if points.is_floating_point() else torch.float
    if n == 0:
        return points.new_zeros((b, 0, 3), dtype=out_dtype), labels.new_zeros((b, 0))
    device = features.device
    sizes = [min(g, window) for g in features.shape[2:]]  # per-axis window, smaller only if the grid is
    grid = torch.tensor(features.shape[2:], device=device)
    size = torch.tensor(sizes, device=device)
    scale = grid / torch.tensor(tuple(image_size), device=device, dtype=torch.float)  # cells per voxel
    cell = torch.minimum((points.float() * scale).floor().long().clamp(min=0), grid - 1)  # (B, N, 3)
    start = torch.minimum((cell - size // 2).clamp(min=0), grid - size)
    axes = [torch.arange(s, device=device) for s in sizes]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (W, 3)
    pos = start.unsqueeze(2) + offsets  # (B, N, W, 3) cell indices of each window
    flat = (pos[..., 0] * grid[1] + pos[..., 1]) * grid[2] + pos[..., 2]
    n_win = offsets.shape[0]
    feats = features.flatten(2).transpose(1, 2).float()  # (B, G, C)
    x = torch.gather(feats, 1, flat.reshape(b, n * n_win, 1).expand(-1, -1, c)).reshape(b * n, n_win, c)

    def sq_dist(centres: torch.Tensor) -> torch.Tensor:  # (BN, W, K); windows are tiny, so no cdist
        return (x.unsqueeze(2) - centres.unsqueeze(1)).pow(2).sum(-1)

    # deterministic farthest-point init: the clicked cell first, then the cell farthest from all chosen
    rel = cell - start
    click_idx = ((rel[..., 0] * size[1] + rel[..., 1]) * size[2] + rel[..., 2]).reshape(-1)
    rows = torch.arange(b * n, device=device)
    mu = x[rows, click_idx].unsqueeze(1)  # (BN, 1, C)
    min_dist = sq_dist(mu).squeeze(-1)
    for _ in range(1, k):
        nxt = x[rows, min_dist.argmax(-1)].unsqueeze(1)
        mu = torch.cat([mu, nxt], 1)
        min_dist = torch.minimum(min_dist, sq_dist(nxt).squeeze(-1))

    for _ in range(iters):  # Lloyd steps; an empty cluster keeps its previous centroid
        onehot = F.one_hot(sq_dist(mu).argmin(-1), k).to(x.dtype)  # (BN, W, k)
        counts = onehot.sum(1).unsqueeze(-1)
        mu = torch.where(counts > 0, onehot.transpose(1, 2) @ x / counts.clamp(min=1), mu)

    dist = sq_dist(mu)  # argmin of the squared distance = argmin of the distance (eq. 2)
    member = F.one_hot(dist.argmin(-1), k).bool()
    nearest_member = dist.masked_fill(~member, float("inf")).argmin(1)  # eq. 2, (BN, k)
    empty = ~member.any(1)
    chosen = torch.where(empty, dist.argmin(1), nearest_member).reshape(b, n, k)

    cells = torch.gather(pos, 2, chosen.unsqueeze(-1).expand(-1, -1, -1, 3)).float()  # (B, N, k, 3)
    coords = (cells + 0.5) / scale - 0.5  # cell centre in voxel coordinates
    new_labels = labels.unsqueeze(-1).expand(-1, -1, k)
    coords = coords.masked_fill((new_labels == PAD_LABEL).unsqueeze(-1), 0.0)
    return coords.reshape(b, n * k, 3).to(out_dtype), new_labels.reshape(b, n * k)
