"""Where bundles and their weights are, and a bundle's predictor, for every caller that runs a bundle:
the batch CLI, the MONAI Label app, the benchmarks and the bundle configs themselves.

A bundle is found by name (one of those shipped with segreport: ``bundles/`` of a source checkout, or
``segreport/bundles/`` of an installed wheel) or by path (any folder with ``configs/inference.json``,
e.g. a copy). Its weights are looked up in the bundle's ``models/model.pt``, then in the user folder
``$SEGREPORT_HOME/<bundle>/model.pt`` (default ``~/.segreport``), where training can also write.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from typing import Any

from ..errors import input_error_cause


class BundleError(RuntimeError):
    """The bundle's inference config cannot give a predictor (missing file, checkpoint, bad config)."""


INFERENCE_CONFIG = "inference.json"
_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_bundles_dir() -> Path:
    """The bundles that come with segreport: inside the installed package, else the source checkout's."""
    inside = _PACKAGE / "bundles"
    return inside if inside.is_dir() else _PACKAGE.parent / "bundles"


def shipped_bundles() -> list[Path]:
    return sorted(p.parent.parent for p in shipped_bundles_dir().glob(f"*/configs/{INFERENCE_CONFIG}"))


def find_bundle(name_or_path: str | os.PathLike) -> Path:
    """A bundle folder from a path (a folder with ``configs/inference.json``) or the name of a shipped one."""
    given = Path(name_or_path).expanduser()
    if (given / "configs" / INFERENCE_CONFIG).is_file():
        return given.absolute()
    shipped = shipped_bundles_dir() / str(name_or_path)
    if os.sep not in str(name_or_path) and (shipped / "configs" / INFERENCE_CONFIG).is_file():
        return shipped
    names = ", ".join(b.name for b in shipped_bundles()) or "none found"
    raise BundleError(f"{name_or_path}: neither a bundle folder (no configs/{INFERENCE_CONFIG}) nor the name of a "
                      f"bundle shipped with segreport ({names})")


def segreport_home() -> Path:
    """The user folder for weights and other per-user files: ``$SEGREPORT_HOME``, default ``~/.segreport``."""
    return Path(os.environ.get("SEGREPORT_HOME") or "~/.segreport").expanduser()


def weight_candidates(bundle: str | os.PathLike) -> list[Path]:
    """Where a bundle's trained weights may be, in the order they are looked up."""
    bundle = Path(bundle)
    return [bundle / "models" / "model.pt", segreport_home() / bundle.name / "model.pt"]


def find_weights(bundle: str | os.PathLike) -> str:
    """The first of :func:`weight_candidates` that exists; else the bundle's own ``models/model.pt``, so
    the error that follows names where training writes."""
    candidates = weight_candidates(bundle)
    return str(next((p for p in candidates if p.is_file()), candidates[0]))


def running_bundle_root(name: str) -> str:
    """A bundle config's default ``bundle_root``: the folder of the bundle being run.

    Under MONAI's ``ConfigWorkflow`` (``python -m monai.bundle run ... --config_file <bundle>/configs/X``,
    ``monai.bundle.load``, ``create_workflow``) that is the folder holding the config's ``configs/``, so a
    copied bundle runs where it lies, from any working directory. Anywhere else (a bare ``ConfigParser``,
    as ``verify_net_in_out`` uses) it is the shipped bundle ``name``; ``--bundle_root`` overrides both."""
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow):
            configs = Path(workflow.config_root_path).absolute()
            return str(configs.parent if configs.name == "configs" else configs)
        frame = frame.f_back
    return str(shipped_bundles_dir() / name)


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
    """Build the ``predictor`` of ``<bundle>/configs/inference.json`` with ``monai.bundle.ConfigParser``,
    overriding the ``bundle_root``, ``checkpoint``, ``device`` and ``bf16`` ids the config defines.
    Returns ``(predictor, bundle info for the manifest)``."""
    from monai.bundle import ConfigParser

    bundle = find_bundle(bundle)
    config = bundle / "configs" / INFERENCE_CONFIG
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
