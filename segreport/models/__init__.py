"""The model seam: a checkpoint's spec -> a ready predictor, whatever the bundle.

``segreport.models.load(path)`` reads a checkpoint (:mod:`.spec`), picks the adapter named by the
spec's ``kind`` (a module of this package with ``predictor(spec, weights, device, **overrides)``) and
returns an object with ``predict(image, affine, ...)`` (:class:`segreport.inference.Predictor`).
A new model adds one adapter module and one entry in :data:`ADAPTERS` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
import os

from ..errors import InputError
from .spec import SpecState, build_network, load_weights, make_spec, network_from_checkpoint, read_checkpoint

# spec["kind"] -> adapter module (imported on demand: loading one model never imports the others)
ADAPTERS = {
    "medsegtext": "segreport.models.medsegtext",
    "lesion_report_3d": "segreport.models.lesion_report_3d",
    "tmc": "segreport.models.tmc",
    "lapft": "segreport.models.lapft",
}

__all__ = ["ADAPTERS", "SpecState", "build_network", "load", "load_weights", "make_spec", "network_from_checkpoint",
           "read_checkpoint"]


def adapter(kind: str, source=None):
    if kind not in ADAPTERS:
        raise InputError(source, f"checkpoint is for model kind {kind!r}, which this segreport does not know ({sorted(ADAPTERS)})")
    return importlib.import_module(ADAPTERS[kind])


def load(path: str | os.PathLike, device: str = "cpu", kind: str | None = None, **overrides):
    """A ready predictor for the checkpoint at ``path``. ``kind``: the model kind the caller expects (a
    bundle's inference config names its own), refused with a clear error otherwise. ``overrides`` are
    run-time settings only (batch size, bf16, thresholds), never the pre-processing the spec fixes."""
    spec, weights = read_checkpoint(path, map_location="cpu")
    if kind is not None and spec["kind"] != kind:
        raise InputError(path, f"checkpoint is a {spec['kind']!r} model, not {kind!r}: use the {spec['kind']} bundle "
                               f"(bundles/{spec['kind']}) or a {kind} checkpoint")
    predictor = adapter(spec["kind"], path).predictor(spec, weights, device=device, **overrides)
    predictor.checkpoint_path = str(path)
    predictor.spec = spec
    return predictor
