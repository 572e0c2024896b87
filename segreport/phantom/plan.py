"""The phantom's lesion plan: which focal lesions a split draws, so that every class of the five attribute
groups appears in every split in a stated proportion (:data:`FOCAL_SHARE`), with a floor per class
(:data:`CLASS_FLOOR`). Left to chance, rare classes went missing: one training split had no punctate
lesion, another 3 hyperdense lesions of 63.

A :class:`Recipe` is what the painter aims at; density is targeted through the lesion's base HU and, like
every attribute but shape, measured again on the final image (the dataset records both counts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..vocab import ATTRIBUTE_GROUPS

_CONTACT = ATTRIBUTE_GROUPS["invasion"][1]
FOCAL_SHARE: dict[str, dict[str, float]] = {
    "shape": {"round-like": 0.30, "irregular": 0.30, "wall thickening": 0.15, "punctate/nodular": 0.25},
    "density": {"hypodense": 0.35, "isodense": 0.40, "hyperdense": 0.25},
    "heterogeneity": {"homogeneous": 0.5, "heterogeneous": 0.5},
    "surface": {"well-defined": 0.5, "ill-defined margin": 0.5},
    "invasion": {ATTRIBUTE_GROUPS["invasion"][0]: 0.6, _CONTACT: 0.4},
}
CLASS_FLOOR = 2  # focal lesions of each class in each split (when the split has that many lesions per class)
# the densities a shape can be painted at: a cavity's wall is soft tissue, a calcified lesion is a nodule
DENSITIES_OF: dict[str, tuple[str, ...]] = {
    "round-like": ("hypodense", "isodense", "hyperdense"),
    "irregular": ("hypodense", "isodense"),
    "wall thickening": ("isodense",),
    "punctate/nodular": ("hypodense", "isodense", "hyperdense"),
}


@dataclass(frozen=True)
class Recipe:
    """The classes one focal lesion is painted to show."""

    shape: str
    density: str
    heterogeneous: bool
    ill_defined: bool
    invasive: bool

    def classes(self) -> dict[str, str]:
        """The class of each attribute group this recipe aims at."""
        groups = ATTRIBUTE_GROUPS
        return {"shape": self.shape, "density": self.density, "heterogeneity": groups["heterogeneity"][int(self.heterogeneous)],
                "surface": groups["surface"][int(self.ill_defined)], "invasion": groups["invasion"][int(self.invasive)]}


def quota(shares: Mapping[str, float], n: int, floor: int = CLASS_FLOOR) -> dict[str, int]:
    """``n`` split over the classes in ``shares`` proportion (largest remainder), each class at least
    ``min(floor, n // classes)``."""
    names = list(shares)
    floor = min(floor, n // len(names))
    total = sum(shares.values())
    exact = np.array([shares[k] / total * n for k in names])
    counts = np.maximum(np.floor(exact).astype(int), floor)
    while counts.sum() > n:  # the floors took lesions: give them back from the classes furthest above quota
        counts[int(np.argmax(np.where(counts > floor, counts - exact, -np.inf)))] -= 1
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return dict(zip(names, counts.tolist()))


def _deal(counts: Mapping[str, int], rng: np.random.Generator) -> list[str]:
    return [str(v) for v in rng.permutation(np.repeat(list(counts), list(counts.values())))]


def lesion_plan(n: int, rng: np.random.Generator) -> list[Recipe]:
    """``n`` recipes holding :data:`FOCAL_SHARE`'s proportions and :data:`CLASS_FLOOR`, in random order.

    Densities go to the most constrained shapes first (a wall takes isodense), each to the density furthest
    below its quota among those the shape allows."""
    if n <= 0:
        return []
    shapes = _deal(quota(FOCAL_SHARE["shape"], n), rng)
    wanted = quota(FOCAL_SHARE["density"], n)
    density = [""] * n
    for i in sorted(range(n), key=lambda i: len(DENSITIES_OF[shapes[i]])):
        allowed = DENSITIES_OF[shapes[i]]
        density[i] = max(allowed, key=lambda d: (wanted[d], -allowed.index(d)))
        wanted[density[i]] -= 1
    binary = {
        group: [v == cls for v in _deal(quota(FOCAL_SHARE[group], n), rng)]
        for group, cls in (("heterogeneity", "heterogeneous"), ("surface", "ill-defined margin"), ("invasion", _CONTACT))
    }
    return [Recipe(shapes[i], density[i], binary["heterogeneity"][i], binary["surface"][i], binary["invasion"][i])
            for i in range(n)]


def class_counts(lesions: list[Mapping]) -> dict[str, dict[str, int]]:
    """Lesions per class of each attribute group (every class listed, zeros too) and per lesion type."""
    counts = {group: {c: sum(les[group] == c for les in lesions) for c in classes} for group, classes in ATTRIBUTE_GROUPS.items()}
    types = sorted({les["lesion_type"] for les in lesions})
    counts["lesion_type"] = {t: sum(les["lesion_type"] == t for les in lesions) for t in types}
    return counts
