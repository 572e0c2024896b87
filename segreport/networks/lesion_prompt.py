"""Interactive 3D lesion segmentation + structured attribute report (seed 001, Gu et al., MICCAI 2025).

``LesionPromptNet`` = Vision-Prompt Hybrid Token Encode module (ViT image encoder E_I, point prompt
encoder E_P with feature-space K-means point refinement, hybrid token encoder E_H) + Synergistic Task
Integration Decode module (mask head H_seg, attribute head H_attr, inter-task feature synergy, eq. 3).

The image side (``encode_image``) and the prompt side (``decode``) are separate calls so an interactive
session encodes the ROI once and reruns only ``decode`` per click (see benchmarks/bench_click_latency.py).

Two image backbones (``backbone``), everything after them shared (hybrid tokens, H_seg, H_attr, synergy):

* ``"vit"``: the paper's ViT with windowed + global attention (the configuration below);
* ``"resunet"``: an nnInteractive-style residual-encoder U-Net from MONAI blocks
  (:mod:`segreport.networks.blocks.residual_unet`): the clicks and the previous mask enter its
  decoder at every resolution as dense maps, and the hybrid tokens run at its bottleneck. It learns
  from few cases and listens to its clicks (numbers in the bundle's docs); the encoder is cached as
  the ViT is.

``lesion_pooling`` (our addition, either backbone): the attribute classifier also reads features pooled
inside the predicted mask and in a ring around it, plus measured descriptors of the predicted lesion
(:mod:`segreport.networks.blocks.lesion_features`). ``attr_gradient="normalised"`` bounds what the
attribute loss sends into the shared trunk (:mod:`segreport.networks.blocks.gradient_balance`).
``click_components``: with positive clicks the mask is the connected components they touch.
The paper's model is the ViT with all three off (``variant_vit.yaml`` in the bundle).

The paper gives no sizes. The ``paper`` configuration takes SAM-Med3D's ViT-B (128³ ROI, 16³ patches,
768-wide, 12 blocks, global attention at 2/5/8/11, 384-wide prompt/decoder side), the closest published
3D SAM, which the paper compares against; the ViT window, the K-means k and window p and the head
depths are our choices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock, UpSample
from monai.networks.nets.vista3d import MLP, TwoWayTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

from segreport.networks.blocks.click_components import clicked_components, keep_clicked
from segreport.networks.blocks.cpu_convs import fast_cpu_convs
from segreport.networks.blocks.gradient_balance import GradientBalance
from segreport.networks.blocks.lesion_features import LesionAttributeFeatures, image_maps
from segreport.networks.blocks.lesion_heads import AttributeClassifier, AttributeHead, ImageEmbedding, InterTaskSynergy
from segreport.networks.blocks.prompt import PAD_LABEL, PromptEncoder3D, kmeans_refine_points
from segreport.networks.blocks.residual_unet import (
    PointwiseConv3d, PromptFusionDecoder3D, PromptPyramid, ResidualEncoder3D, prompt_maps,
)
from segreport.networks.blocks.vit3d import ViTImageEncoder3D, channel_layer_norm_3d
from segreport.vocab import ATTRIBUTE_NUM_CLASSES

__all__ = ["LesionPromptNet", "ImageEmbedding", "CONFIGS", "RESUNET_CONFIGS"]

CONFIGS: dict[str, dict[str, Any]] = {
    # for tests and CPU smoke runs: 32³ ROI, 8³ token grid, 32-wide, 2 layers everywhere
    "tiny": dict(
        img_size=32, patch_size=4, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, window_size=4,
        global_attn_indexes=(1,), embed_dim=32, mask_in_chans=16, token_depth=2, num_heads=2, mlp_dim=64,
        mask_head_depth=1, iou_head_hidden=32,
    ),
    # SAM-Med3D ViT-B sizes (see module docstring); a GPU configuration
    "paper": dict(
        img_size=128, patch_size=16, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, window_size=4,
        global_attn_indexes=(2, 5, 8, 11), embed_dim=384, mask_in_chans=16, token_depth=2, num_heads=8,
        mlp_dim=2048, mask_head_depth=2, iou_head_hidden=256,
    ),
}
# the residual U-Net backbone per configuration (overrides of the above: its stages replace the ViT's)
BACKBONES = ("vit", "resunet")
RESUNET_CONFIGS: dict[str, dict[str, Any]] = {
    # 32³ ROI: stages at 32/16/8/4 voxels, the hybrid tokens on the 4³ bottleneck
    "tiny": dict(unet_features=(8, 16, 32, 64), unet_blocks=(1, 2, 3, 4), embed_dim=64, num_heads=4, mlp_dim=128, conv_head=True),
    # nnInteractive's ResEnc-L widths and depths (its 6th stage dropped: a 128³ ROI bottoms out at 8³)
    "paper": dict(unet_features=(32, 64, 128, 256, 320), unet_blocks=(1, 3, 4, 6, 6), embed_dim=384, conv_head=True),
}


# attr_gradient -> GradientBalance ratio (attribute gradient into the trunk / mask's); None: unbounded
ATTR_GRADIENT_RATIO = {"full": None, "normalised": 1.0}


class LesionPromptNet(nn.Module):
    """Click-prompted 3D lesion segmentation with structured attributes (seed 001).

    Args:
        img_size: ROI size (D, H, W) the model takes; inputs are (B, in_channels, *img_size).
        in_channels: image channels.
        patch_size: ViT patch size; the image embedding grid is img_size / patch_size.
        encoder_embed_dim, encoder_depth, encoder_num_heads, mlp_ratio: ViT width, blocks, heads.
        window_size: local attention window (in tokens) of the non-global ViT blocks; 0 = all global.
        global_attn_indexes: ViT blocks with global attention.
        embed_dim: image-embedding / prompt / token width (the ViT neck projects to it).
        mask_in_chans: hidden channels of the mask-prompt downscaler.
        token_depth: two-way transformer layers of the hybrid token encoder E_H.
        num_heads, mlp_dim: heads and MLP width of E_H, the heads and the synergy block.
        mask_head_depth: transformer layers in which the mask tokens attend to the hybrid tokens (H_seg).
        num_multimask_outputs: extra mask tokens for SAM-style ambiguity-aware output (0 = single mask).
        iou_head_hidden: hidden width of the IoU prediction MLP.
        attribute_groups: {group: number of classes}; default the five groups of ``segreport.vocab``.
        point_refinement: enable feature-space K-means point refinement (eq. 1-2).
        refine_window, refine_k, refine_iters: window p (in feature cells), clusters k, Lloyd steps.
        synergy: enable inter-task feature synergy (eq. 3).
        dropout_rate: ViT dropout.
        backbone: ``"vit"`` (the paper's) or ``"resunet"`` (module docstring); the ViT arguments above
            are unused with ``"resunet"``.
        unet_features, unet_blocks: channels and residual blocks per stage of the residual U-Net.
        lesion_pooling: the attribute classifier also reads features pooled inside the predicted mask
            and in a ring around it, plus the measured lesion descriptors.
        conv_head: add a 1x1 conv of the full-resolution features to the hypernetwork's mask (a U-Net's
            own segmentation head beside SAM's; the mask tokens, and so the synergy, still shape it).
        attr_gradient: what the attribute loss sends into the shared trunk: ``"full"`` (the paper),
            or ``"normalised"`` (capped at the mask loss's running gradient norm, :class:`GradientBalance`).
        click_components: with positive clicks, the mask is the connected components they touch
            (:mod:`~segreport.networks.blocks.click_components`), and the attribute head pools over
            those. In a training step with gradient the returned mask stays whole (the loss trains
            every voxel); the no-gradient correction rounds and inference see the clicked lesion.
    """

    def __init__(
        self,
        img_size: Sequence[int] | int = 128,
        in_channels: int = 1,
        patch_size: Sequence[int] | int = 16,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 4,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        embed_dim: int = 384,
        mask_in_chans: int = 16,
        token_depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        mask_head_depth: int = 2,
        num_multimask_outputs: int = 0,
        iou_head_hidden: int = 256,
        attribute_groups: Mapping[str, int] | None = None,
        point_refinement: bool = True,
        refine_window: int = 3,
        refine_k: int = 3,
        refine_iters: int = 5,
        synergy: bool = True,
        dropout_rate: float = 0.0,
        backbone: str = "vit",
        unet_features: Sequence[int] = (8, 16, 32, 64),
        unet_blocks: Sequence[int] = (1, 2, 3, 4),
        lesion_pooling: bool = False,
        attr_gradient: str = "full",
        conv_head: bool = False,
        click_components: bool = False,
    ):
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be a multiple of 8 (upscaling to embed_dim/8), got {embed_dim}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")
        if attr_gradient not in ATTR_GRADIENT_RATIO:
            raise ValueError(f"attr_gradient must be one of {sorted(ATTR_GRADIENT_RATIO)}, got {attr_gradient!r}")
        self.backbone = backbone
        self.click_components = bool(click_components)
        self.img_size = ensure_tuple_rep(img_size, 3)
        self.point_refinement = point_refinement
        self.refine_window, self.refine_k, self.refine_iters = refine_window, refine_k, refine_iters
        self.num_mask_tokens = num_multimask_outputs + 1
        self.attribute_groups = dict(ATTRIBUTE_NUM_CLASSES if attribute_groups is None else attribute_groups)

        # --- Vision-Prompt Hybrid Token Encode module
        self.output_upscaling = self.prompt_decoder = None
        if backbone == "resunet":
            self.image_encoder = ResidualEncoder3D(in_channels, unet_features, unet_blocks, out_channels=embed_dim)
            down = self.image_encoder.downsampling
            if any(s % down for s in self.img_size):
                raise ValueError(f"img_size {self.img_size} must be divisible by {down} ({len(unet_features)} stages)")
            self.grid_size = tuple(s // down for s in self.img_size)
            self.prompt_decoder = PromptFusionDecoder3D(unet_features, embed_dim)
            mask_channels = int(unet_features[0])
        else:
            mask_channels = self._build_vit(img_size, in_channels, patch_size, encoder_embed_dim, encoder_depth, encoder_num_heads,
                                            mlp_ratio, window_size, global_attn_indexes, embed_dim, dropout_rate)
        self.prompt_encoder = PromptEncoder3D(embed_dim, self.grid_size, self.img_size, mask_in_chans)
        self.iou_token = nn.Embedding(1, embed_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, embed_dim)
        # E_H: SAM's two-way transformer (token self-attn, token->image and image->token cross-attn),
        # reused from MONAI's VISTA3D port
        self.token_encoder = TwoWayTransformer(
            depth=token_depth, embedding_dim=embed_dim, num_heads=num_heads, mlp_dim=mlp_dim
        )

        # --- Synergistic Task Integration Decode module
        # H_seg: mask tokens attend to the hybrid tokens Z (prompt/IoU/mask tokens + image tokens)
        self.mask_head_layers = nn.ModuleList(
            TransformerBlock(embed_dim, mlp_dim, num_heads, with_cross_attention=True, use_flash_attention=True)
            for _ in range(mask_head_depth)
        )
        self.attribute_head = AttributeHead(embed_dim, num_heads, mlp_dim)
        self.synergy = InterTaskSynergy(embed_dim, num_heads) if synergy else None
        # the hypernetwork: one MLP per mask token -> weights over the full-resolution feature channels
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(embed_dim, embed_dim, mask_channels, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(embed_dim, iou_head_hidden, self.num_mask_tokens, 3)
        self.conv_head = PointwiseConv3d(mask_channels, self.num_mask_tokens) if conv_head else None
        self.lesion_features = LesionAttributeFeatures(mask_channels, embed_dim) if lesion_pooling else None
        self.attribute_classifier = AttributeClassifier(embed_dim, self.attribute_groups, embed_dim if lesion_pooling else 0)
        ratio = ATTR_GRADIENT_RATIO[attr_gradient]
        self.balance_tokens = GradientBalance(ratio) if ratio is not None else None
        self.balance_features = GradientBalance(ratio) if ratio is not None else None
        self.balance_mask_tokens = GradientBalance(ratio) if ratio is not None and synergy else None
        fast_cpu_convs(self)  # an interactive session runs batch 1: oneDNN, not PyTorch's reference kernel

    def _build_vit(self, img_size, in_channels, patch_size, encoder_embed_dim, encoder_depth, encoder_num_heads, mlp_ratio,
                   window_size, global_attn_indexes, embed_dim, dropout_rate) -> int:
        """The paper's image side: ViT encoder and SAM's x4 upscaling; returns its channels."""
        self.image_encoder = ViTImageEncoder3D(
            img_size=self.img_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=mlp_ratio,
            window_size=window_size,
            global_attn_indexes=global_attn_indexes,
            out_channels=embed_dim,
            dropout_rate=dropout_rate,
        )
        self.grid_size = self.image_encoder.grid_size
        # SAM's x4 upscaling of the image embedding (two stride-2 transposed convs) for the hypernetwork
        self.output_upscaling = nn.Sequential(
            UpSample(3, embed_dim, embed_dim // 4, scale_factor=2, mode="deconv"),
            channel_layer_norm_3d(embed_dim // 4),
            nn.GELU(),
            UpSample(3, embed_dim // 4, embed_dim // 8, scale_factor=2, mode="deconv"),
            nn.GELU(),
        )
        return embed_dim // 8

    # ------------------------------------------------------------------ configurations
    @classmethod
    def from_config(cls, name: str, **overrides: Any) -> LesionPromptNet:
        """Build a named configuration (``"tiny"`` or ``"paper"``) of the ``backbone`` given in
        ``overrides`` (default the ViT), any argument overridable."""
        if name not in CONFIGS:
            raise ValueError(f"unknown LesionPromptNet config {name!r}; choose from {sorted(CONFIGS)}")
        backbone = RESUNET_CONFIGS[name] if overrides.get("backbone") == "resunet" else {}
        return cls(**{**CONFIGS[name], **backbone, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> LesionPromptNet:
        return cls.from_config("tiny", **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> LesionPromptNet:
        return cls.from_config("paper", **overrides)

    # ------------------------------------------------------------------ API
    def encode_image(self, image: torch.Tensor) -> ImageEmbedding:
        """E_I: (B, in_channels, *img_size) -> :class:`ImageEmbedding` (grid (B, embed_dim, *grid_size)
        [+ the U-Net's skips] [+ the image maps, for the lesion descriptors]). Cache it per ROI."""
        descriptors = self.lesion_features is not None and self.lesion_features.descriptors
        keep = image_maps(image) if descriptors else None
        if self.prompt_decoder is not None:
            grid, skips = self.image_encoder(image)
            return ImageEmbedding(grid, tuple(skips), keep)
        return ImageEmbedding(self.image_encoder(image), None, keep)

    def decode(
        self,
        embedding: ImageEmbedding,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> dict[str, Any]:
        """Prompt side: embedding + clicks (+ previous mask) -> mask, IoU and attribute predictions.

        Args:
            embedding: output of ``encode_image`` (a bare grid tensor is accepted for the ViT without
                lesion descriptors); a batch of 1 is shared by all prompt sets.
            points: (B, N, 3) ROI voxel coordinates along (D, H, W); None or N=0 for no clicks.
            point_labels: (B, N): 1 positive, 0 negative, -1 padding (all -1 = no clicks).
            mask_prompt: previous ``low_res_logits`` (B, 1, 4d, 4h, 4w), or a mask at any size.
            multimask_output: return the ``num_multimask_outputs`` ambiguity masks instead of the single one.

        Returns:
            dict with ``mask_logits`` (B, M, *img_size), ``low_res_logits`` (B, M, 4d, 4h, 4w),
            ``iou_pred`` (B, M), ``attr_logits`` {group: (B, classes)}, and ``points``/``point_labels``:
            the prompts actually encoded (clicks, then k refined points per click).
        """
        if isinstance(embedding, torch.Tensor):
            embedding = ImageEmbedding(embedding)
        if (embedding.high_res is None) != (self.prompt_decoder is None):
            raise ValueError("this embedding was not made by this model's encode_image (encoder skips differ)")
        points, point_labels = self._prepare_points(embedding.grid, points, point_labels, mask_prompt)
        clicks, click_labels = points, point_labels  # as given: the refined points are added below
        b = points.shape[0]
        grid, high_res, image = embedding.expand(b)
        maps = None
        if self.prompt_decoder is not None:  # the clicks as given (not the refined points) and the previous mask
            maps = PromptPyramid(prompt_maps(points, point_labels, self.img_size, mask_prompt).to(grid.dtype))
        if self.point_refinement:
            extra, extra_labels = kmeans_refine_points(
                grid, points, point_labels, self.img_size, self.refine_window, self.refine_k, self.refine_iters
            )
            points, point_labels = torch.cat([points, extra], 1), torch.cat([point_labels, extra_labels], 1)

        # E_H: hybrid tokens Z from [IoU token, mask tokens, prompt tokens] and the image tokens
        sparse = self.prompt_encoder.embed_points(points, point_labels)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse], 1)
        src = grid + self.prompt_encoder.embed_masks(mask_prompt, b)
        if maps is not None:
            src = self.prompt_decoder.fuse_bottleneck(src, maps)
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1, -1)
        hs, img = self.token_encoder(src, pos, tokens)  # (B, T, C), (B, d*h*w, C)
        valid = torch.cat([torch.ones_like(output_tokens[..., 0], dtype=torch.bool), point_labels != PAD_LABEL], 1)
        hs, hs_attr = self.balance_tokens(hs) if self.balance_tokens is not None else (hs, hs)

        # H_seg: M = H_seg(M0, Z)
        m = hs[:, 1 : 1 + self.num_mask_tokens]
        context = torch.cat([hs, img + pos.flatten(2).transpose(1, 2)], 1)
        for layer in self.mask_head_layers:
            m = layer(m, context=context)
        # H_attr: A = H_attr(Z) over the hybrid tokens
        a = self.attribute_head(hs_attr, valid)
        if self.synergy is not None:  # the attribute side reads the mask tokens through the balance too
            m, m_attr = self.balance_mask_tokens(m) if self.balance_mask_tokens is not None else (m, m)
            m, a = self.synergy(m, a, valid, m_for_attr=m_attr)

        # mask: hypernetwork weights from the mask tokens x upscaled image embedding
        d, h, w = self.grid_size
        img = img.transpose(1, 2).reshape(b, -1, d, h, w)
        upscaled = self.output_upscaling(img) if self.prompt_decoder is None else self.prompt_decoder(img, high_res, maps)
        upscaled, up_attr = self.balance_features(upscaled) if self.balance_features is not None else (upscaled, upscaled)
        hyper = torch.stack([mlp(m[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        low_res = (hyper @ upscaled.flatten(2)).reshape(b, self.num_mask_tokens, *upscaled.shape[2:])
        if self.conv_head is not None:
            low_res = low_res + self.conv_head(upscaled)
        iou_pred = self.iou_prediction_head(hs[:, 0])

        sel = slice(1, None) if multimask_output and self.num_mask_tokens > 1 else slice(0, 1)
        low_res, iou_pred = low_res[:, sel], iou_pred[:, sel]
        if tuple(low_res.shape[2:]) == self.img_size:
            mask_logits = low_res
        else:
            mask_logits = F.interpolate(low_res, size=self.img_size, mode="trilinear", align_corners=False)
        lesion_logits = mask_logits
        if self.click_components and clicks.shape[1]:  # the lesion clicked, not every lesion-like region
            keep = clicked_components(mask_logits[:, :1], clicks, click_labels)
            lesion_logits = keep_clicked(mask_logits, keep)
            if not (self.training and torch.is_grad_enabled()):  # the loss still trains every voxel
                low_res = lesion_logits if low_res is mask_logits else keep_clicked(low_res, keep)
                mask_logits = lesion_logits
        extra = None
        if self.lesion_features is not None:  # H_attr also looks at the predicted lesion and its surroundings
            extra = self.lesion_features(up_attr, torch.sigmoid(lesion_logits[:, :1]), image)
        return {
            "mask_logits": mask_logits,
            "low_res_logits": low_res,
            "iou_pred": iou_pred,
            "attr_logits": self.attribute_classifier(a, valid, extra),
            "points": points,
            "point_labels": point_labels,
        }

    def forward(
        self,
        image: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> dict[str, Any]:
        """``decode(encode_image(image), ...)``."""
        return self.decode(self.encode_image(image), points, point_labels, mask_prompt, multimask_output)

    def _prepare_points(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_prompt: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise the click inputs to float (B, N, 3) / long (B, N); no clicks -> N = 0."""
        if (points is None) != (labels is None):
            raise ValueError("give both points and point_labels, or neither")
        if points is None:
            b = mask_prompt.shape[0] if mask_prompt is not None else embedding.shape[0]
            points = embedding.new_zeros((b, 0, 3))
            labels = torch.zeros((b, 0), dtype=torch.long, device=embedding.device)
        if embedding.shape[0] not in (1, points.shape[0]):
            raise ValueError(f"embedding batch {embedding.shape[0]} does not match points batch {points.shape[0]}")
        return points.to(embedding.dtype), labels.long()
