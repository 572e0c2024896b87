"""A bundle's predictor and its checkpoint, for every caller that runs a bundle: the batch CLI, the MONAI
Label app, the benchmarks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import input_error_cause


class BundleError(RuntimeError):
    """The bundle's inference config cannot give a predictor (missing file, checkpoint, bad config)."""


def checkpoint_info(path: str | os.PathLike | None) -> dict | None:
    """Path, size and sha256 of a checkpoint file (None when there is none)."""
    if not path or not Path(path).is_file():
        return None if not path else {"path": str(path), "sha256": None, "note": "file not found"}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(Path(path).absolute()), "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def load_bundle_predictor(
    bundle: str | os.PathLike, checkpoint: str | None = None, device: str | None = None, bf16: bool = False
) -> tuple[Any, dict]:
    """Build the ``predictor`` of ``<bundle>/configs/inference.yaml`` with ``monai.bundle.ConfigParser``,
    overriding the ``bundle_root``, ``checkpoint``, ``device`` and ``bf16`` ids the config defines.
    Returns ``(predictor, bundle info for the manifest)``."""
    from monai.bundle import ConfigParser

    bundle = Path(bundle).absolute()
    config = bundle / "configs" / "inference.yaml"
    if not config.is_file():
        raise BundleError(f"{config}: not found (is {bundle} a bundle folder?)")
    parser = ConfigParser()
    parser.read_config(str(config))
    meta_file = bundle / "configs" / "metadata.json"
    if meta_file.is_file():
        parser.read_meta(str(meta_file))
    overrides = {"bundle_root": str(bundle), "checkpoint": checkpoint and str(Path(checkpoint).absolute()),
                 "device": device, "bf16": bf16 or None}
    for key, value in overrides.items():
        if value is not None and key in parser:
            parser[key] = value
    if checkpoint and "checkpoint" not in parser:
        raise BundleError(f"{config} defines no 'checkpoint' id, so --checkpoint cannot be applied")
    if "predictor" not in parser:
        raise BundleError(f"{config} defines no 'predictor' (see segreport/inference/predictor.py)")
    try:
        ckpt = parser.get_parsed_content("checkpoint") if "checkpoint" in parser else None
        if isinstance(ckpt, (str, os.PathLike)) and not Path(ckpt).is_file():
            raise BundleError(f"checkpoint {ckpt} not found: train the bundle first or pass --checkpoint PATH")
        predictor = parser.get_parsed_content("predictor")
    except BundleError:
        raise
    except Exception as exc:
        # MONAI wraps every failure in "Failed to evaluate ConfigExpression ...": report the real cause
        bad_input = input_error_cause(exc)
        if bad_input is not None:  # already "<file>: <problem>"
            raise BundleError(str(bad_input)) from exc
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise BundleError(f"{config}: cannot build the predictor ({type(cause).__name__}: {cause})") from exc
    meta = parser.get("_meta_", {}) or {}
    info = {"path": str(bundle), "name": meta.get("name", bundle.name), "version": meta.get("version"),
            "checkpoint": checkpoint_info(ckpt if isinstance(ckpt, (str, os.PathLike)) else None)}
    return predictor, info
