"""Case-level, stratified, seeded data splits.

Slices of one scan are strongly correlated, so splits are always drawn over *cases* and slice
items follow their case (:func:`split_datalist`): no case ever has slices in two splits.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from segreport.data.readers import write_datalist_json

SPLIT_NAMES = ("training", "validation", "test")
ZEROSHOT = "zeroshot"


def _split_ratios(ratios: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    """Name each ratio and normalise. Accepts fractions that sum to 1 (0.7, 0.1, 0.2) or integer
    parts (7, 1, 2); 2 values mean training/test, 3 training/validation/test, a mapping names them."""
    if isinstance(ratios, Mapping):
        named = {str(k): v for k, v in ratios.items()}
    elif len(ratios) == 3:
        named = dict(zip(SPLIT_NAMES, ratios))
    elif len(ratios) == 2:
        named = {"training": ratios[0], "test": ratios[1]}
    else:
        raise ValueError(f"ratios must have 2 or 3 values (or be a mapping name -> ratio), got {ratios!r}")
    values = list(named.values())
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"ratios must be finite, non-negative and not all zero, got {ratios!r}")
    total = float(sum(values))
    if not (math.isclose(total, 1.0, abs_tol=1e-6) or all(float(v).is_integer() for v in values)):
        raise ValueError(f"ratios must sum to 1 (got {total:g} for {ratios!r}) or be integer parts such as (7, 1, 2)")
    return {name: v / total for name, v in named.items()}


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` into integer counts proportional to ``fractions`` (Hamilton's method): floor every
    quota, then hand the leftover cases to the largest remainders, ties to the earlier split."""
    quotas = [n * f for f in fractions]
    counts = [math.floor(q) for q in quotas]
    for k in sorted(range(len(quotas)), key=lambda k: (-_remainder(quotas[k]), k))[: n - sum(counts)]:
        counts[k] += 1
    return counts


def _remainder(quota: float) -> float:
    # rounded so float noise (8 * 0.7 - 5 < 8 * 0.2 - 1) cannot break a true tie
    return round(quota - math.floor(quota), 9)


def _stratified_counts(sizes: Sequence[int], fractions: Sequence[float]) -> list[list[int]]:
    """Per-stratum split counts close to ``size * fraction`` (normally within one case) that add up
    exactly to the largest-remainder split of all cases. Rounding every stratum on its own would drift: five strata
    of 8 cases at 0.7/0.1/0.2 give 30/5/5 instead of 28/4/8.

    Every stratum first gets the floor of its quotas; its leftover cases then go, largest remainder
    first, to splits that are still short of their global count (at most one extra per split)."""
    counts = [[math.floor(n * f) for f in fractions] for n in sizes]
    short = [g - sum(c[k] for c in counts) for k, g in enumerate(_largest_remainder(sum(sizes), fractions))]
    left = [n - sum(c) for n, c in zip(sizes, counts)]
    seats = sorted(
        ((s, k) for s, n in enumerate(sizes) for k, f in enumerate(fractions)),
        key=lambda sk: (-_remainder(sizes[sk[0]] * fractions[sk[1]]), sk[1], sk[0]),
    )
    for s, k in seats:
        if left[s] and short[k] and _remainder(sizes[s] * fractions[k]) > 0:
            counts[s][k] += 1
            left[s] -= 1
            short[k] -= 1
    # rare leftovers the one-extra rule cannot place go wherever the global count still has room
    for s in range(len(sizes)):
        for k in range(len(fractions)):
            extra = min(left[s], short[k])
            counts[s][k] += extra
            left[s] -= extra
            short[k] -= extra
    return counts


def _stratum(case: Mapping, keys: tuple[str, ...]) -> tuple:
    return tuple(case.get(k) for k in keys)


def _held_out(cases: Sequence[Mapping], holdout: Mapping) -> set[str]:
    """The ids of the cases whose ``holdout["key"]`` is one of ``holdout["values"]`` (the zero-shot split)."""
    if not isinstance(holdout, Mapping) or set(holdout) != {"key", "values"}:
        raise ValueError(f"holdout must be {{'key': ..., 'values': [...]}}, got {holdout!r}")
    values = set(holdout["values"])
    return {str(c["case_id"]) for c in cases if c.get(holdout["key"]) in values}


