"""The parts of :class:`~segreport.networks.lesion_prompt.LesionPromptNet` after its image encoder and
prompt tokens (seed 001, Gu et al., MICCAI 2025): the cached image embedding, the attribute head H_attr,
the inter-task feature synergy of eq. 3 and the attribute classifier FCN(A)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from monai.networks.blocks import MLPBlock
from torch import nn

from .vit3d import self_attention_block

__all__ = ["ImageEmbedding", "InterTaskSynergy", "AttributeHead", "AttributeClassifier"]


class ImageEmbedding(NamedTuple):
    """What ``encode_image`` returns and ``decode`` takes: cache it once per ROI.

    ``grid``: (B, embed_dim, *grid_size) image embedding; ``high_res``: the residual U-Net's encoder
    skips (full resolution first), None for the ViT; ``image``: the ROI's
    :func:`~segreport.networks.blocks.lesion_features.image_maps` (the ROI, its gradient, texture and
    density indicators) for the measured lesion descriptors, None when the model does not use them.
    """

    grid: torch.Tensor
    high_res: tuple[torch.Tensor, ...] | None = None
    image: torch.Tensor | None = None

    def _map(self, fn) -> ImageEmbedding:
        """``fn`` applied to every tensor."""
        return ImageEmbedding(fn(self.grid), None if self.high_res is None else tuple(fn(t) for t in self.high_res),
                              None if self.image is None else fn(self.image))

    def expand(self, b: int) -> ImageEmbedding:
        """The same embedding for ``b`` prompt sets (a view: no copy)."""
        return self._map(lambda t: t if t.shape[0] == b else t.expand(b, *t.shape[1:]))

    def select(self, index: slice | int) -> ImageEmbedding:
        """Rows ``index`` of the batch (e.g. ``select(slice(0, 1))`` for the first image)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return self._map(lambda t: t[index])


class InterTaskSynergy(nn.Module):
    """Eq. 3: Z_seg = Attn(M, Proj(A)), Z_attr = Attn(A, Proj(M)), both from the same M and A.

    Proj maps each task's features into a shared ``dim``-wide space; Attn is multi-head cross-attention
    (``nn.MultiheadAttention``, because it takes a key padding mask: padding prompt tokens in A must not
    be attended to). Each output is residual + LayerNorm so an uninformative exchange cannot erase
    the task's own features.
    """

    def __init__(self, embed_dim: int, num_heads: int, dim: int | None = None):
        super().__init__()
        dim = dim or embed_dim
        self.proj_m = nn.Linear(embed_dim, dim)
        self.proj_a = nn.Linear(embed_dim, dim)
        self.attn_seg = nn.MultiheadAttention(embed_dim, num_heads, kdim=dim, vdim=dim, batch_first=True)
        self.attn_attr = nn.MultiheadAttention(embed_dim, num_heads, kdim=dim, vdim=dim, batch_first=True)
        self.norm_seg = nn.LayerNorm(embed_dim)
        self.norm_attr = nn.LayerNorm(embed_dim)

    def forward(
        self, m: torch.Tensor, a: torch.Tensor, a_valid: torch.Tensor, m_for_attr: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """m: (B, M, C) mask tokens; a: (B, T, C) attribute tokens; a_valid: (B, T) bool; ``m_for_attr``:
        the mask tokens as the attribute side reads them (a gradient-balanced view of ``m``; default m)."""
        pa, pm = self.proj_a(a), self.proj_m(m if m_for_attr is None else m_for_attr)
        z_seg = self.attn_seg(m, pa, pa, key_padding_mask=~a_valid, need_weights=False)[0]
        z_attr = self.attn_attr(a, pm, pm, need_weights=False)[0]
        return self.norm_seg(m + z_seg), self.norm_attr(a + z_attr)


class AttributeHead(nn.Module):
    """H_attr up to A: a residual MLP block, then self-attention over the hybrid tokens.

    Padding prompt tokens are masked out of the attention keys (MONAI ``SABlock`` takes a (B, T) mask on
    its non-fused path) so the attributes do not depend on how many padding slots a batch carries.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.residual_mlp = MLPBlock(embed_dim, mlp_dim)
        self.self_attn = self_attention_block(embed_dim, mlp_dim, num_heads, use_flash_attention=False)

    def forward(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        a = z + self.residual_mlp(self.norm(z))
        return self.self_attn(a, attn_mask=valid)


class AttributeClassifier(nn.Module):
    """FCN(A): masked mean over the valid tokens, then one linear classifier per attribute group.

    The paper writes a sigmoid multi-label layer, but every group in its Table 1 is a set of mutually
    exclusive classes (a lesion has exactly one shape, one density ...) and eq. 6 is categorical CE,
    so each group gets its own softmax classifier; argmax per group is the report.

    ``extra_dim`` > 0: a lesion feature vector (:class:`LesionAttributeFeatures`) is concatenated to the
    pooled tokens before the classifiers.
    """

    def __init__(self, embed_dim: int, groups: Mapping[str, int], extra_dim: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(embed_dim + extra_dim, n) for name, n in groups.items()})

    def forward(self, a: torch.Tensor, valid: torch.Tensor, extra: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        w = valid.unsqueeze(-1).to(a.dtype)
        pooled = self.norm((a * w).sum(1) / w.sum(1).clamp(min=1))
        if extra is not None:
            pooled = torch.cat([pooled, extra.to(pooled.dtype)], -1)
        return {name: head(pooled) for name, head in self.heads.items()}
