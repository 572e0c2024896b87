"""The TMC bundle end to end: MONAI bundle training, evaluation, `segreport infer` with each text source."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import train_and_evaluate_bundle

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "tmc"
CONFIGS = BUNDLE / "configs"
TEXT = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."


def test_metadata_validates_and_files_present(shared_data):
    import jsonschema

    schema = json.loads((shared_data / "monai_bundle_schema" / "meta_schema_20240725.json").read_text())
    jsonschema.validate(json.loads((CONFIGS / "metadata.json").read_text()), schema)
    for name in ("train.yaml", "evaluate.yaml", "inference.json", "batch_inference.yaml", "multi_gpu_train.yaml",
                 "logging.conf", "train_paper.yaml", "train_unet_baseline.yaml", "train_single_stage.yaml",
                 "ablation_mcm_only.yaml", "ablation_align_only.yaml"):
        assert (CONFIGS / name).is_file(), name
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """One epoch of training, then evaluation, through the bundle's own configs."""
    return train_and_evaluate_bundle(BUNDLE, tmp_path_factory.mktemp("tmc"), phantom_dir, image_size=64)


def test_checkpoint_carries_the_tmc_spec_and_evaluation_scores_cases(trained):
    import torch

    spec = torch.load(trained / "models" / "model.pt", weights_only=True)["spec"]
    assert spec["kind"] == "tmc" and spec["network"]["_target_"] == "segreport.networks.tmc.TMC"
    assert spec["preprocessing"]["image_size"] == 64 and spec["inference"]["max_length"] == 32
    assert spec["network"]["args"]["mcm_stages"] == [2, 3, 4] or tuple(spec["network"]["args"]["mcm_stages"]) == (2, 3, 4)
    assert "tokenizer.json" in spec["tokenizer"]
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())["test"]
    assert metrics["n_cases"] >= 1 and 0.0 <= metrics["dice_case_mean"] <= 1.0
    rows = list(csv.DictReader(open(trained / "eval" / "per_case.csv")))
    assert len(rows) == metrics["n_cases"]
    volumes = json.loads((trained / "eval" / "volumes" / "metrics.json").read_text())
    assert volumes  # the test volumes through the batch path, guided by their reference sentences


def _infer(args) -> int:
    from segreport.run.infer_cli import main

    return main(["--no-progress", *map(str, args)])


def test_infer_with_one_text_records_it_and_checks_the_mask_against_it(trained, phantom_dir, tmp_path, capsys):
    image = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    rc = _infer(["--bundle", BUNDLE, "--checkpoint", trained / "models" / "model.pt", "-i", image, "-o", tmp_path / "o",
                 "--text", TEXT])
    assert rc == 0, capsys.readouterr().err
    case = image.name.removesuffix(".nii.gz")
    report = json.loads((tmp_path / "o" / f"{case}_report.json").read_text())
    assert report["extras"]["guide_texts"] == [TEXT] and report["extras"]["guide_text_source"] == "--text"
    levels = report["extras"]["level_sentences"]
    n_slices = nib.load(image).shape[2]
    assert sorted(k for ks in levels.values() for k in ks) == list(range(n_slices))  # every slice got one sentence
    assert "No pulmonary infection." in levels  # slices above/below the lungs
    assert any(s.startswith("Bilateral") and "lower left lung" in s for s in levels)
    assert report["consistency"]["items"][0]["source"] == "guide text 0"
    assert f"GUIDED BY: {TEXT} (from --text)" in (tmp_path / "o" / f"{case}_report.txt").read_text()
    seg = nib.load(tmp_path / "o" / f"{case}_seg.nii.gz")
    assert seg.shape == nib.load(image).shape and np.allclose(seg.affine, nib.load(image).affine)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert "--text" in manifest["arguments"]["texts"]


def test_text_sources_and_their_errors(trained, phantom_dir, tmp_path, capsys):
    ckpt = trained / "models" / "model.pt"
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[:2]
    for p in images:
        shutil.copy(p, inputs)
    ids = [p.name.removesuffix(".nii.gz") for p in images]

    assert _infer(["--bundle", BUNDLE, "--checkpoint", ckpt, "-i", inputs, "-o", tmp_path / "none"]) == 2
    assert "guided by a finding sentence" in capsys.readouterr().err

    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"case_id,text\n{ids[0]},{TEXT}\nno_such_case,{TEXT}\n")
    assert _infer(["--bundle", BUNDLE, "--checkpoint", ckpt, "-i", inputs, "-o", tmp_path / "u", "--texts", unknown]) == 2
    assert "unknown case(s) ['no_such_case']" in capsys.readouterr().err

    bom = tmp_path / "bom.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_text(f'case_id,text\n{ids[0]},"{TEXT}"\n{ids[1]},"{TEXT}"\n', encoding="utf-8-sig")
    assert _infer(["--bundle", BUNDLE, "--checkpoint", ckpt, "-i", inputs, "-o", tmp_path / "b", "--texts", bom]) == 0

    partial = tmp_path / "partial.csv"
    partial.write_text(f'case_id,text\n{ids[0]},"{TEXT}"\n')
    assert _infer(["--bundle", BUNDLE, "--checkpoint", ckpt, "-i", inputs, "-o", tmp_path / "p", "--texts", partial]) == 1
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "p" / "summary.csv"))}
    assert rows[ids[0]]["status"] == "ok"
    assert rows[ids[1]]["status"] == "failed" and f"no guide text for case {ids[1]}" in rows[ids[1]]["error"]

    assert _infer(["--bundle", BUNDLE, "--checkpoint", ckpt, "-i", inputs, "-o", tmp_path / "g",
                   "--text", "Consolidation with air bronchograms."]) == 1
    rows = list(csv.DictReader(open(tmp_path / "g" / "summary.csv")))
    assert all(r["status"] == "failed" and "no lung zone can be read" in r["error"] for r in rows)


