"""Finding text -> fixed-length token ids ``[BOS] ... [EOS] [PAD] ...`` plus an attention mask."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from os import PathLike

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple
from transformers import PreTrainedTokenizerBase

from segreport.errors import InputError
from segreport.text.tokenizers import decode_tokens, load_tokenizer

__all__ = ["TokenizeText", "TokenizeTextd", "decode_tokens"]


class TokenizeText(Transform):
    """``text -> (ids, mask)``, two LongTensors of length ``max_length`` (seed 000 uses 50).

    The sequence is always ``[BOS] words [EOS]`` then [PAD] (mask 0), whatever the tokenizer's own
    template ([CLS]/[SEP] for BERT) is, so every decoder sees the same framing. Long texts are
    truncated before [EOS], which is always kept. ``tokenizer`` is a tokenizer object with
    bos/eos/pad tokens or a local folder (loaded with :func:`~segreport.text.tokenizers.load_tokenizer`).
    Empty or non-string text raises :class:`~segreport.errors.InputError`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | str | PathLike, max_length: int = 50):
        if isinstance(tokenizer, (str, PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        missing = [role for role in ("bos_token", "eos_token", "pad_token") if getattr(tokenizer, role) is None]
        if missing:
            raise ValueError(f"tokenizer lacks {missing}: load it with load_tokenizer() or call ensure_special_tokens() first")
        if max_length < 3:
            raise ValueError(f"max_length must leave room for [BOS], one token and [EOS], got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, text: str, path=None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(text, str) or not text.strip():
            raise InputError(path, f"finding text must be a non-empty string, got {text!r}")
        tok = self.tokenizer
        body = tok.encode(text, add_special_tokens=False)[: self.max_length - 2]
        seq = [tok.bos_token_id, *body, tok.eos_token_id]
        n_pad = self.max_length - len(seq)
        ids = torch.tensor(seq + [tok.pad_token_id] * n_pad, dtype=torch.long)
        mask = torch.tensor([1] * len(seq) + [0] * n_pad, dtype=torch.long)
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str | list[str]:
        """Ids (or a batch) -> text, stopping at [EOS], specials dropped."""
        return decode_tokens(self.tokenizer, ids)


class TokenizeTextd(MapTransform):
    """Dictionary version of :class:`TokenizeText`: ``text`` -> ``tokens`` and ``tokens_mask``.

    ``ids_key``/``mask_key`` name the outputs, one per key in ``keys`` (so two text keys need two
    names each). The text itself is kept for metrics and reports. Errors name the item's image
    file or ``case_id``.
    """

    def __init__(
        self,
        keys: KeysCollection = "text",
        tokenizer: PreTrainedTokenizerBase | str | PathLike | None = None,
        max_length: int = 50,
        ids_key: Sequence[str] | str = "tokens",
        mask_key: Sequence[str] | str = "tokens_mask",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if tokenizer is None:
            raise ValueError("TokenizeTextd needs a tokenizer (object or local folder)")
        self.ids_key, self.mask_key = ensure_tuple(ids_key), ensure_tuple(mask_key)
        if not len(self.ids_key) == len(self.mask_key) == len(self.keys):
            raise ValueError(f"need one ids_key and one mask_key per text key {self.keys}, got {self.ids_key}, {self.mask_key}")
        self.tokenizer = TokenizeText(tokenizer, max_length)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        image = d.get("image")
        source = getattr(image, "meta", {}).get("filename_or_obj") or (image if isinstance(image, str) else None) or d.get("case_id")
        for key, ids_key, mask_key in self.key_iterator(d, self.ids_key, self.mask_key):
            d[ids_key], d[mask_key] = self.tokenizer(d[key], path=source)
        return d
