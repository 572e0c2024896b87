"""A checkpoint of a bundle's default (tiny) configuration, randomly initialised from a seed: what a
speed benchmark or an output-regression test runs when training does not matter (the timings do not
depend on the weights; the outputs of a fixed seed are fixed)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import ADAPTERS

# the word vocabulary of the untrained text models: every word the finding grammar writes
VOCABULARY = ["Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.",
              "Unilateral pulmonary infection, one infected area, upper middle lower left right lung.",
              "No pulmonary infection.", "all upper middle lower left right lung one two three four infected areas"]


def write_untrained_checkpoint(kind: str, path: str | os.PathLike, seed: int = 0, threshold: float | None = None) -> Path:
    """``{"model", "spec"}`` of ``kind`` (:data:`~segreport.models.ADAPTERS`) at ``path``; ``threshold``: the
    mask threshold its spec records (default the model's own)."""
    from ..text.tokenizers import build_word_tokenizer

    if kind not in ADAPTERS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {sorted(ADAPTERS)}")
    torch.manual_seed(seed)
    extra = {} if threshold is None else {"threshold": float(threshold)}
    tokenizer = build_word_tokenizer(VOCABULARY)
    if kind == "medsegtext":
        from ..networks import MedSegText
        from .medsegtext import spec_for

        net = MedSegText.tiny(vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                              eos_id=tokenizer.eos_token_id)
        spec = spec_for(net, tokenizer, image_size=64, max_length=50, **extra)
    elif kind in ("tmc", "lapft"):
        from ..networks import LAPFT, TMC
        from . import lapft, tmc

        cls, adapter = (TMC, tmc) if kind == "tmc" else (LAPFT, lapft)
        net = cls.from_config("tiny", vocab_size=len(tokenizer), image_size=64)
        spec = adapter.spec_for(net, tokenizer, 64, 32, **extra)
    else:  # the bundle's default: train.yaml's network_def
        from . import lesion_report_3d as lr3d

        net = lr3d.build_network(backbone="resunet", lesion_pooling=True, attr_gradient="normalised", click_components=True)
        spec = lr3d.spec_for(net, **extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "spec": spec}, path)
    return path
