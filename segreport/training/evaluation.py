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
                     dataset_json: str | os.PathLike | None = None, device: str = "cpu",
                     texts: str | None = None) -> dict | None:
    """Infer every item's ``image`` with the checkpoint (no clicks) and score it against its ``label``.

    ``texts="reference"``: a text-guided model is given each case's reference sentence, the finding of
    its ground-truth mask (what a radiologist's report would say), as ``segreport infer --texts`` does.
    """
    from ..models import load
    from ..run.batch import run_batch

    cases = {str(it["case_id"]): it for it in items if it.get("image") and it.get("label")}  # one per case
    if not cases:
        log.info("no test volumes with labels: whole-volume evaluation skipped")
        return None
    out = Path(output_dir)
    guide = None
    if texts == "reference":
        from ..run.guide_texts import GuideTexts

        guide = GuideTexts(per_case={cid: reference_sentence(c) for cid, c in cases.items()})
    elif texts is not None:
        raise ValueError(f"texts must be None or 'reference', got {texts!r}")
    run_batch(load(checkpoint, device=str(device)), [c["image"] for c in cases.values()], out / "predictions",
              overwrite=True, progress=False, texts=guide)
    return evaluate_folder(out / "predictions", {cid: c["label"] for cid, c in cases.items()}, out, dataset_json)


def reference_sentence(item: dict) -> str:
    """The LViT sentence of a case's ground-truth mask, zones from its lung label (or the CT's HU lung mask)."""
    import numpy as np

    from ..data.io import load_volume
    from ..transforms.findings import FindingsFromMask
    from ..transforms.lung_mask import lung_label_from_ct

    image, affine, _ = load_volume(item["image"])
    label = load_volume(item["label"])[0] > 0
    lung = load_volume(item["lung"])[0].astype(np.uint8) if item.get("lung") else lung_label_from_ct(image, affine)
    return FindingsFromMask().describe(label, lung=lung if lung.any() else None, affine=affine, image=image).text
