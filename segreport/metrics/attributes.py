"""Lesion attribute accuracy (seed 001, Table 3): accuracy per attribute group and their average.

Groups and class order come from ``segreport.vocab.ATTRIBUTE_GROUPS``. Targets are class indices
with ``-100`` for "not annotated" (the ``ignore_index`` of ``torch.nn.CrossEntropyLoss``); those
lesions are left out of that group only. Predictions per group are class indices ``(N,)`` or
scores ``(N, C)`` (logits or probabilities, softmax or per-class sigmoid alike: the argmax is the
predicted class, so the kind need not be stated).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from segreport.vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES, ATTRIBUTE_NUM_CLASSES

IGNORE_INDEX = -100


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def split_by_group(x, what: str) -> dict[str, np.ndarray]:
    """A ``{group: array}`` mapping from a mapping or from one array in vocab group order.

    ``what="scores"``: ``(N, 13)`` concatenated per-group scores (shape 4 + invasion 2 + density 3
    + heterogeneity 2 + surface 2, as an attribute head emits them). ``what="targets"``:
    ``(N, 5)`` class indices, one column per group.
    """
    if isinstance(x, Mapping):
        unknown = set(x) - set(ATTRIBUTE_GROUPS)
        if unknown:
            raise ValueError(f"unknown attribute groups {sorted(unknown)}; known: {list(ATTRIBUTE_NAMES)}")
        return {g: _numpy(x[g]) for g in ATTRIBUTE_NAMES if g in x}
    arr = _numpy(x)
    widths = [ATTRIBUTE_NUM_CLASSES[g] for g in ATTRIBUTE_NAMES] if what == "scores" else [1] * len(ATTRIBUTE_NAMES)
    if arr.ndim != 2 or arr.shape[1] != sum(widths):
        raise ValueError(f"{what} array must be (N, {sum(widths)}) in group order {list(ATTRIBUTE_NAMES)}, got {arr.shape}")
    edges = np.cumsum([0] + widths)
    parts = {g: arr[:, edges[i] : edges[i + 1]] for i, g in enumerate(ATTRIBUTE_NAMES)}
    return parts if what == "scores" else {g: p[:, 0] for g, p in parts.items()}


def attribute_accuracy(predictions, targets, ignore_index: int = IGNORE_INDEX) -> dict:
    """Accuracy and confusion matrix per group, and the mean accuracy over groups.

    ``predictions``/``targets``: ``{group: array}`` (any subset of the groups, both sides the same)
    or single arrays as described in ``split_by_group``. Returns ``{"accuracy": {group: float},
    "n": {group: annotated lesions}, "confusion": {group: (C, C) int array, rows = target,
    columns = predicted}, "average": mean accuracy over groups}``. A group with no annotated
    lesion has accuracy nan and is left out of the average (nan when no group has any).
    """
    preds = split_by_group(predictions, "scores")
    targs = split_by_group(targets, "targets")
    if set(preds) != set(targs):
        raise ValueError(f"predictions cover groups {sorted(preds)} but targets cover {sorted(targs)}")
    out: dict = {"accuracy": {}, "n": {}, "confusion": {}}
    for g in preds:
        c = ATTRIBUTE_NUM_CLASSES[g]
        if preds[g].ndim == 2 and preds[g].shape[1] != c:
            raise ValueError(f"group {g!r} has {c} classes {ATTRIBUTE_GROUPS[g]}; got scores of shape {preds[g].shape}")
        p = preds[g].argmax(-1) if preds[g].ndim == 2 else preds[g]
        t = targs[g].astype(np.int64).ravel()
        p = p.astype(np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"group {g!r}: {p.size} predictions but {t.size} targets")
        keep = t != ignore_index
        p, t = p[keep], t[keep]
        bad = (t < 0) | (t >= c) | (p < 0) | (p >= c)
        if bad.any():
            raise ValueError(f"group {g!r} has {c} classes {ATTRIBUTE_GROUPS[g]}; got class indices outside 0..{c - 1}")
        out["n"][g] = int(t.size)
        out["accuracy"][g] = float((p == t).mean()) if t.size else float("nan")
        out["confusion"][g] = np.bincount(t * c + p, minlength=c * c).reshape(c, c)
    accs = [a for a in out["accuracy"].values() if not np.isnan(a)]
    out["average"] = float(np.mean(accs)) if accs else float("nan")
    return out
