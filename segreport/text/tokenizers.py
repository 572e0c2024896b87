"""Tokenizers for the findings decoders: a word-level vocabulary built from training texts, or any
Hugging Face tokenizer from a local folder, always with [BOS]/[EOS]/[PAD].

Both are real ``transformers`` tokenizer objects: ``save_pretrained(dir)`` and
:func:`load_tokenizer` (``AutoTokenizer.from_pretrained``) round-trip them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from segreport.errors import InputError

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
# Word-level vocabularies put the specials first, so [PAD] is id 0 (the ignore index of the text loss).
WORD_SPECIALS = (PAD, BOS, EOS, UNK)
# Tokens added to a pretrained tokenizer that lacks them (seed 000 added [SOS]/[EOS]/[PAD] to a BERT vocab).
REQUIRED_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}


def build_word_tokenizer(texts: Iterable[str], min_freq: int = 1) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``texts``: lower-cased, split on whitespace and punctuation.

    Ids: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, then words by decreasing frequency (ties
    alphabetical, so the same texts always give the same ids). Words seen fewer than ``min_freq``
    times map to [UNK]. ``tokenizer(text)`` adds [BOS] ... [EOS].
    """
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(None, f"training text #{i} is {type(t).__name__}, not a string: {t!r}")
    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # "areas,lower" (a real annotation slip) must still give "areas" "," "lower"
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(min_frequency=min_freq, special_tokens=list(WORD_SPECIALS), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=True,  # decode "lung , two" as "lung, two"
    )


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add [BOS]/[EOS]/[PAD] where the tokenizer has none; returns how many tokens were added.

    Adding tokens grows ``len(tokenizer)``: size (or resize) text embeddings from it, not from the
    original vocabulary (a BERT vocab of 30522 becomes 30524, as in seed 000).
    """
    missing = {role: tok for role, tok in REQUIRED_SPECIALS.items() if getattr(tokenizer, role) is None}
    return tokenizer.add_special_tokens(missing) if missing else 0


def _auto_tokenizer(path: str | PathLike) -> PreTrainedTokenizerBase:
    if not Path(path).is_dir():
        raise InputError(path, "tokenizer folder not found")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(path, f"not a loadable tokenizer folder ({err})") from err


def load_encoder_tokenizer(path: str | PathLike) -> PreTrainedTokenizerBase:
    """A text ENCODER's tokenizer from a local folder (BERT WordPiece and kin), framed [CLS] ... [SEP].

    Unlike :func:`load_tokenizer` (for decoders), no token is added: the pretrained embedding table must
    keep its size, so [BOS]/[EOS] are the tokenizer's own [CLS]/[SEP] (position 0 is then the [CLS]
    token the text-guided models read).
    """
    tokenizer = _auto_tokenizer(path)
    for role, fallback in (("bos_token", "cls_token"), ("eos_token", "sep_token")):
        if getattr(tokenizer, role) is None:
            if getattr(tokenizer, fallback) is None:
                raise InputError(path, f"tokenizer has neither a {role} nor a {fallback}: not an encoder tokenizer")
            setattr(tokenizer, role, getattr(tokenizer, fallback))
    if tokenizer.pad_token is None:
        raise InputError(path, "tokenizer has no [PAD] token")
    return tokenizer


def load_tokenizer(path: str | PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` (ours or any HF one) from a local folder,
    offline, and make sure it has [BOS]/[EOS]/[PAD] (see :func:`ensure_special_tokens`)."""
    tokenizer = _auto_tokenizer(path)
    ensure_special_tokens(tokenizer)
    return tokenizer


def decode_tokens(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int] | torch.Tensor) -> str | list[str]:
    """Token ids -> text, stopping at the first [EOS] and dropping special tokens.

    A 2D tensor / nested list is a batch and gives a list of strings.
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if ids and isinstance(ids[0], (list, tuple)):
        return [decode_tokens(tokenizer, row) for row in ids]
    ids = [int(i) for i in ids]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def tokenizer_to_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as ``{name: text}``: it travels inside a checkpoint's
    spec, so a checkpoint never needs a tokenizer folder beside it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    """Inverse of :func:`tokenizer_to_files`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        return load_tokenizer(tmp)
