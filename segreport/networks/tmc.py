"""TMC (seeds 002/003): text-guided 2D segmentation with multi-stage cross-attention.

A Swin encoder reads the slice, a BERT-family encoder the finding sentence. At the MCM stages
(default 2, 3, 4) the stage's visual tokens attend to that stage's projection of the text and the
text attends back (Sec. 3.1): ``F_V = MLP(MHCA(V, L, L))``, ``F_L = MLP(MHCA(L, F_V, F_V))``; F_V goes
on into the next Swin stage, F_L into the next stage's text. Before each alignment stage the pooled
visual tokens and that stage's [CLS] are projected to a common space for the alignment loss
(Sec. 3.2; :mod:`segreport.losses.alignment`). The segmentation part (Sec. 3.3) has a CNN and a ViT
down-sampling path, each fed ``CONCAT(path_i, F_V^i)``, and a U-shaped CNN decoder whose skip at
stage i is ``CONCAT(F_V^i, X_i)`` (the ViT path joins at the bottleneck), then a 1×1 conv head.

Switches for the ablation: ``mcm_stages`` (``(2, 3, 4)`` multi-stage; ``(4,)`` the LViT-style
single-stage fusion, which is also the "MCM off" row of Table 2), ``align_stages`` (``()``: no
alignment projections), ``text_freeze``. Not stated in the paper, our choice: the common text width
``d`` (256 in the paper configuration), the alignment width ``align_dim`` (256) and one transformer
layer per ViT down-sampling block.
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Any, Sequence

import torch
from monai.networks.blocks import Convolution
from timm.layers import Mlp
from torch import nn

from .blocks.configs import named_config
from .blocks.encoders import SwinStages
from .blocks.text_encoder import BertTextEncoder
from .blocks.unet_decoder import UNetDecoder

__all__ = ["TMC", "TMC_CONFIGS", "CrossModalBlock"]

# bert-base-uncased's architecture (randomly initialised unless a local folder is given)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)
TMC_CONFIGS: dict[str, dict[str, Any]] = {
    "paper": dict(image_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                  text_config=BERT_BASE, d=256, heads=8, align_dim=256, mcm_stages=(2, 3, 4), align_stages=(2, 3, 4)),
    "tiny": dict(image_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4,
                 text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64),
                 d=32, heads=2, align_dim=32, mcm_stages=(2, 3, 4), align_stages=(2, 3, 4)),
}


class CrossModalBlock(nn.Module):
    """One MCM stage: visual tokens attend to text, then text attends to the updated visual tokens.

    Pre-norm residual attention + MLP on both sides (the transformer convention; the paper writes the
    attention-then-MLP chain without norms). Padding tokens are masked out of the visual side's keys.
    """

    def __init__(self, vis_dim: int, txt_dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_v, self.norm_l = nn.LayerNorm(vis_dim), nn.LayerNorm(txt_dim)
        self.attn_v = nn.MultiheadAttention(vis_dim, heads, kdim=txt_dim, vdim=txt_dim, batch_first=True)
        self.mlp_v = nn.Sequential(nn.LayerNorm(vis_dim), Mlp(vis_dim, int(vis_dim * mlp_ratio)))
        self.norm_l2, self.norm_fv = nn.LayerNorm(txt_dim), nn.LayerNorm(vis_dim)
        self.attn_l = nn.MultiheadAttention(txt_dim, heads, kdim=vis_dim, vdim=vis_dim, batch_first=True)
        self.mlp_l = nn.Sequential(nn.LayerNorm(txt_dim), Mlp(txt_dim, int(txt_dim * mlp_ratio)))

    def forward(self, v: torch.Tensor, lang: torch.Tensor, pad: torch.Tensor | None = None):
        """``v`` (B, N, C), ``lang`` (B, T, d), ``pad`` (B, T) True at padding -> (F_V, F_L)."""
        text = self.norm_l(lang)
        fv = v + self.attn_v(self.norm_v(v), text, text, key_padding_mask=pad, need_weights=False)[0]
        fv = fv + self.mlp_v(fv)
        vis = self.norm_fv(fv)
        fl = lang + self.attn_l(self.norm_l2(lang), vis, vis, need_weights=False)[0]
        return fv, fl + self.mlp_l(fl)


class ViTDown(nn.Module):
    """ViT down-sampling block: 2×2 patch merging conv, a depth-wise conv position code, one global
    pre-norm transformer layer over the tokens."""

    def __init__(self, in_ch: int, out_ch: int, heads: int):
        super().__init__()
        self.merge = nn.Conv2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.pos = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, groups=out_ch)
        self.layer = nn.TransformerEncoderLayer(out_ch, heads, dim_feedforward=2 * out_ch, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = self.merge(y)
        y = y + self.pos(y)
        b, c, h, w = y.shape
        return self.layer(y.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def _cnn_down(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(Convolution(2, in_ch, out_ch, strides=2, kernel_size=3, act="relu", norm="batch"),
                         Convolution(2, out_ch, out_ch, kernel_size=3, act="relu", norm="batch"))


class TMC(nn.Module):
    """Text-guided multi-stage cross-perception network (module docstring).

    ``forward(image (B,1,S,S) in [0,1], tokens (B,T), tokens_mask (B,T))`` returns ``seg_logits``
    (B,1,S,S) and ``align``: one ``(z_visual (B,D), z_text (B,D), logit_scale)`` per alignment stage,
    the inputs of :class:`segreport.losses.alignment.MultiStageAlignmentLoss`.

    Args: ``image_size`` (Swin is built for one size; the checkpoint's spec records it), Swin sizes
    (``embed_dim``, ``depths``, ``num_heads``, ``window_size``), ``text_config`` (BertConfig dict; its
    ``vocab_size`` comes from the tokenizer) or ``text_encoder_path`` (a local folder, whose config is
    recorded instead), ``d``/``heads`` (MCM width/heads), ``align_dim``, the stage switches,
    ``encoder_weights`` (local Swin checkpoint).
    """

    def __init__(self, vocab_size: int | None = None, image_size: int = 224, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 text_config: dict | None = None, d: int = 256, heads: int = 8, align_dim: int = 256,
                 mcm_stages: Sequence[int] = (2, 3, 4), align_stages: Sequence[int] = (2, 3, 4), in_channels: int = 1,
                 text_freeze: bool = False, text_encoder_path: str | PathLike | None = None,
                 encoder_weights: str | PathLike | None = None):
        super().__init__()
        n = len(depths)
        mcm_stages, align_stages = tuple(int(s) for s in mcm_stages), tuple(int(s) for s in align_stages)
        bad = [s for s in (*mcm_stages, *align_stages) if not 1 <= s <= n]
        if bad:
            raise ValueError(f"MCM/alignment stages are 1..{n}, got {bad}")
        if not mcm_stages:
            raise ValueError("TMC needs at least one MCM stage for the text to reach the mask (the vision-only "
                             "baseline is the U-Net overlay)")
        if text_encoder_path is None:
            text_config = {**(text_config or {}), **({"vocab_size": vocab_size} if vocab_size else {})}
        self.text = BertTextEncoder(text_encoder_path, text_config, freeze=text_freeze)
        if vocab_size and self.text.config["vocab_size"] != vocab_size:  # a pretrained table is not resized
            raise ValueError(f"text encoder has {self.text.config['vocab_size']} token embeddings, the tokenizer "
                             f"{vocab_size}: the tokenizer does not match the encoder (use the one in its folder)")
        # what rebuilds this network from a checkpoint's spec: the text encoder's architecture, not its folder
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size, image_size=image_size, embed_dim=embed_dim, depths=tuple(depths),
            num_heads=tuple(num_heads), window_size=window_size, text_config=self.text.config, d=d, heads=heads,
            align_dim=align_dim, mcm_stages=mcm_stages, align_stages=align_stages, in_channels=in_channels,
            text_freeze=text_freeze,
        )
        self.image_size, self.in_channels = int(image_size), in_channels
        self.mcm_stages, self.align_stages = mcm_stages, align_stages
        self.swin = SwinStages(in_channels, image_size, embed_dim, depths, num_heads, window_size, encoder_weights)
        ch = self.swin.out_channels
        text_stages = sorted(set(mcm_stages) | set(align_stages))
        self.text_proj = nn.ModuleDict({str(s): nn.Linear(self.text.hidden_size, d) for s in text_stages})
        self.mcm = nn.ModuleDict({str(s): CrossModalBlock(ch[s - 1], d, heads) for s in mcm_stages})
        self.align_visual = nn.ModuleDict({str(s): nn.Linear(ch[s - 1], align_dim) for s in align_stages})
        self.align_text = nn.ModuleDict({str(s): nn.Linear(d, align_dim) for s in align_stages})
        # learnable temperature per stage, as CLIP's log(1/τ) starting at τ = 0.07
        self.align_logit_scale = nn.Parameter(torch.full((len(align_stages),), math.log(1 / 0.07)))
        self.cnn_stem = nn.Sequential(Convolution(2, in_channels, ch[0] // 2, strides=2, act="relu", norm="batch"),
                                      Convolution(2, ch[0] // 2, ch[0], strides=2, act="relu", norm="batch"))
        self.vit_stem = nn.Conv2d(in_channels, ch[0], kernel_size=4, stride=4)
        self.cnn_down = nn.ModuleList(_cnn_down(2 * ch[i], ch[i + 1]) for i in range(n - 1))
        self.vit_down = nn.ModuleList(ViTDown(2 * ch[i], ch[i + 1], max(1, num_heads[i + 1])) for i in range(n - 1))
        skips = [2 * c for c in ch[:-1]] + [3 * ch[-1]]  # CONCAT(F_V, X) per stage; the ViT path joins the bottleneck
        self.decoder = UNetDecoder(skips, 1, decoder_channels=ch[:-1][::-1])

    @classmethod
    def from_config(cls, config: str | dict[str, Any], **overrides: Any) -> TMC:
        """Build from a name in ``TMC_CONFIGS`` or a config dict (e.g. a checkpoint's); None overrides are ignored."""
        return cls(**named_config(config, TMC_CONFIGS, "TMC", overrides, drop_none=True))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, tokens_mask: torch.Tensor | None = None) -> dict:
        if image.ndim != 4 or tuple(image.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"TMC expects B×{self.in_channels}×{self.image_size}×{self.image_size} slices (its image "
                             f"size is fixed by the checkpoint), got {tuple(image.shape)}")
        if tokens.shape[0] != image.shape[0]:
            raise ValueError(f"tokens batch {tokens.shape[0]} != image batch {image.shape[0]}")
        if tokens_mask is None:
            tokens_mask = torch.ones_like(tokens)
        words = self.text(tokens, tokens_mask)
        pad = tokens_mask == 0
        v, x, y = self.swin.stem(image), self.cnn_stem(image), self.vit_stem(image)
        carried, align, skips = None, [], []
        for i in range(len(self.swin.out_channels)):
            stage = i + 1
            v = self.swin.stage(i, v)  # (B, H_i, W_i, C_i)
            if str(stage) in self.text_proj:
                lang = self.text_proj[str(stage)](words)
                if carried is not None:  # F_L of the previous MCM passed on to this stage's text
                    lang = lang + carried
                if stage in self.align_stages:  # aligned BEFORE the fusion (Sec. 3.2)
                    k = self.align_stages.index(stage)
                    align.append((self.align_visual[str(stage)](v.mean(dim=(1, 2))),
                                  self.align_text[str(stage)](lang[:, 0]), self.align_logit_scale[k].exp()))
                if stage in self.mcm_stages:
                    b, h, w, c = v.shape
                    fv, carried = self.mcm[str(stage)](v.reshape(b, h * w, c), lang, pad)
                    v = fv.reshape(b, h, w, c)  # F_V goes on into the next Swin stage
            fv_map = v.permute(0, 3, 1, 2)
            skips.append(torch.cat([fv_map, x], 1))
            if i < len(self.cnn_down):
                x = self.cnn_down[i](torch.cat([x, fv_map], 1))
                y = self.vit_down[i](torch.cat([y, fv_map], 1))
        skips[-1] = torch.cat([skips[-1], y], 1)
        return {"seg_logits": self.decoder(skips, image.shape[-2:]), "align": align}


class ImageOnlyUNet(nn.Module):
    """The vision-only baseline of the TMC bundle: MONAI's 2D U-Net, called like TMC (text ignored), so
    the same engine, evaluation and slice-wise inference run it. ``config`` rebuilds it."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                 num_res_units: int = 2, image_size: int = 224, in_channels: int = 1):
        super().__init__()
        from monai.networks.nets import UNet

        self.config = dict(channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
                           image_size=image_size, in_channels=in_channels)
        self.image_size = int(image_size)
        self.unet = UNet(2, in_channels, 1, channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor | None = None, tokens_mask=None) -> dict:
        return {"seg_logits": self.unet(image), "align": []}
