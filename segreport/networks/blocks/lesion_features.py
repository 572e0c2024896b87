"""What an attribute head should look at: the lesion, its surroundings and its edge.

Seed 001's attribute head reads tokens pooled over the whole ROI. But density is relative to the
surroundings, surface is edge sharpness and invasion is contact with the pleura or mediastinum: all
of them are properties of the voxels inside the lesion and in a ring around it. So:

* :func:`lesion_descriptors`: measured descriptors of the (predicted) lesion on the ROI image,
  intensity statistics inside vs in a near ring and a far ring, edge ratio and edge gradient, size,
  compactness, hollowness, elongation, contact with dense tissue and with the ROI border: what a
  radiologist's definition of each attribute names, in the units of the windowed image (0..1);
* :class:`LesionAttributeFeatures`: features pooled inside the predicted mask and in the ring around
  it, concatenated with those descriptors, through an MLP: learned plus measured.

The mask enters as a detached probability: it says WHERE to look; the attribute loss does not push
the mask to serve the classifier.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DESCRIPTOR_NAMES", "image_maps", "lesion_descriptors", "LesionAttributeFeatures"]

DESCRIPTOR_NAMES = (
    "core_mean", "core_std", "ring_mean", "far_mean", "contrast", "edge_ratio", "edge_gradient",
    "dense_fraction", "bright_fraction", "log_volume", "compactness", "hollowness", "elongation",
    "flatness", "tissue_contact", "border_contact", "core_iqr", "texture",
)
# in the lung window (-1350..150 HU -> 0..1): 0.85 ~ -75 HU (soft tissue and denser), 0.93 ~ +45 HU
# (soft-tissue density), 0.99 ~ +135 HU (calcified / contrast-dense). Other windows shift these, and the
# learned part of the head adapts to them; the features stay monotone in HU.
_TISSUE, _DENSE, _BRIGHT = 0.85, 0.93, 0.99
_EPS = 1e-6


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    """Grey dilation of (B, C, D, H, W) by a (2r+1)³ cube, one axis at a time, as the running maximum of
    ``x`` shifted by 1..r each way (a shift past the border adds nothing, as -inf padding would). Exact,
    and about ten times faster on a CPU than an unfold + amax or a stride-1 max_pool3d: each step is one
    contiguous elementwise maximum, with no padded copy and no strided reduction."""
    for dim in (2, 3, 4):
        n, y = x.shape[dim], x.clone()
        for k in range(1, min(r, n - 1) + 1):
            for dst, src in ((y.narrow(dim, k, n - k), x.narrow(dim, 0, n - k)), (y.narrow(dim, 0, n - k), x.narrow(dim, k, n - k))):
                torch.maximum(dst, src, out=dst)
        x = y
    return x


def _erode(x: torch.Tensor, r: int) -> torch.Tensor:
    return -_dilate(-x, r)


def _pooled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, C): the sums of ``x`` (B, C, ...) weighted by ``w`` (B, 1, ...), as one batched product: no
    weighted copy of the volume (a 32³ ROI's descriptors and pooling made fifteen of them per click)."""
    return torch.bmm(x.flatten(2), w.flatten(1).unsqueeze(-1)).squeeze(-1)


def _wmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B,): the mean of single-channel ``x`` weighted by ``w``."""
    return _pooled(x, w)[:, 0] / (w.flatten(1).sum(1) + _EPS)


@torch.no_grad()
def image_maps(image: torch.Tensor) -> torch.Tensor:
    """(B, 6, D, H, W): the windowed ROI, its gradient magnitude (central differences), its fine texture
    (squared difference from the 3³ local mean) and its tissue, dense and bright indicators (0/1 above
    the thresholds above). They depend on the image only, so a promptable model computes them once per
    ROI (``encode_image``) and every click reuses them."""
    x = image[:, :1].float()
    g = sum(torch.gradient(x, dim=d)[0] ** 2 for d in (2, 3, 4)).sqrt()
    local_mean = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    levels = torch.tensor([_TISSUE, _DENSE, _BRIGHT], dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    return torch.cat([x, g, (x - local_mean) ** 2, (x > levels).to(x.dtype)], 1)


@functools.lru_cache(maxsize=8)
def _grid(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, V) voxel coordinates and the (1, 1, *shape) border-face indicator of a volume ``shape``:
    the same for every click on a ROI, so made once (read only)."""
    grids = torch.meshgrid(*[torch.arange(s, device=device, dtype=dtype) for s in shape], indexing="ij")
    faces = torch.zeros((1, 1, *shape), dtype=dtype, device=device)
    faces[:, :, [0, -1]], faces[:, :, :, [0, -1]], faces[:, :, :, :, [0, -1]] = 1, 1, 1
    return torch.stack([c.flatten() for c in grids], 0), faces