def test_text_from_medsegtext_chains_two_bundles(trained, phantom_dir, tmp_path, capsys):
    from monai.bundle import run

    mst = REPO / "bundles" / "medsegtext"
    out = tmp_path / "mst"
    run("training", config_file=[str(mst / "configs" / "train.yaml")], bundle_root=str(mst), output_dir=str(out),
        ckpt_dir=str(out / "models"), dataset_dir=str(phantom_dir), image_size=32, epochs=1, val_interval=1)
    image = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    rc = _infer(["--bundle", BUNDLE, "--checkpoint", trained / "models" / "model.pt", "-i", image, "-o", tmp_path / "o",
                 "--text-from", out / "models" / "model.pt"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / f"{image.name.removesuffix('.nii.gz')}_report.json").read_text())
    assert report["extras"]["guide_text_source"].startswith("findings of medsegtext")
    assert report["extras"]["guide_texts"][0].endswith(".")


def test_level_sentences_follow_the_affine_not_the_voxel_order(shared_data):
    """A real chest CT and the same CT stored with its axial axis reversed give each physical slice the same
    sentence: levels come from the lung's world extent."""
    from segreport.data.io import load_volume
    from segreport.inference.text_guided import level_sentences

    image, affine, _ = load_volume(shared_data / "totalsegmentator" / "pulmonary_report" / "ct_cropped.nii.gz")
    sentences = level_sentences(TEXT, image, affine)
    n = image.shape[2]
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, n - 1
    flipped = level_sentences(TEXT, image[:, :, ::-1].copy(), affine @ flip)
    assert flipped[::-1] == sentences
    assert len(set(sentences)) >= 2  # the crop spans more than one level


def test_mosmeddata_layout_is_split_by_case_and_given_level_sentences(phantom_dir, tmp_path):
    """MosMedData COVID19_1110's layout (studies/CT-k, masks/): the studies with masks, case-level split."""
    from segreport.training.slices2d import load_datalists

    root = tmp_path / "mosmed"
    for i, image in enumerate(sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))):
        study = f"study_{i:04d}"
        (root / "studies" / f"CT-{1 + i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        shutil.copy(image, root / "studies" / f"CT-{1 + i % 2}" / f"{study}.nii.gz")
        shutil.copy(phantom_dir / "labelsTr" / image.name, root / "masks" / f"{study}_mask.nii.gz")
    lists = load_datalists(root, data_format="auto", text="level", keep_zones=True)
    cases = {k: {it["case_id"] for it in v} for k, v in lists.items()}
    assert cases["training"] and not (cases["training"] & cases["test"]) and not (cases["training"] & cases["validation"])
    item = lists["training"][0]
    assert item["lesion_zones"].shape == item["label"].shape and item["text"].endswith(".")


def test_lvit_layout_trains_with_its_own_slice_sentences(phantom_dir, tmp_path):
    """MosMedData+/QaTa in the LViT layout (here the phantom's PNG export): no zone maps, so the mirror
    swaps the sentence alone and there are no zone subsets."""
    import torch
    from monai.bundle import run

    run("training", config_file=[str(CONFIGS / "train.yaml")], bundle_root=str(BUNDLE), output_dir=str(tmp_path),
        ckpt_dir=str(tmp_path / "models"), dataset_dir=str(phantom_dir), data_format="lvit", image_size=64, epochs=1)
    spec = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["spec"]
    assert spec["kind"] == "tmc" and spec["training"]


def test_resume_redoes_a_case_whose_guide_text_changed(trained, phantom_dir, tmp_path):
    image = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    args = ["--bundle", BUNDLE, "--checkpoint", trained / "models" / "model.pt", "-i", image, "-o", tmp_path / "o"]
    assert _infer(args + ["--text", TEXT]) == 0
    assert _infer(args + ["--text", TEXT, "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "summary.csv")))
    assert rows[0]["status"] == "skipped"  # same text: kept
    other = "Unilateral pulmonary infection, one infected area, lower left lung."
    assert _infer(args + ["--text", other, "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "summary.csv")))
    report = json.loads((tmp_path / "o" / f"{image.name.removesuffix('.nii.gz')}_report.json").read_text())
    assert rows[0]["status"] == "ok" and report["extras"]["guide_texts"] == [other]  # redone with the new text


def test_report_says_when_the_mask_does_not_follow_its_guide_text(phantom_dir):
    """A mask with lesions in both lungs, guided by a sentence naming one zone: the TXT report says so."""
    from segreport.data.io import load_volume
    from segreport.inference.predictor import Prediction
    from segreport.run.report import build_report, format_report_text

    image_path = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    image, affine, _ = load_volume(image_path)
    lesions = load_volume(phantom_dir / "labelsTr" / image_path.name)[0] > 0
    guide = "Unilateral pulmonary infection, one infected area, upper left lung."
    prediction = Prediction(mask=lesions.astype(np.uint8), extras={"guide_texts": [guide], "guide_text_source": "--text"})
    report = build_report(prediction, image, affine, case_id="c")
    assert report["consistency"]["items"][0]["agree"] is False
    text = format_report_text(report)
    assert "guide text 0: the mask does not follow the sentence that guided it" in text
    assert f"GUIDED BY: {guide} (from --text)" in text
