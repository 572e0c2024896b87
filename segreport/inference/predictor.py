"""The contract between a trained bundle and every way of running it (batch folders, MONAI Label, demo).

A bundle's ``inference.json`` defines a ``predictor`` component: an object with ``predict``. The batch
runner loads it once and feeds it one volume at a time in the input's own grid, so every model returns
its mask on exactly that grid and the runner never needs to know which model it is driving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ..vocab import MIN_LESION_ML


@dataclass
class LesionAttributes:
    """Attributes predicted for one lesion, anchored by a voxel inside it (input-grid IJK)."""

    voxel: tuple[int, int, int]
    # group -> {"label": class name, "prob": probability of that class, "probs": {class: prob}}
    attributes: dict[str, dict]


@dataclass
class Prediction:
    """What a model says about one volume, on the input grid."""

    mask: np.ndarray  # uint8 0/1 with exactly the input's shape
    case_finding: str | None = None  # one case-level sentence (how it is formed is the model's to document)
    slice_findings: dict[int, str] = field(default_factory=dict)  # axial slice index -> sentence
    lesion_attributes: list[LesionAttributes] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # model-specific, JSON-serialisable


class Predictor(Protocol):
    name: str

    def predict(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        lung: np.ndarray | None = None,
    ) -> Prediction:
        """``image``: 3D CT in HU, input voxel order; ``affine``: voxel->RAS mm; ``points``: IJK clicks;
        ``lung``: the image's lung label (1 right, 2 left) when the caller already made it (the batch
        loader does), so a predictor that needs one does not threshold the CT again."""
        ...


def min_lesion_ml_of(predictor, override: float | None = None) -> float:
    """The run's minimum lesion size: ``override`` when given, else the checkpoint spec's
    (``inference.min_lesion_ml``), else :data:`~segreport.vocab.MIN_LESION_ML`."""
    if override is not None:
        return float(override)
    spec = getattr(predictor, "spec", None) or {}
    return float((spec.get("inference") or {}).get("min_lesion_ml", MIN_LESION_ML))
