"""The MedSegText bundle end to end through MONAI's bundle runner, on a tiny generated phantom."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "medsegtext"
CONFIGS = BUNDLE / "configs"


def test_metadata_validates_against_monai_schema(shared_data):
    import jsonschema

    schema = json.loads((shared_data / "monai_bundle_schema" / "meta_schema_20240725.json").read_text())
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(meta, schema)
    # the I/O of network_def (mask logits only: MONAI's tools call it); the finding is described in words
    assert set(meta["network_data_format"]["inputs"]) == {"image"} and set(meta["network_data_format"]["outputs"]) == {"pred"}


def test_bundle_files_present():
    for name in ("train.yaml", "evaluate.yaml", "inference.json", "multi_gpu_train.yaml", "logging.conf",
                 "train_seg_only.yaml", "train_text_only.yaml", "train_paper.yaml"):
        assert (CONFIGS / name).is_file(), name
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """Train one epoch through `monai.bundle run training` exactly as the README says."""
    from monai.bundle import run

    out = tmp_path_factory.mktemp("medsegtext")
    common = dict(bundle_root=str(BUNDLE), output_dir=str(out), ckpt_dir=str(out / "models"), dataset_dir=str(phantom_dir),
                  image_size=32)
    run("training", config_file=[str(CONFIGS / "train.yaml")], epochs=1, val_interval=1, **common)
    return out, common


def test_training_writes_checkpoints_with_spec_and_logs(trained):
    import torch

    out, _ = trained
    assert (out / "models" / "model_final.pt").is_file()
    state = torch.load(out / "models" / "model.pt", weights_only=True)  # best by the Dice/BLEU-4 key metric
    spec = state["spec"]
    assert spec["kind"] == "medsegtext" and spec["preprocessing"]["image_size"] == 32
    assert spec["preprocessing"]["axcodes"] == "PLS" and "tokenizer.json" in spec["tokenizer"]
    assert not (out / "tokenizer").exists()  # the tokenizer travels in the checkpoint, not beside it
    assert any((out / "logs").iterdir())  # TensorBoard events


def test_evaluation_writes_metrics_csv_and_panels(trained):
    from monai.bundle import run

    out, common = trained
    run("evaluating", config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")], **common)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["test"]
    for key in ("dice_slice_mean", "dice_case_mean", "miou_slice_mean", "bleu1", "bleu4", "meteor", "rouge_l"):
        assert 0.0 <= metrics[key] <= 1.0, key
    rows = list(csv.DictReader(open(out / "eval" / "per_sample.csv")))
    assert len(rows) == metrics["n_slices"] and {"reference", "generated", "dice", "meteor"} <= set(rows[0])
    cases = list(csv.DictReader(open(out / "eval" / "per_case.csv")))
    assert len(cases) < len(rows)  # slices pooled per case, not one "case" per slice
    assert list((out / "eval" / "panels").glob("*.png"))


def test_volume_inference_returns_mask_on_input_grid(trained, phantom_dir):
    from monai.bundle import run

    out, _ = trained
    volume = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    run("inferring", config_file=[str(CONFIGS / "inference.json")], bundle_root=str(BUNDLE), output_dir=str(out),
        checkpoint=str(out / "models" / "model.pt"), input_image=str(volume))
    case = volume.name.replace(".nii.gz", "")
    seg = nib.load(out / "inference" / f"{case}_seg.nii.gz")
    ref = nib.load(volume)
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
    report = json.loads((out / "inference" / f"{case}_report.json").read_text())
    assert "pulmonary infection" in json.dumps(report).lower()


def test_volume_datalists_split_by_case_and_describe_each_slice(phantom_dir):
    from segreport.training.medsegtext import load_datalists
    from segreport.text.findings import parse_finding
    from segreport.transforms.findings import FindingsFromMask

    lists = load_datalists(phantom_dir, data_format="volumes", ratios=(0.5, 0.17, 0.33), seed=0)
    case_sets = {k: {it["case_id"] for it in v} for k, v in lists.items()}
    assert not (case_sets["training"] & case_sets["test"]) and not (case_sets["training"] & case_sets["validation"])
    items = lists["training"]
    assert items and all(it["image"].shape[0] == 1 and 0.0 <= it["image"].min() <= it["image"].max() <= 1.0 for it in items)
    min_size = FindingsFromMask().min_size  # specks below it are not named, by design
    for it in items:  # the sentence of a slice agrees with its own mask
        parsed = parse_finding(it["text"])
        comps, n = ndimage.label(it["label"][0] > 0, np.ones((3, 3)))
        if n and np.bincount(comps.ravel())[1:].max() >= min_size:
            assert parsed.n_areas and sum(parsed.multi_hot) > 0, it["text"]
        elif not it["label"].any():
            assert not parsed.n_areas and not parsed.zones, it["text"]


def test_infer_with_only_a_checkpoint_uses_its_image_size(trained, phantom_dir, tmp_path):
    """`segreport infer --bundle ... --checkpoint X` needs nothing else, and a model trained at 32² is
    inferred at 32², not at the 64² the bundle's train.yaml defaults to."""
    from segreport.cli import main
    from segreport.models import load

    out, _ = trained
    ckpt = tmp_path / "elsewhere" / "weights.pt"  # no tokenizer or outputs folder beside it
    ckpt.parent.mkdir()
    ckpt.write_bytes((out / "models" / "model.pt").read_bytes())
    assert load(ckpt).image_size == 32
    volume = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    code = main(["infer", "--bundle", str(BUNDLE), "--checkpoint", str(ckpt), "-i", str(volume), "-o", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["model"]["checkpoint"]["path"] == str(ckpt.absolute())


def test_checkpoint_from_other_configuration_is_refused(trained):
    from segreport.errors import InputError
    from segreport.models import load_weights
    from segreport.models.spec import read_checkpoint
    from segreport.networks import MedSegText

    out, _ = trained
    _, weights = read_checkpoint(out / "models" / "model_final.pt")
    other = MedSegText.from_config("tiny", vocab_size=7, pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(InputError, match="shape mismatches .*text_decoder.embed.weight"):
        load_weights(other, weights)


def test_remove_small_lesions_uses_millilitres_not_voxels():
    from segreport.transforms.postprocess import remove_small_lesions

    mask = np.zeros((20, 20, 10), bool)
    mask[2:6, 2:6, 2:6] = True  # 64 voxels
    mask[12:14, 12:14, 2:4] = True  # 8 voxels
    coarse = np.diag([2.0, 2.0, 5.0, 1.0])  # 20 mm^3 per voxel: 1.28 mL and 0.16 mL
    out = remove_small_lesions(mask, coarse, min_ml=0.5)
    assert out[3, 3, 3] == 1 and out[12, 12, 2] == 0
    fine = np.diag([0.5, 0.5, 0.5, 1.0])  # the same voxels are now tiny: both go
    assert not remove_small_lesions(mask, fine, min_ml=0.5).any()
    assert remove_small_lesions(mask, coarse, min_ml=0).sum() == mask.sum()


def test_reports_state_the_training_data_and_warn_on_real_scans(trained, phantom_dir, shared_data, tmp_path):
    """The spec records the training data; a phantom-only model on a real CT carries a visible warning."""
    import shutil

    from segreport.run.batch import run_batch
    from segreport.models import load

    out, _ = trained
    predictor = load(out / "models" / "model.pt")
    training = predictor.spec["training"]
    assert training["synthetic"] and training["dataset"] == "segreport-phantom" and training["n_cases"]["training"] >= 1
    assert training["phantom"]["seed"] == 0 and training["command"]  # the process's own command line (pytest here)
    (tmp_path / "in").mkdir()
    shutil.copy(phantom_dir / "imagesTr" / "case_0001.nii.gz", tmp_path / "in")
    # a real CT crop through the heart and both lungs (TotalSegmentator's pulmonary report fixture)
    shutil.copy(shared_data / "totalsegmentator" / "pulmonary_report" / "ct_cropped.nii.gz", tmp_path / "in")
    shutil.copy(shared_data / "totalsegmentator" / "example_ct_sm.nii.gz", tmp_path / "in")  # abdomen: lung bases only
    summary = run_batch(predictor, tmp_path / "in", tmp_path / "out", progress=False)
    rows = {r["case_id"]: r for r in summary.cases}
    assert rows["example_ct_sm"]["status"] == "failed" and "no lungs found" in rows["example_ct_sm"]["error"]
    assert "not a chest CT? Pass --allow-no-lungs" in rows["example_ct_sm"]["error"]
    phantom_report = json.loads((tmp_path / "out" / "case_0001_report.json").read_text())
    real_report = json.loads((tmp_path / "out" / "ct_cropped_report.json").read_text())
    assert phantom_report["warnings"] == [] and phantom_report["model_training"] == training
    assert "trained only on synthetic phantom data" in real_report["warnings"][0]
    text = (tmp_path / "out" / "ct_cropped_report.txt").read_text()
    assert "WARNING: This model was trained only on synthetic" in text and "synthetic phantom only (seed 0" in text
    forced = run_batch(predictor, tmp_path / "in" / "example_ct_sm.nii.gz", tmp_path / "forced", progress=False,
                       allow_no_lungs=True)
    assert forced.cases[0]["status"] == "ok"
