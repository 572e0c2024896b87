"""The checkpoint contract: weights plus a **spec** that says everything needed to use them.

A bundle checkpoint is ``{"model": state_dict, "spec": spec}`` (MONAI's ``CheckpointSaver`` writes it
from ``save_dict={"model": network, "spec": SpecState(spec)}``), read with ``weights_only=True``. The
spec is plain data::

    {"format": "segreport-spec", "version": 1,
     "kind": "medsegtext" | "lesion_report_3d" | ...,           # which adapter in segreport.models
     "network": {"_target_": "segreport.networks.MedSegText", "args": {...}},
     "preprocessing": {...},   # orientation, spacing, HU window, 2D image size or 3D ROI
     "tokenizer": {file name: text} | None,                    # the tokenizer itself, not a path
     "inference": {...},       # thresholds, minimum lesion size, decoding length
     "training": {...}}        # provenance: dataset, cases, command (what the report states)

so inference repeats no model or pre-processing setting (:func:`segreport.models.load`).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

SPEC_FORMAT, SPEC_VERSION = "segreport-spec", 1
CONVERT_HINT = ("re-save it with a spec: python -m segreport.models.convert OLD.pt NEW.pt --config "
                "bundles/<name>/configs/train.yaml (the training config it was made with, same overrides)")


class SpecState:
    """A ``CheckpointSaver`` ``save_dict`` entry that writes the spec beside the weights."""

    def __init__(self, spec: Mapping):
        self.spec = dict(spec)

    def state_dict(self) -> dict:
        return dict(self.spec)

    def load_state_dict(self, state: Mapping) -> None:
        self.spec = dict(state)


def make_spec(kind: str, target: str, args: Mapping, preprocessing: Mapping, inference: Mapping | None = None,
              tokenizer: Mapping[str, str] | None = None, training: Mapping | None = None) -> dict:
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "kind": kind,
            "network": {"_target_": target, "args": dict(args)}, "preprocessing": dict(preprocessing),
            "tokenizer": None if tokenizer is None else dict(tokenizer), "inference": dict(inference or {}),
            "training": dict(training or {})}


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """``(spec, weights)`` of a bundle checkpoint; every way it can be wrong is an :class:`InputError`
    naming the file and the problem (not found, not a checkpoint, truncated, pickled code, no spec)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found: train first (python -m monai.bundle run training ...) or pass --checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else cannot be one of ours
        raise InputError(path, "not a readable PyTorch checkpoint (truncated, or another kind of file?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses arbitrary objects: never run them
        raise InputError(path, f"checkpoint holds more than weights and a spec, refused for safety ({str(err).splitlines()[0]})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise InputError(path, f"not a readable PyTorch checkpoint (truncated or another kind of file?): {err}") from err
    if not isinstance(state, Mapping) or not isinstance(state.get("spec"), Mapping) or "model" not in state:
        raise InputError(path, f"checkpoint has no segreport spec (saved by an older version or another tool): {CONVERT_HINT}")
    spec = dict(state["spec"])
    if spec.get("format") != SPEC_FORMAT:
        raise InputError(path, f"checkpoint spec is not a {SPEC_FORMAT} (old layout?): {CONVERT_HINT}")
    if int(spec.get("version", 0)) > SPEC_VERSION:
        raise InputError(path, f"checkpoint spec version {spec['version']} is newer than this segreport ({SPEC_VERSION}): upgrade segreport")
    check_spec(spec, path)
    return spec, dict(state["model"])


def check_spec(spec: Mapping, path=None) -> None:
    """Refuse a spec that is not plain data, names a network outside :data:`NETWORK_FACTORIES`, or holds
    values no model could run with (image size, axis codes, threshold), before anything is built."""
    _check_plain(spec, "spec", path)
    _registered_network(spec, path)
    pre, inference = spec.get("preprocessing") or {}, spec.get("inference") or {}
    size = pre.get("image_size")
    if size is not None and not (isinstance(size, int) and 8 <= size <= 4096):
        raise InputError(path, f"checkpoint spec: image_size {size!r} is not a whole number of pixels in 8..4096")
    axcodes = pre.get("axcodes")
    if axcodes is not None and not (isinstance(axcodes, str) and len(axcodes) == 3
                                    and sorted(_AXIS_PAIR[c] for c in axcodes if c in _AXIS_PAIR) == ["AP", "LR", "SI"]):
        raise InputError(path, f"checkpoint spec: axcodes {axcodes!r} are not three of R/L, A/P, S/I, one of each")
    threshold = inference.get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise InputError(path, f"checkpoint spec: threshold {threshold!r} is not a probability in [0, 1]")


_AXIS_PAIR = {"R": "LR", "L": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


# The only factories a checkpoint's spec may name, by the qualified name specs record (a registry, as timm's
# create_model names): a spec is data, and importing and calling whatever it names would run a file's code.
NETWORK_FACTORIES: dict[str, tuple[str, str]] = {
    "segreport.networks.MedSegText": ("segreport.networks.medsegtext", "MedSegText"),
    "segreport.networks.medsegtext.MedSegText": ("segreport.networks.medsegtext", "MedSegText"),
    "segreport.networks.tmc.TMC": ("segreport.networks.tmc", "TMC"),
    "segreport.networks.tmc.ImageOnlyUNet": ("segreport.networks.tmc", "ImageOnlyUNet"),
    "segreport.networks.lapft.LAPFT": ("segreport.networks.lapft", "LAPFT"),
    "segreport.models.lesion_report_3d.build_network": ("segreport.models.lesion_report_3d", "build_network"),
}
_PLAIN = (str, int, float, bool, type(None))


def _registered_network(spec: Mapping, path) -> Mapping:
    """The spec's ``network`` entry, refused unless its ``_target_`` is in :data:`NETWORK_FACTORIES`."""
    network = spec.get("network")
    if not isinstance(network, Mapping) or not isinstance(network.get("args"), Mapping):
        raise InputError(path, "checkpoint spec has no network {'_target_': ..., 'args': {...}}")
    if network.get("_target_") not in NETWORK_FACTORIES:
        raise InputError(path, f"checkpoint spec names network {network.get('_target_')!r}, which is not a segreport "
                               f"network (refused: a checkpoint is data, never code to run); known: {sorted(NETWORK_FACTORIES)}")
    return network


def _check_plain(value, where: str, path) -> None:
    """Spec values are JSON-like data (dicts with str keys, lists, numbers, strings, None), nothing else."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(path, f"checkpoint spec: {where} has a non-string key {k!r}")
            _check_plain(v, f"{where}.{k}", path)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", path)
    elif not isinstance(value, _PLAIN):
        raise InputError(path, f"checkpoint spec: {where} is a {type(value).__name__}, not plain data")


def build_network(spec: Mapping, path=None) -> nn.Module:
    """The network a spec describes, randomly initialised: its ``_target_``, which must be one of
    :data:`NETWORK_FACTORIES`, called with ``args``, which must be plain data. ``path``: the checkpoint,
    named in every error."""
    import importlib

    network = _registered_network(spec, path)
    target = network["_target_"]
    _check_plain(network["args"], "network.args", path)
    module, name = NETWORK_FACTORIES[target]
    try:
        return getattr(importlib.import_module(module), name)(**network["args"])
    except (TypeError, ValueError, KeyError) as err:
        raise InputError(path, f"checkpoint spec's network {target} cannot be built from its args: {err}") from err


def load_weights(network: nn.Module, weights: Mapping[str, torch.Tensor], path: Any = None) -> nn.Module:
    """Load ``weights`` strictly, listing shape mismatches and missing/unexpected keys on failure."""
    net = getattr(network, "module", network)
    own = net.state_dict()
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in weights and torch.is_tensor(v) and weights[k].shape != v.shape]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if shapes or missing or unexpected:
        lines = [f"weights do not fit {type(net).__name__}"]
        for title, keys in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                lines.append(f"{title} ({len(keys)}): " + "; ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
        raise InputError(path, "; ".join(lines))
    net.load_state_dict(weights)
    return network


def network_from_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(network with its trained weights, spec)``."""
    spec, weights = read_checkpoint(path, map_location)
    return load_weights(build_network(spec, path), weights, path), spec


def slice_spec(kind: str, target: str, config: Mapping, tokenizer, image_size: int, max_length: int,
               window: str = "lung", threshold: float = 0.5, min_lesion_ml: float | None = None,
               training: Mapping | None = None) -> dict:
    """The spec of a 2D slice model (MedSegText, TMC, LAPFT): display orientation, HU window and image
    size; text length, threshold and minimum lesion size; the tokenizer itself (or none)."""
    from ..text.tokenizers import tokenizer_to_files
    from ..transforms.orientation import DISPLAY_AXCODES
    from ..vocab import MIN_LESION_ML

    return make_spec(
        kind, target, config,
        preprocessing={"axcodes": DISPLAY_AXCODES, "window": window, "image_size": int(image_size), "channels": 1},
        inference={"max_length": int(max_length), "threshold": float(threshold),
                   "min_lesion_ml": float(MIN_LESION_ML if min_lesion_ml is None else min_lesion_ml)},
        tokenizer=None if tokenizer is None else tokenizer_to_files(tokenizer), training=training,
    )


def trained_with_tokenizer(spec: Mapping, weights: Mapping) -> tuple[nn.Module, Any]:
    """(network with weights, in eval mode; the spec's tokenizer or None)."""
    from ..text.tokenizers import tokenizer_from_files

    network = load_weights(build_network(spec), weights)
    return network.eval(), tokenizer_from_files(spec["tokenizer"]) if spec.get("tokenizer") else None