@torch.no_grad()
def lesion_descriptors(image: torch.Tensor, prob: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
    """(B, len(DESCRIPTOR_NAMES)) measured descriptors of the lesion ``prob`` (B, 1, D, H, W) in the
    windowed ROI ``image`` (B, 1, D, H, W); ``maps``: its :func:`image_maps`, when made already. Each
    scaled to about 0..1. Soft: an empty mask gives finite values (zeros for the geometry), never NaN."""
    maps = image_maps(image) if maps is None else maps.float()
    x, g, texture_sq = maps[:, :1], maps[:, 1:2], maps[:, 2:3]
    tissue, dense, bright = maps[:, 3:4], maps[:, 4:5], maps[:, 5:6]
    m = prob.float().clamp(0, 1)
    eroded, grown1 = _erode(m, 1), _dilate(m, 1)
    grown2 = _dilate(grown1, 1)  # a 5³ cube is two 3³ ones: exact, and cheaper
    small = eroded.flatten(1).sum(1) < 8  # as the phantom's density label: the whole mask when the core is tiny
    core = torch.where(small.view(-1, 1, 1, 1, 1), m, eroded)
    ring = (grown1 - m).clamp(min=0)
    far = (_dilate(grown2, 2) - grown2).clamp(min=0)
    core_mean, ring_mean, far_mean = _wmean(x, core), _wmean(x, ring), _wmean(x, far)
    core_std = (_wmean((x - core_mean.view(-1, 1, 1, 1, 1)) ** 2, core) + _EPS).sqrt()
    contrast = core_mean - far_mean
    den = torch.where(contrast.abs() < 0.02, torch.full_like(contrast, 0.02).copysign(contrast), contrast)
    edge_ratio = ((ring_mean - far_mean) / den).clamp(-2, 2)
    # edge sharpness: gradient magnitude on the boundary shell
    shell = (grown1 - eroded).clamp(min=0)
    volume = m.flatten(1).sum(1)
    surface = (m - eroded).clamp(min=0).flatten(1).sum(1)
    closed = _erode(grown2, 2)
    hollowness = (closed - m).clamp(min=0).flatten(1).sum(1) / (closed.flatten(1).sum(1) + _EPS)
    # shape of the mass distribution: eigenvalues of the voxel-coordinate covariance
    coords, faces = _grid(tuple(x.shape[2:]), x.dtype, x.device)  # (3, V), (1, 1, D, H, W)
    w = m.flatten(1) / (volume.view(-1, 1) + _EPS)  # (B, V)
    mu = w @ coords.T  # (B, 3)
    cov = torch.einsum("bv,iv,jv->bij", w, coords, coords) - mu[:, :, None] * mu[:, None, :]
    eig = torch.linalg.eigvalsh(cov + _EPS * torch.eye(3, device=x.device)).clamp(min=_EPS)  # ascending
    near = (grown2 - m).clamp(min=0)
    # heterogeneity as the phantom and a radiologist judge it: spread of the core (robust: IQR / 1.349,
    # as a standard deviation) and fine texture (the image minus its local mean), not the edge's ramp
    texture = _wmean(texture_sq, core).sqrt()
    iqr, quartiles = [], torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device)  # one sort, not two
    for xi, ci in zip(x, core):
        v = xi[ci > 0.5]
        iqr.append((v.quantile(quartiles).diff()[0]) / 1.349 if v.numel() >= 4 else x.new_zeros(()))
    feats = [
        core_mean, core_std * 10, ring_mean, far_mean, contrast, edge_ratio / 2, _wmean(g, shell) * 5,
        _wmean(dense, core), _wmean(bright, core),
        torch.log1p(volume) / 10, surface / (volume.clamp(min=1) ** (2 / 3)) / 10, hollowness,
        (eig[:, 0] / eig[:, 2]).sqrt(), (eig[:, 1] / eig[:, 2]).sqrt(),
        _wmean(tissue, near), (m * faces).flatten(1).sum(1) / (volume + _EPS),
        torch.stack(iqr) * 10, texture * 20,
    ]
    return torch.stack(feats, 1)


class RunningStandardize(nn.Module):
    """Standardise features by running statistics, in training too (an exponential moving average of
    the batch mean and variance, started from the first batch). The descriptors differ between classes
    by a few hundredths (density: 0.03 of the window is 45 HU), so an unscaled MLP learns them slowly;
    BatchNorm's per-batch statistics would be noise at the bundle's batch of 4."""

    def __init__(self, n: int, momentum: float = 0.05):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and len(x) > 1:
            with torch.no_grad():
                mean, var = x.mean(0), x.var(0, unbiased=False)
                m = 1.0 if int(self.seen) == 0 else self.momentum
                self.mean.lerp_(mean, m)
                self.var.lerp_(var, m)
                self.seen += 1
        return (x - self.mean) / (self.var + 1e-4).sqrt()


class LesionAttributeFeatures(nn.Module):
    """Features pooled inside the lesion and in a ring around it (+ measured descriptors) -> (B, out_dim).

    Args:
        feature_channels: channels of the feature map pooled (the decoder's full-resolution features).
        out_dim: output width.
        ring: ring width in voxels of the feature map.
        descriptors: concatenate :func:`lesion_descriptors` (needs the ROI's :func:`image_maps`).
    """

    def __init__(self, feature_channels: int, out_dim: int, ring: int = 2, descriptors: bool = True):
        super().__init__()
        self.ring, self.descriptors = int(ring), bool(descriptors)
        n_in = 2 * feature_channels + (len(DESCRIPTOR_NAMES) if descriptors else 0)
        self.standardize = RunningStandardize(len(DESCRIPTOR_NAMES)) if descriptors else None
        self.mlp = nn.Sequential(nn.Linear(n_in, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, features: torch.Tensor, prob: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, C, d, h, w); prob (B, 1, ...) lesion probability at any size; maps (B, 3, ...):
        the ROI's :func:`image_maps`."""
        prob = prob.detach().float()
        p = prob if prob.shape[2:] == features.shape[2:] else F.interpolate(prob, size=features.shape[2:], mode="trilinear", align_corners=False)
        ring = (_dilate(p, self.ring) - p).clamp(min=0)

        def pool(w):
            return _pooled(features, w) / (w.flatten(2).sum(-1) + _EPS)

        parts = [pool(p), pool(ring)]
        if self.descriptors:
            if maps is None:
                raise ValueError("descriptors need the ROI's image maps")
            parts.append(self.standardize(lesion_descriptors(maps[:, :1], prob, maps).to(features.dtype)).clamp(-5, 5))
        return self.mlp(torch.cat(parts, 1))
