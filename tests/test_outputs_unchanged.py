"""The outputs of a fixed input and checkpoint do not change when the path around the model is made
faster (issue 37): the masks (voxel for voxel, with their affine) and the report JSON (timings and the
input's file fingerprint aside) of every bundle, against ``tests/fixtures/outputs_unchanged.json``, which
the code before the speed work wrote (``SEGREPORT_WRITE_GOLDEN=1 pytest tests/test_outputs_unchanged.py``
rewrites it; do that only for a change that is meant to change outputs, and say so in the commit)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segreport import models
from segreport.models.untrained import write_untrained_checkpoint
from segreport.phantom import generate_case
from segreport.run.batch import run_batch
from segreport.run.guide_texts import GuideTexts

GOLDEN = Path(__file__).parent / "fixtures" / "outputs_unchanged.json"
TEXT = "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
# untrained models answer near one value everywhere: thresholds that leave a few lesions to report
THRESHOLDS = {"medsegtext": 0.487, "tmc": 0.449, "lapft": 0.97, "lesion_report_3d": None}
VOLATILE = {"input_fingerprint", "timing", "latency_s", "created", "segreport_version"}


def _stable(value, folders: dict[str, str]):
    """The report without what changes between identical runs (timings, the input file's mtime, the
    temporary folders' names)."""
    if isinstance(value, dict):
        return {k: _stable(v, folders) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v, folders) for v in value]
    if isinstance(value, str):
        for folder, name in folders.items():
            value = value.replace(folder, name)
    return value


def _digest(path: Path) -> dict:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    return {"sha256": hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest(), "dtype": str(data.dtype),
            "voxels": int(np.count_nonzero(data)), "affine": np.round(image.affine, 5).tolist()}


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    import nibabel as nib

    case = generate_case("golden", "CT-3", seed=3, index=1, shape=(96, 96, 32), spacing=(3.2, 3.2, 8.0))
    folder = tmp_path_factory.mktemp("golden_in")
    nib.save(nib.Nifti1Image(case.ct.astype(np.int16), case.affine), folder / "golden.nii.gz")
    return folder


@pytest.fixture
def one_thread():
    """One torch thread: the float sums of an untrained model's convolutions, whose answers cluster near its
    threshold, do not then depend on how many cores the machine has."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", sorted(THRESHOLDS))
def test_outputs_match_those_before_the_speed_work(kind, ct_folder, tmp_path, one_thread):
    checkpoint = write_untrained_checkpoint(kind, tmp_path / "model.pt", seed=0, threshold=THRESHOLDS[kind])
    predictor = models.load(checkpoint)
    texts = GuideTexts(text=TEXT) if kind in ("tmc", "lapft") else None
    summary = run_batch(predictor, ct_folder, tmp_path / "out", progress=False, texts=texts, workers=0)
    assert summary.counts["ok"] == 1, summary.cases
    out = tmp_path / "out"
    got = {"seg": _digest(out / "golden_seg.nii.gz"), "lesions": _digest(out / "golden_lesions.nii.gz"),
           "report": _stable(json.loads((out / "golden_report.json").read_text()), {str(ct_folder): "IN", str(tmp_path): "TMP"})}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("SEGREPORT_WRITE_GOLDEN") == "1":
        golden[kind] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert kind in golden, f"no golden outputs for {kind}: see the module docstring"
    assert got["seg"] == golden[kind]["seg"] and got["lesions"] == golden[kind]["lesions"]
    assert got["report"] == golden[kind]["report"]
