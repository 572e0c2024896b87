"""Whole-volume evaluation shared by every bundle: the trained checkpoint runs through the same batch
path users run (``segreport infer``) on the held-out test volumes, and the folder evaluator
(:mod:`segreport.inference.evaluate_folder`) scores the written masks and reports on the original grid."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..inference.evaluate_folder import evaluate_folder

log = logging.getLogger("segreport.evaluate")


def test_volumes(dataset_dir: str | os.PathLike) -> list[dict]:
    """The test split's volume items of a dataset with ``dataset.json`` + ``splits.json`` (the phantom's
    layout; case-level splits), else [] (a 2D-only dataset has no volumes to score)."""
    from ..data.readers import read_msd

    root = Path(dataset_dir)
    if not (root / "dataset.json").is_file() or not (root / "splits.json").is_file():
        return []
    test = set(json.loads((root / "splits.json").read_text()).get("test", []))
    return [it for it in read_msd(root / "dataset.json") if it["case_id"] in test]


def evaluate_volumes(checkpoint: str | os.PathLike, items: list[dict], output_dir: str | os.PathLike,
                     dataset_json: str | os.PathLike | None = None, device: str = "cpu") -> dict | None:
    """Infer every item's ``image`` with the checkpoint (no clicks) and score it against its ``label``."""
    from ..models import load
    from .batch import run_batch

    cases = {str(it["case_id"]): it for it in items if it.get("image") and it.get("label")}  # one per case
    if not cases:
        log.info("no test volumes with labels: whole-volume evaluation skipped")
        return None
    out = Path(output_dir)
    run_batch(load(checkpoint, device=str(device)), [c["image"] for c in cases.values()], out / "predictions",
              overwrite=True, progress=False)
    return evaluate_folder(out / "predictions", {cid: c["label"] for cid, c in cases.items()}, out, dataset_json)