def split_cases(
    cases: Sequence[Mapping],
    ratios: Sequence[float] | Mapping[str, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify_by: str | Sequence[str] | None = "severity",
    holdout: Mapping | None = None,
) -> dict[str, list[str]]:
    """Assign every case id to one split. Returns ``{"training": [...], "validation": [...],
    "test": [...]}`` (sorted case ids; ``"zeroshot"`` added when ``holdout`` is given).

    ``cases`` are dicts with ``case_id`` and the ``stratify_by`` key(s); slice items may be passed
    directly (several per case: the stratum must then agree within a case). A case missing a
    stratify key forms its own stratum (value None). Each stratum is shuffled with a generator
    seeded by (``seed``, stratum) and divided by the ratios with largest-remainder rounding that
    also keeps the overall split sizes exact (see :func:`_stratified_counts`), so a stratum of at
    least ``1 / training ratio`` cases always has a case in training.

    ``holdout={"key": "lesion_type", "values": [...]}`` moves every case whose key is in ``values``
    to ``"zeroshot"`` before splitting (zero-shot protocol). Bad ratios raise ValueError.
    """
    fractions = _split_ratios(ratios)
    if stratify_by is None:
        keys: tuple[str, ...] = ()
    else:
        keys = (stratify_by,) if isinstance(stratify_by, str) else tuple(stratify_by)

    # one stratum per case, however many items (slices) the case has
    strata: dict[str, tuple] = {}
    for case in cases:
        if "case_id" not in case:
            raise ValueError(f"split_cases: item without 'case_id': {dict(case)}")
        case_id, stratum = str(case["case_id"]), _stratum(case, keys)
        if strata.setdefault(case_id, stratum) != stratum:
            raise ValueError(f"case {case_id!r} has items in two strata {strata[case_id]} and {stratum} for {keys}")
    if not strata:
        raise ValueError("split_cases: no cases")

    splits: dict[str, list[str]] = {name: [] for name in (*SPLIT_NAMES, *fractions)}
    if holdout is not None:
        held = _held_out(cases, holdout)
        if not held:
            raise ValueError(f"holdout: no case has {holdout['key']!r} in {sorted(set(holdout['values']), key=str)}")
        splits[ZEROSHOT] = sorted(held)
        strata = {c: s for c, s in strata.items() if c not in held}

    by_stratum: dict[tuple, list[str]] = {}
    for case_id, stratum in strata.items():
        by_stratum.setdefault(stratum, []).append(case_id)
    # sorted, then seeded: neither input order nor PYTHONHASHSEED may change a split, only the seed
    # (a str seed is hashed deterministically by random.Random, unlike hash())
    order = sorted(by_stratum, key=repr)
    random.Random(f"{seed}|strata").shuffle(order)  # which stratum wins a tied rounding seat
    groups = [sorted(by_stratum[stratum]) for stratum in order]
    for stratum, ids in zip(order, groups):
        random.Random(f"{seed}|{stratum!r}").shuffle(ids)
    for ids, counts in zip(groups, _stratified_counts([len(g) for g in groups], list(fractions.values()))):
        start = 0
        for name, count in zip(fractions, counts):
            splits[name].extend(ids[start : start + count])
            start += count
    return {name: sorted(ids) for name, ids in splits.items()}


def read_splits(path: str | os.PathLike, cases: Sequence[Mapping], holdout: Mapping | None = None) -> dict[str, list[str]]:
    """A dataset's own case split (``splits.json``: ``{"training": [...], "validation": [...], "test": [...]}``,
    as the phantom writes it and nnU-Net's ``splits_final.json`` fixes a split), restricted to the ``case_id``
    of ``cases``. ``holdout`` as in :func:`split_cases`: those cases leave their split for ``"zeroshot"``. A split name
    other than training/validation/test, a case in two splits or a file that is not such a mapping is a
    ValueError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON split file ({exc})") from exc
    if not isinstance(raw, Mapping) or not set(raw) <= set(SPLIT_NAMES) or \
            not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in raw.values()):
        raise ValueError(f"{path}: expected {{split: [case ids]}} with splits among {SPLIT_NAMES}")
    owner: dict[str, str] = {}
    for name, ids in raw.items():
        for case_id in ids:
            if owner.setdefault(case_id, name) != name:
                raise ValueError(f"{path}: case {case_id!r} is in both {owner[case_id]!r} and {name!r}")
    wanted = {str(c["case_id"]) for c in cases}
    held = set() if holdout is None else _held_out(cases, holdout)
    splits = {name: sorted(c for c in raw.get(name, []) if c in wanted and c not in held) for name in SPLIT_NAMES}
    if holdout is not None:
        splits[ZEROSHOT] = sorted(held)
    return splits


def split_datalist(items: Sequence[Mapping], splits: Mapping[str, Sequence[str]]) -> dict[str, list[dict]]:
    """Map items (case- or slice-level, grouped by ``case_id``) onto the case-id splits, keeping
    item order. Every item's case must be in exactly one split."""
    owner: dict[str, str] = {}
    for name, ids in splits.items():
        for case_id in ids:
            if owner.setdefault(str(case_id), name) != name:
                raise ValueError(f"case {case_id!r} is in two splits: {owner[str(case_id)]} and {name}")
    out: dict[str, list[dict]] = {name: [] for name in splits}
    orphans = set()
    for item in items:
        name = owner.get(str(item.get("case_id")))
        if name is None:
            orphans.add(str(item.get("case_id")))
        else:
            out[name].append(dict(item))
    if orphans:
        raise ValueError(f"{len(orphans)} case(s) are in no split, e.g. {sorted(orphans)[:5]}")
    return out


def write_split_json(
    path: str | os.PathLike,
    items: Sequence[Mapping],
    splits: Mapping[str, Sequence[str]],
    *,
    metadata: Mapping | None = None,
) -> Path:
    """Write the split datalist as JSON: one list per split, loadable with
    ``monai.data.load_decathlon_datalist(path, data_list_key="training")``. Empty splits are left
    out (MONAI's loader fails on an empty ``test`` list)."""
    datalists = {name: subset for name, subset in split_datalist(items, splits).items() if subset}
    return write_datalist_json(path, datalists, metadata=metadata)
