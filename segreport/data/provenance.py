"""What a model was trained on, stored in its checkpoint spec and stated in every report.

A reader of a report must be able to tell that the model behind it has only ever seen the synthetic
phantom: the spec's ``training`` block records the dataset (name, folder, number of cases per split,
whether it is synthetic, the phantom's seed and version) and the training command, and the batch report
warns when a phantom-only model is applied to a scan that is not from the phantom (phantom volumes carry
a mark in their NIfTI header description).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..vocab import PHANTOM_MARK


def dataset_provenance(dataset_dir: str | os.PathLike, datalists: dict | None = None) -> dict:
    """The ``training`` block of a spec for a model trained on ``dataset_dir`` with ``datalists``."""
    root = Path(dataset_dir)
    info: dict = {}
    for candidate in (root / "dataset.json", root.parent / "dataset.json"):  # the phantom's LViT export sits in slices2d/
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text())
            except ValueError:
                info = {}
            break
    synthetic = info.get("name") == "segreport-phantom"
    case_ids = {k: sorted({str(it.get("case_id")) for it in v}) for k, v in (datalists or {}).items() if isinstance(v, list)}
    splits = {k: len(ids) for k, ids in case_ids.items()}
    return {
        "dataset": info.get("name") or root.name,
        "dataset_dir": str(root.absolute()),
        "synthetic": synthetic,
        "phantom": {"seed": info.get("seed"), "version": info.get("version")} if synthetic else None,
        "n_cases": splits,
        # which cases trained it, so another folder's evaluation can tell what it has not seen
        "case_ids": case_ids if sum(splits.values()) <= 1000 else None,
        "command": _command(),
    }


def _command() -> str | None:
    """This process's command line as a user would type it (``python -m monai.bundle run training ...``)."""
    if not sys.argv or not sys.argv[0]:
        return None
    script = Path(sys.argv[0])
    if script.name == "__main__.py":  # python -m pkg[.sub]
        nested = (script.parent.parent / "__init__.py").is_file()
        head = f"python -m {script.parent.parent.name + '.' if nested else ''}{script.parent.name}"
    else:
        head = script.name
    return " ".join([head, *sys.argv[1:]])


def is_phantom_scan(meta: dict) -> bool:
    """Whether a loaded volume was written by the phantom (its header description says so)."""
    return str(meta.get("description") or "").startswith(PHANTOM_MARK)


def describe(training: dict | None) -> str:
    """One line for reports and previews: what the model was trained on."""
    if not training:
        return "model training data: not recorded in the checkpoint"
    n = training.get("n_cases") or {}
    cases = f", {n.get('training')} training cases" if n.get("training") is not None else ""
    if training.get("synthetic"):
        ph = training.get("phantom") or {}
        return f"model trained on the synthetic phantom only (seed {ph.get('seed')}, version {ph.get('version')}{cases})"
    return f"model trained on {training.get('dataset')}{cases}"


def warnings_for(training: dict | None, meta: dict) -> list[str]:
    """The report's visible warnings about the model's training data for this scan."""
    if training and training.get("synthetic") and not is_phantom_scan(meta):
        return ["This model was trained only on synthetic phantom data and has never seen a real scan; this scan is "
                "not from the phantom, so its findings are untested."]
    return []
