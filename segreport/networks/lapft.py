"""LAPFT (seed 004): CLIP-style encoders bridged by QGAF make coarse-mask, point and text prompts for a
SAM2 mask decoder; a six-zone location loss (GPFC) at every stage.

Data flow (Fig. 1): the image goes through a ViT image encoder and the finding through a BERT-family
text encoder, each split into four stages by blocks. After each stage a QGAF module (Sec. 2.1, eq. 1-2)
exchanges information between them through T learnable query tokens, at a zoomed-in width C_f = 64,
and a GPFC head (Sec. 2.4) classifies the six lung zones from the pooled image and the [EOS] text
feature. From the final features (Sec. 2.2): the coarse mask M = F_t[EOS] ⊙ F_v (per-patch similarity),
up to ``top_k`` point prompts (above θ, the most likely first, then farthest-point), and a text prompt
FFN(F_t[EOS]). SAM2's prompt encoder and mask decoder (transformers' ``Sam2Model``) take the SAM2 image
encoder's features plus the coarse-mask embedding and the point and text tokens (eq. 3). Two changes
let the text choose a lung (bundles/lapft/docs/README.md): M adds an FFN over F_t[EOS] ⊙ F_v to the
channel sum, and with the mask prompt on, the decoder's logits refine M's (final = decoder + M).

Built from configuration (random initialisation) or from local checkpoints: ``clip_vision_path`` (a
transformers CLIP vision folder), ``text_encoder_path`` (a BERT-family folder, e.g. all-MiniLM-L6-v2),
``sam2_path`` (a transformers SAM2/MedSAM2 folder). A pretrained encoder is frozen (the paper); a
randomly initialised one is trained (nothing to preserve). ``trainable_summary()`` says which.
Switches for the paper's ablations: ``use_qgaf``, ``use_gpfc``, ``n_queries`` (T), ``top_k``,
``prompts`` (any of "mask", "points", "text").
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .blocks.configs import hf_config_dict, named_config
from .blocks.text_encoder import BertTextEncoder

__all__ = ["LAPFT", "LAPFT_CONFIGS", "QGAF", "GPFC", "select_points"]

N_ZONES = 6
PROMPTS = ("mask", "points", "text")

# Sam2Model configuration pieces for an image of ``size`` pixels. SAM2's Hiera patch embedding has stride 4,
# so its feature maps are at strides 4/8/16 and the decoder's mask at 1/4 of the input: at 1024 px (SAM2)
# that is 256², at a 64 px CPU slice only 16², coarser than the lesions. ``stride`` sets the patch stride
# (4, 2 or 1), so a small image keeps SAM2's mask-to-lesion scale; the prompt encoder follows it.
def _sam2_config(size: int, hidden: int, embed_dims: Sequence[int], blocks: Sequence[int], heads: Sequence[int],
                 windows: Sequence[int], decoder_layers: int, decoder_mlp: int, stride: int = 4):
    from transformers import Sam2Config
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig)

    if stride not in (1, 2, 4) or size % (8 * stride):  # Hiera's last stage is at 8× the patch stride
        raise ValueError(f"SAM2 patch stride must be 1, 2 or 4 and the image size ({size}) a multiple of 8×stride")
    kernel = {4: 7, 2: 5, 1: 3}[stride]
    backbone = Sam2HieraDetConfig(hidden_size=embed_dims[0], num_attention_heads=heads[0], num_channels=3,
                                  image_size=[size, size], patch_kernel_size=[kernel, kernel], patch_stride=[stride, stride],
                                  patch_padding=[kernel // 2, kernel // 2], blocks_per_stage=list(blocks),
                                  embed_dim_per_stage=list(embed_dims), num_attention_heads_per_stage=list(heads),
                                  window_size_per_stage=list(windows), global_attention_blocks=[],
                                  window_positional_embedding_background_size=[4, 4])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=list(embed_dims)[::-1],
                              backbone_feature_sizes=[[size // (stride * s), size // (stride * s)] for s in (1, 2, 4)],
                              fpn_hidden_size=hidden)
    return Sam2Config(vision_config=vision,
                      prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=hidden, image_size=size, patch_size=4 * stride,
                                                                    mask_input_channels=16),
                      mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=hidden, mlp_dim=decoder_mlp,
                                                                num_hidden_layers=decoder_layers, num_attention_heads=8
                                                                if hidden >= 64 else 2, iou_head_hidden_dim=hidden))


LAPFT_CONFIGS: dict[str, dict[str, Any]] = {
    # CXR-CLIP-sized encoders (ViT-B/16, BERT-base) and a SAM2 Hiera-T-sized decoder at 224 px: a GPU job
    "paper": dict(image_size=224, clip_vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, patch_size=16),
                  text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                   max_position_embeddings=512),
                  sam2=dict(hidden=256, embed_dims=(96, 192, 384, 768), blocks=(1, 2, 7, 2), heads=(1, 2, 4, 8),
                            windows=(8, 4, 14, 7), decoder_layers=2, decoder_mlp=2048),
                  n_queries=10, fusion_dim=64, top_k=3, theta=0.9),
    # 64 px for CPU runs, at the paper's scales: a 16×16 CLIP patch grid (ViT-B/16 at 224 px: 14×14) for the
    # coarse mask and the points, and SAM2's patch stride 1 so its decoder's mask is at full resolution
    # (SAM2 at 1024 px: 256²). Measured on the phantom, seed 0: patch 8 / stride 4 Dice 0.42, patch 4 /
    # stride 1 0.64 (both at lr 1e-3)
    "tiny": dict(image_size=64, clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                  num_attention_heads=2, patch_size=4),
                 text_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64),
                 sam2=dict(hidden=32, embed_dims=(16, 32, 64, 128), blocks=(1, 1, 1, 1), heads=(1, 2, 4, 8),
                           windows=(4, 4, 2, 2), decoder_layers=1, decoder_mlp=64, stride=1),
                 n_queries=10, fusion_dim=32, top_k=3, theta=0.9),
}


class QGAF(nn.Module):
    """Query-guided attention fusion (eq. 1-2): [Q, F_t] and F_v zoomed in to ``fusion_dim`` by an FFN,
    self-attention on each side, cross-attention both ways, zoomed out, added back (residual)."""

    def __init__(self, vis_dim: int, txt_dim: int, n_queries: int = 10, fusion_dim: int = 64, heads: int = 4):
        super().__init__()
        self.n_queries = n_queries
        self.queries = nn.Parameter(torch.randn(1, n_queries, txt_dim) * 0.02)
        self.zoom_in_t, self.zoom_in_v = Mlp(txt_dim, fusion_dim, fusion_dim), Mlp(vis_dim, fusion_dim, fusion_dim)
        self.self_t = nn.MultiheadAttention(fusion_dim, heads, batch_first=True)
        self.self_v = nn.MultiheadAttention(fusion_dim, heads, batch_first=True)
        self.cross_t = nn.MultiheadAttention(fusion_dim, heads, batch_first=True)
        self.cross_v = nn.MultiheadAttention(fusion_dim, heads, batch_first=True)
        self.zoom_out_t, self.zoom_out_v = Mlp(fusion_dim, fusion_dim, txt_dim), Mlp(fusion_dim, fusion_dim, vis_dim)

    def forward(self, v: torch.Tensor, t: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = v.shape[0]
        qt = torch.cat([self.queries.expand(b, -1, -1), t], 1)
        qpad = torch.cat([torch.zeros(b, self.n_queries, dtype=torch.bool, device=pad.device), pad], 1)
        a = self.zoom_in_t(qt)
        a = self.self_t(a, a, a, key_padding_mask=qpad, need_weights=False)[0]  # MHSA([Q, F_t])
        c = self.zoom_in_v(v)
        c = self.self_v(c, c, c, need_weights=False)[0]  # MHSA(F_v)
        t_new = self.cross_t(a, c, c, need_weights=False)[0][:, self.n_queries:]  # the text positions of eq. 1
        v_new = self.cross_v(c, a, a, key_padding_mask=qpad, need_weights=False)[0]  # eq. 2
        return v + self.zoom_out_v(v_new), t + self.zoom_out_t(t_new)


class GPFC(nn.Module):
    """Global positional feature classification (Sec. 2.4): an adapter refines the patch features, softmax
    region weights pool them into V_g, the [EOS] feature is T_g, a linear layer on [V_g, T_g] gives the
    six zone logits (upper/middle/lower × left/right, :data:`segreport.vocab.ZONES` order)."""

    def __init__(self, vis_dim: int, txt_dim: int, n_zones: int = N_ZONES):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(vis_dim, vis_dim), nn.GELU(), nn.Linear(vis_dim, vis_dim))
        self.region = nn.Linear(vis_dim, 1)
        self.classify = nn.Linear(vis_dim + txt_dim, n_zones)

    def forward(self, v: torch.Tensor, t_eos: torch.Tensor) -> torch.Tensor:
        refined = self.adapter(v)
        weights = torch.softmax(self.region(refined), dim=1)
        return self.classify(torch.cat([(weights * refined).sum(1), t_eos], -1))


@torch.no_grad()
def select_points(prob: torch.Tensor, k: int = 3, theta: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Point prompts from a coarse probability map (B, h, w): candidates above ``theta``, the most likely
    first, then each next one the candidate farthest from those chosen (Sec. 2.2), up to ``k``.

    Returns ``(points (B, k, 2) as (row, col) grid indices, valid (B, k) bool)``; an image with fewer
    candidates has fewer valid points (none when no pixel is above ``theta``).
    """
    b, h, w = prob.shape
    points = torch.zeros(b, k, 2, dtype=torch.long, device=prob.device)
    valid = torch.zeros(b, k, dtype=torch.bool, device=prob.device)
    rows, cols = torch.meshgrid(torch.arange(h, device=prob.device), torch.arange(w, device=prob.device), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    for i in range(b):
        flat = prob[i].flatten()
        cand = torch.nonzero(flat > theta).flatten()
        if not len(cand):
            continue
        chosen = [cand[torch.argmax(flat[cand])]]
        dist = torch.cdist(coords[cand], coords[chosen[0]][None]).squeeze(1)
        while len(chosen) < min(k, len(cand)):
            nxt = cand[torch.argmax(dist)]
            chosen.append(nxt)
            dist = torch.minimum(dist, torch.cdist(coords[cand], coords[nxt][None]).squeeze(1))
        idx = torch.stack(chosen)
        points[i, :len(idx)] = coords[idx].long()
        valid[i, :len(idx)] = True
    return points, valid


def _stage_bounds(n_layers: int, n_stages: int = 4) -> list[tuple[int, int]]:
    """Split ``n_layers`` blocks into ``n_stages`` consecutive groups (as even as possible)."""
    edges = np.linspace(0, n_layers, n_stages + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class LAPFT(nn.Module):
    """Location-aware parameter fine-tuning (module docstring).

    ``forward(image (B,1,S,S) in [0,1], tokens (B,T), tokens_mask (B,T))`` returns ``seg_logits``
    (B,1,S,S: the SAM2 mask S), ``coarse_logits`` (B,1,S,S: M upsampled), ``zone_logits`` (B,4,6: GPFC
    per stage), ``points`` (B,k,2 pixel (row, col) at S) and ``points_valid`` (B,k).
    """

    def __init__(self, vocab_size: int | None = None, image_size: int = 224, clip_vision: dict | None = None,
                 text_config: dict | None = None, sam2: dict | None = None, n_queries: int = 10, fusion_dim: int = 64,
                 top_k: int = 3, theta: float = 0.9, use_qgaf: bool = True, use_gpfc: bool = True,
                 prompts: Sequence[str] = PROMPTS, clip_vision_path: str | PathLike | None = None,
                 text_encoder_path: str | PathLike | None = None, sam2_path: str | PathLike | None = None,
                 sam2_config: dict | None = None,
                 freeze_pretrained: bool = True):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, Sam2Model

        unknown = set(prompts) - set(PROMPTS)
        if unknown:
            raise ValueError(f"unknown prompts {sorted(unknown)}; choose from {PROMPTS}")
        self.image_size, self.top_k, self.theta = int(image_size), int(top_k), float(theta)
        self.use_qgaf, self.use_gpfc, self.prompts = bool(use_qgaf), bool(use_gpfc), tuple(prompts)
        # image tower: a CLIP ViT (transformers), its blocks in four stages
        if clip_vision_path is not None:
            self.vision = CLIPVisionModel.from_pretrained(str(clip_vision_path), local_files_only=True)
        else:
            self.vision = CLIPVisionModel(CLIPVisionConfig(**{**(clip_vision or {}), "image_size": image_size, "num_channels": 3}))
        if text_encoder_path is None:
            text_config = {**(text_config or {}), **({"vocab_size": vocab_size} if vocab_size else {})}
        self.text = BertTextEncoder(text_encoder_path, text_config)
        if vocab_size and self.text.config["vocab_size"] != vocab_size:
            raise ValueError(f"text encoder has {self.text.config['vocab_size']} token embeddings, the tokenizer "
                             f"{vocab_size}: the tokenizer does not match the encoder (use the one in its folder)")
        sam2 = dict(sam2 or {})
        if sam2_path is not None:
            self.sam = Sam2Model.from_pretrained(str(sam2_path), local_files_only=True)
        elif sam2_config is not None:  # a checkpoint of a pretrained SAM2: its own architecture, recorded whole
            from transformers import Sam2Config

            self.sam = Sam2Model(Sam2Config(**sam2_config))
        else:
            self.sam = Sam2Model(_sam2_config(image_size, **sam2))
        # pretrained towers are frozen (the paper); randomly initialised ones have nothing to keep and train
        self.frozen = {"image_encoder": clip_vision_path is not None and freeze_pretrained,
                       "text_encoder": text_encoder_path is not None and freeze_pretrained,
                       "sam2_image_encoder": sam2_path is not None and freeze_pretrained}
        for name, module in (("image_encoder", self.vision), ("text_encoder", self.text.model),
                             ("sam2_image_encoder", self.sam.vision_encoder)):
            if self.frozen[name]:
                module.requires_grad_(False)
        vcfg = self.vision.config
        c_v, c_t = int(vcfg.hidden_size), self.text.hidden_size
        self.grid = image_size // int(vcfg.patch_size)
        self.vision_stages = _stage_bounds(int(vcfg.num_hidden_layers))
        self.text_stages = _stage_bounds(len(self.text.layers))
        heads = max(1, fusion_dim // 16)
        self.qgaf = nn.ModuleList(QGAF(c_v, c_t, n_queries, fusion_dim, heads) for _ in range(4)) if use_qgaf else None
        self.gpfc = nn.ModuleList(GPFC(c_v, c_t) for _ in range(4)) if use_gpfc else None
        # coarse mask: per-patch similarity with the [EOS] feature in a common space (CLIP's projections)
        self.proj_v, self.proj_t = nn.Linear(c_v, fusion_dim), nn.Linear(c_t, fusion_dim)
        self.mask_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.mask_bias = nn.Parameter(torch.zeros(()))
        # the channel sum of F_t[EOS] ⊙ F_v is linear in each patch's features: it can weigh "lesion" but not
        # "lesion AND on the side the text names". An FFN over the same product (zero-initialised, so training
        # starts from the paper's M) adds the nonlinearity that lets the text pick a lung
        self.coarse_ffn = Mlp(fusion_dim, fusion_dim, 1)
        nn.init.zeros_(self.coarse_ffn.fc2.weight)
        nn.init.zeros_(self.coarse_ffn.fc2.bias)
        hidden = int(self.sam.config.prompt_encoder_config.hidden_size)
        self.text_prompt = Mlp(c_t, hidden, hidden)
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size, image_size=image_size, clip_vision=hf_config_dict(vcfg, drop=("model_type",)),
            text_config=self.text.config, sam2=sam2, n_queries=n_queries,
            fusion_dim=fusion_dim, top_k=top_k, theta=theta, use_qgaf=use_qgaf, use_gpfc=use_gpfc,
            prompts=list(self.prompts), freeze_pretrained=freeze_pretrained,
        )
        if sam2_path is not None or sam2_config is not None:  # rebuilt from the SAM2 it was trained with
            self.config["sam2_config"] = hf_config_dict(self.sam.config, drop=("model_type",), full=True)

    @classmethod
    def from_config(cls, config: str | dict[str, Any], **overrides: Any) -> LAPFT:
        """Build from a name in ``LAPFT_CONFIGS`` or a config dict (e.g. a checkpoint's); None overrides are ignored."""
        return cls(**named_config(config, LAPFT_CONFIGS, "LAPFT", overrides, drop_none=True))

    def trainable_summary(self) -> dict:
        """Trainable and total parameters, and which towers are frozen (the paper: 16.9 M trainable)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable_parameters": int(trainable), "total_parameters": int(total), "frozen": dict(self.frozen)}

    # ---- forward -----------------------------------------------------------------------------
    def _sam_features(self, rgb: torch.Tensor):
        out = self.sam.get_image_features(rgb, return_dict=True)
        maps = list(out.fpn_hidden_states)
        maps[-1] = maps[-1] + self.sam.no_memory_embedding
        b = rgb.shape[0]
        return [f.permute(1, 2, 0).view(b, -1, *size) for f, size in zip(maps, self.sam.backbone_feature_sizes)]

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, tokens_mask: torch.Tensor | None = None) -> dict:
        if image.ndim != 4 or tuple(image.shape[1:]) != (1, self.image_size, self.image_size):
            raise ValueError(f"LAPFT expects B×1×{self.image_size}×{self.image_size} slices (its image size is fixed "
                             f"by the checkpoint), got {tuple(image.shape)}")
        if tokens_mask is None:
            tokens_mask = torch.ones_like(tokens)
        b = image.shape[0]
        rgb = image.expand(-1, 3, -1, -1)  # the grey slice on all three input channels, as CLIP and SAM2 expect
        pad = tokens_mask == 0
        eos = (tokens_mask.sum(1) - 1).clamp(min=0)  # [SEP]/[EOS]: the last real token
        rows = torch.arange(b, device=image.device)
        additive = self.text.additive_mask(tokens_mask)
        v = self.vision.pre_layrnorm(self.vision.embeddings(rgb))  # (B, 1 + g*g, C): CLS, then the patches
        layers = self.vision.encoder.layers
        t = self.text.embed(tokens)
        zone_logits = []
        for i, ((v0, v1), (t0, t1)) in enumerate(zip(self.vision_stages, self.text_stages)):
            for layer in layers[v0:v1]:
                v = layer(v, None)
            t = self.text.run_layers(t, additive, t0, t1)
            if self.qgaf is not None:
                v, t = self.qgaf[i](v, t, pad)
            if self.gpfc is not None:
                zone_logits.append(self.gpfc[i](v[:, 1:], t[rows, eos]))
        t_eos = t[rows, eos]
        patches = self.proj_v(v[:, 1:])  # (B, g*g, D), the CLS token left out
        product = patches * self.proj_t(t_eos)[:, None, :] / math.sqrt(patches.shape[-1])  # F_t[EOS] ⊙ F_v
        coarse = product.sum(-1) * self.mask_scale.exp() + self.mask_bias + self.coarse_ffn(product).squeeze(-1)
        coarse = coarse.view(b, 1, self.grid, self.grid)
        points, valid = select_points(torch.sigmoid(coarse[:, 0]), self.top_k, self.theta)
        scale = self.image_size / self.grid
        xy = (points.flip(-1).float() + 0.5) * scale  # SAM2 wants (x, y) in input pixels
        # SAM2's "not a point" label (-1) for missing points, and for all of them when points are switched off
        use_points = valid if "points" in self.prompts else torch.zeros_like(valid)
        labels = torch.where(use_points, 1, -1).int()
        xy = torch.where(use_points[..., None], xy, torch.zeros_like(xy))
        masks = None
        if "mask" in self.prompts:
            masks = F.interpolate(coarse, size=self.sam.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False)
        sparse, dense = self.sam.prompt_encoder(input_points=xy[:, None], input_labels=labels[:, None], input_boxes=None,
                                                input_masks=masks)
        if "text" in self.prompts:
            sparse = torch.cat([sparse, self.text_prompt(t_eos)[:, None, None, :]], 2)
        features = self._sam_features(rgb)
        positional = self.sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1)
        low_res = self.sam.mask_decoder(image_embeddings=features[-1], image_positional_embeddings=positional,
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False, high_resolution_features=features[:-1])[0]
        size = (self.image_size, self.image_size)
        coarse_full = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        seg = F.interpolate(low_res[:, 0], size=size, mode="bilinear", align_corners=False)
        if "mask" in self.prompts:
            # the decoder refines the coarse mask (a residual on its logits): SAM2 trained from random
            # initialisation segments from its own image features and can learn to disregard a dense prompt,
            # so the text's choice of lung (carried by M) would not reach the mask
            seg = seg + coarse_full
        return {
            "seg_logits": seg,
            "coarse_logits": coarse_full,
            "zone_logits": torch.stack(zone_logits, 1) if zone_logits else image.new_zeros(b, 0, N_ZONES),
            "points": ((points.float() + 0.5) * scale), "points_valid": valid,
        }
