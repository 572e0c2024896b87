"""The LViT / MosMedData+ finding grammar: write it from counts and zones, read it back tolerantly.

Grammar, as the real LViT annotations write it (QaTa-COV19 text, LViT ``LV_loss.xlsx``)::

    <Unilateral|Bilateral> pulmonary infection, <N> infected area(s), <zones> left lung[ and <zones> right lung].

``N`` is a number word; ``<zones>`` is a run of upper/middle/lower in craniocaudal order or ``all``. The
real rows always name the left lung first. A case without lesions (CT-0) has no LViT sentence; we write
:data:`NO_FINDING` ("No pulmonary infection."), which the parser reads back as zero areas and no zones.

The parser corrects typos word by word with :mod:`difflib` ("midlle" -> "middle"), splits glued words
("lowerleft") and tolerates missing or doubled spaces ("areas,lower"). Levels are collected until a
side word (left/right) claims them; a side named without levels means the whole lung ("left lung").
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable

from ..vocab import LEVELS, SIDES, ZONES

NO_FINDING = "No pulmonary infection."

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
_SYNONYMS = {"mid": "middle", "entire": "all", "whole": "all", "lungs": "lung"}
_VOCAB = sorted(
    {"unilateral", "bilateral", "pulmonary", "infection", "infected", "area", "areas", "lung", "and", "no", "all"}
    | set(LEVELS) | set(SIDES) | set(_NUMBERS)
)  # fmt: skip
_AREA_WORDS = {"area", "areas", "infected"}


def number_word(n: int) -> str:
    """``3 -> "three"``; numbers past twenty stay digits (no real annotation gets there)."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def format_finding(n_areas: int, zones: Iterable[str], all_word: bool = True) -> str:
    """The LViT sentence for ``n_areas`` lesions touching ``zones`` (names from :data:`vocab.ZONES`).

    Left lung first, levels in craniocaudal order; a side with all three levels is written "all"
    (``all_word=False`` writes "upper middle lower", the other form real annotations use).
    ``n_areas == 0`` (and no zones) gives :data:`NO_FINDING`.
    """
    zones = set(zones)
    unknown = zones - set(ZONES)
    if unknown:
        raise ValueError(f"unknown lung zones {sorted(unknown)}; expected names from {ZONES}")
    if n_areas < 0:
        raise ValueError(f"n_areas must be >= 0, got {n_areas}")
    if n_areas == 0 or not zones:
        if n_areas or zones:
            raise ValueError(f"inconsistent finding: {n_areas} areas in zones {sorted(zones)}")
        return NO_FINDING
    parts = []
    for side in SIDES:  # real annotations always name the left lung first
        levels = [lv for lv in LEVELS if f"{lv}_{side}" in zones]
        if levels:
            words = "all" if all_word and len(levels) == len(LEVELS) else " ".join(levels)
            parts.append(f"{words} {side} lung")
    laterality = "Bilateral" if len(parts) == 2 else "Unilateral"
    noun = "area" if n_areas == 1 else "areas"
    return f"{laterality} pulmonary infection, {number_word(n_areas)} infected {noun}, {' and '.join(parts)}."


@dataclass
class ParsedFinding:
    """What a finding sentence says. ``multi_hot`` follows :data:`vocab.ZONES` (seed 004 location labels)."""

    laterality: str | None  # "unilateral", "bilateral", or None when the text names no lesion
    n_areas: int | None  # None when the text gives no count
    zones: set[str]
    multi_hot: list[int] = field(init=False)

    def __post_init__(self):
        self.multi_hot = [int(z in self.zones) for z in ZONES]


def _correct(token: str) -> list[str]:
    """Map one raw token to vocabulary words: exact, synonym, fuzzy match, or two glued words."""
    if token in _VOCAB or token.isdigit():
        return [token]
    if token in _SYNONYMS:
        return [_SYNONYMS[token]]
    if len(token) >= 3:  # short tokens ("in", "of") would fuzzy-match the wrong word
        match = difflib.get_close_matches(token, _VOCAB, n=1, cutoff=0.8)
        if match:
            return match
        for cut in range(2, len(token) - 1):  # "lowerleft" -> "lower", "left"
            head, tail = token[:cut], token[cut:]
            if head in _VOCAB and (tail in _VOCAB or tail in _SYNONYMS):
                return [head, _SYNONYMS.get(tail, tail)]
    return [token]


def _words(text: str) -> list[str]:
    return [w for tok in re.findall(r"[a-z]+|\d+", text.lower()) for w in _correct(tok)]


def parse_finding(text: str) -> ParsedFinding:
    """Read laterality, area count and lung zones from a finding sentence; never raises on odd text."""
    words = _words(str(text))
    zones: set[str] = set()
    pending: set[str] = set()
    n_areas = None
    for i, w in enumerate(words):
        if w in LEVELS:
            pending.add(w)
        elif w == "all":
            pending.update(LEVELS)
        elif w in SIDES:
            zones.update(f"{lv}_{w}" for lv in (pending or LEVELS))
            pending = set()
        elif n_areas is None and (w in _NUMBERS or w.isdigit()) and _AREA_WORDS & set(words[i + 1 : i + 3]):
            n_areas = _NUMBERS[w] if w in _NUMBERS else int(w)
    if "unilateral" in words:
        laterality = "unilateral"
    elif "bilateral" in words:
        laterality = "bilateral"
    else:
        sides = {z.split("_")[1] for z in zones}
        laterality = {0: None, 1: "unilateral", 2: "bilateral"}[len(sides)]
    if n_areas is None and not zones and "no" in words and "infection" in words:
        n_areas = 0  # the NO_FINDING sentence
    return ParsedFinding(laterality=laterality, n_areas=n_areas, zones=zones)


def restrict_finding(text: str, zones: Iterable[str]) -> str:
    """The sentence ``text`` restricted to ``zones``: what a case-level finding says about one axial slice.

    The zones the text names that are in ``zones`` (the zones a slice cuts through) are kept; none kept
    gives :data:`NO_FINDING`. The count is the text's when every zone is kept, else at most one area per
    kept zone (``min(n, kept)``): a slice-level guess, the same in training and at inference. The result
    is written in the canonical grammar, so a typo in the given text never reaches the model.
    """
    parsed = parse_finding(text)
    kept = parsed.zones & set(zones)
    if not kept:
        return NO_FINDING
    n = parsed.n_areas or len(kept)
    return format_finding(n if kept == parsed.zones else min(n, len(kept)), kept)
