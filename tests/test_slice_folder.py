"""The real COVID-19 CT slice layout (ct/, infection/, lungs/, cases.csv): reader, sentences, splits, and the
2D bundles trained and scored on a handful of its slices."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from segreport.errors import InputError

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "covid19_ct_seg_slices"
pytestmark = pytest.mark.skipif(not (REAL / "cases.csv").is_file(), reason="shared/data/covid19_ct_seg_slices not found")

# slices whose sentences were checked by eye against the picture (docs/real_slice_sentences.png):
# the lesion's side (patient right = image left), its count and the level of the slice in its case
CHECKED = {
    "0007.png": "Unilateral pulmonary infection, one infected area, lower left lung.",  # liver dome level, left base
    "0151.png": "Unilateral pulmonary infection, one infected area, upper right lung.",  # near the apex
    "0439.png": "Unilateral pulmonary infection, one infected area, middle left lung.",
    "0535.png": "Unilateral pulmonary infection, one infected area, lower right lung.",
    "0247.png": "Bilateral pulmonary infection, three infected areas, upper left lung and upper right lung.",
}


def _rows() -> list[dict]:
    with open(REAL / "cases.csv", newline="") as f:
        return list(csv.DictReader(f))


def make_folder(dest: Path, files: list[str]) -> Path:
    """A folder in the layout holding ``files`` of the real data (their cases.csv rows unchanged)."""
    rows = [r for r in _rows() if r["file"] in files]
    for sub in ("ct", "infection", "lungs"):
        (dest / sub).mkdir(parents=True)
        for r in rows:
            shutil.copy(REAL / sub / r["file"], dest / sub / r["file"])
    with open(dest / "cases.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def handful(per_case: int = 3, cases=("cc01", "cc02", "cc04", "cc05")) -> list[str]:
    """``per_case`` slices spread over each case's levels."""
    out = []
    for case in cases:
        files = [r["file"] for r in _rows() if r["case_id"] == case]
        out += [files[i] for i in np.linspace(0, len(files) - 1, per_case).round().astype(int)]
    return out


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("slices") / "data", handful() + list(CHECKED))


def test_reader_takes_the_folder_as_it_is(small_folder):
    from segreport.data.slice_folder import read_slice_folder

    before = {p: p.stat().st_mtime_ns for p in small_folder.rglob("*")}
    items = read_slice_folder(small_folder)
    assert {p: p.stat().st_mtime_ns for p in small_folder.rglob("*")} == before  # nothing written
    assert len(items) == len(set(handful()) | set(CHECKED))
    item = next(it for it in items if it["file"] == "0007.png")
    assert item["case_id"] == "cc01" and item["slice_index"] == 7 and item["slices_in_case"] == 159
    assert item["image"].shape == item["label"].shape == item["lung"].shape == (1, 256, 256)
    assert item["image"].dtype == np.uint8 and set(np.unique(item["label"])) <= {0, 255}


def test_reader_errors_name_the_file(tmp_path):
    from segreport.data.slice_folder import read_slice_folder

    folder = make_folder(tmp_path / "a", ["0000.png", "0001.png"])
    (folder / "lungs" / "0001.png").unlink()
    with pytest.raises(InputError, match=r"lungs/0001.png.*lung mask .*not found"):
        read_slice_folder(folder)

    folder = make_folder(tmp_path / "b", ["0000.png", "0001.png"])
    from PIL import Image

    Image.fromarray(np.zeros((128, 256), np.uint8)).save(folder / "infection" / "0001.png")
    with pytest.raises(InputError, match=r"infection/0001.png.*size 256x128 differs from its CT slice 256x256"):
        read_slice_folder(folder)

    folder = make_folder(tmp_path / "c", ["0000.png"])
    shutil.copy(REAL / "ct" / "0005.png", folder / "ct" / "0005.png")
    with pytest.raises(InputError, match=r"ct/0005.png.*not in .*cases.csv: unknown case"):
        read_slice_folder(folder)
    with pytest.raises(InputError, match=r"unknown case\(s\) \['cc99'\]"):
        read_slice_folder(make_folder(tmp_path / "d", ["0000.png"]), cases={"cc99"})

    folder = make_folder(tmp_path / "e", ["0000.png"])
    (folder / "cases.csv").write_text("file,case_id,index_in_case,slices_in_case\n0000.png,cc01,159,159\n")
    with pytest.raises(InputError, match="index_in_case 159 outside 0..158"):
        read_slice_folder(folder)


def test_sentences_of_slices_checked_by_eye(small_folder):
    from segreport.data.slice_folder import read_slice_folder
    from segreport.training.slice_sentences import describe_slices

    items = {it["file"]: it for it in describe_slices(read_slice_folder(small_folder))}
    for name, sentence in CHECKED.items():
        assert items[name]["text"] == sentence, name
    # the other display convention swaps every side, nothing else
    mirrored = {it["file"]: it for it in describe_slices(read_slice_folder(small_folder), orientation="neurological")}
    assert mirrored["0007.png"]["text"] == "Unilateral pulmonary infection, one infected area, lower right lung."
    assert mirrored["0247.png"]["text"] == items["0247.png"]["text"]  # bilateral stays bilateral


def test_slice_level_comes_from_its_place_in_the_case():
    from segreport.transforms.lung_regions import slice_zone_map
    from segreport.transforms.orientation import display_affine
    from segreport.vocab import ZONES

    lung = np.zeros((40, 40), bool)
    lung[10:30, 4:16] = lung[10:30, 24:36] = True  # image left = patient right (radiological)
    for level, name in ((0.1, "lower"), (0.5, "middle"), (0.9, "upper")):
        zones = slice_zone_map(lung, level, display_affine())
        assert ZONES[zones[20, 8] - 1] == f"{name}_right" and ZONES[zones[20, 30] - 1] == f"{name}_left"
    assert slice_zone_map(lung, 0.5, display_affine("neurological"))[20, 8] == ZONES.index("middle_left") + 1


def test_splits_are_case_level_and_stratified_by_burden():
    from segreport.training.slice_sentences import slice_folder_datalists

    splits = slice_folder_datalists(REAL, ratios=(0.6, 0.15, 0.25), seed=0)
    cases = {k: {it["case_id"] for it in v} for k, v in splits.items()}
    assert sum(len(c) for c in cases.values()) == len(set().union(*cases.values())) == 8  # no case in two splits
    assert [len(cases[k]) for k in ("training", "validation", "test")] == [5, 1, 2]
    strata = {it["case_id"]: it["burden_stratum"] for v in splits.values() for it in v}
    assert len({strata[c] for c in cases["test"]}) == 2  # the two test cases come from two burden strata
    assert sum(len(v) for v in splits.values()) == 970
    again = slice_folder_datalists(REAL, ratios=(0.6, 0.15, 0.25), seed=0)
    assert {k: {it["case_id"] for it in v} for k, v in again.items()} == cases


def _bundle_run(bundle: str, folder: Path, out: Path, overlays=(), epochs: int = 1, **extra):
    from monai.bundle import run

    configs = REPO / "bundles" / bundle / "configs"
    files = [str(configs / "train.yaml")] + [str(configs / o) for o in overlays]
    common = dict(bundle_root=str(configs.parent), output_dir=str(out), ckpt_dir=str(out / "models"), dataset_dir=str(folder),
                  image_size=32, num_threads=1, split_ratios=[0.5, 0.25, 0.25], **extra)
    run("training", config_file=files, epochs=epochs, val_interval=1, batch_size=4, **common)
    return files + [str(configs / "evaluate.yaml")], common


@pytest.mark.parametrize("bundle", ["medsegtext", "tmc"])
def test_bundle_trains_on_slices_and_scores_another_folder(bundle, small_folder, tmp_path):
    from monai.bundle import run

    files, common = _bundle_run(bundle, small_folder, tmp_path / "run")
    other = make_folder(tmp_path / "other", [f for f in handful(2, ("cc07", "cc08"))])
    before = sorted(os.listdir(other))
    run("evaluating", config_file=files, **{**common, "dataset_dir": str(other), "output_dir": str(tmp_path / "scored")},
        eval_split="all")
    assert sorted(os.listdir(other)) == before
    result = json.loads((tmp_path / "scored" / "eval" / "metrics.json").read_text())
    test = result["test"]
    assert test["n_slices"] == 4 and test["n_cases"] == 2
    for key in ("dice_slice_mean", "dice_case_mean", "miou_slice_mean"):
        assert 0.0 <= test[key] <= 1.0, key
    if bundle == "medsegtext":
        for key in ("bleu4", "rouge_l", "meteor", "consistency_rate"):
            assert 0.0 <= test[key] <= 1.0, key
    else:
        assert result["text_control"]["n_slices"] >= 1  # cc07/cc08 slices naming both lungs
    import torch

    spec = torch.load(tmp_path / "run" / "models" / "model.pt", weights_only=True)["spec"]
    ids = spec["training"]["case_ids"]
    assert set(ids["training"]).isdisjoint(ids["test"]) and set().union(*ids.values()) == {"cc01", "cc02", "cc04", "cc05"}


def test_one_epoch_shorter_than_the_validation_interval_still_writes_model_pt(small_folder, tmp_path):
    """`--epochs 1` with the bundle's val_interval 2 used to exit 0 without models/model.pt (issue 32, item 9)."""
    from monai.bundle import run

    configs = REPO / "bundles" / "medsegtext" / "configs"
    run("training", config_file=[str(configs / "train.yaml")], bundle_root=str(configs.parent), output_dir=str(tmp_path),
        ckpt_dir=str(tmp_path / "models"), dataset_dir=str(small_folder), image_size=32, num_threads=1,
        split_ratios=[0.5, 0.25, 0.25], epochs=1, batch_size=4)
    assert (tmp_path / "models" / "model.pt").is_file()


def test_a_bundle_run_on_bad_data_ends_with_the_file_and_the_problem(tmp_path):
    """Issue 32, item 9: MONAI wraps a config expression's error in 'Failed to evaluate ConfigExpression';
    the run's last line names the bad file instead."""
    import subprocess
    import sys

    folder = make_folder(tmp_path / "data", handful(2, ("cc01", "cc02")))
    missing = sorted((folder / "lungs").iterdir())[1]
    missing.unlink()
    out = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(REPO / "bundles/medsegtext/configs/train.yaml"),
         "--bundle_root", str(REPO / "bundles/medsegtext"), "--dataset_dir", str(folder), "--output_dir", str(tmp_path / "out"),
         "--ckpt_dir", str(tmp_path / "models"), "--epochs", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"segreport: error: {missing}: lung mask of {missing.name} (case cc01) not found", last


def test_three_cases_train_validating_on_the_training_slices(tmp_path, caplog):
    """Issue 32, item 9: a split of three cases leaves no validation case; it trains with a warning."""
    from segreport.training.slices2d import load_datalists

    folder = make_folder(tmp_path / "data", handful(2, ("cc01", "cc02", "cc04")))
    with caplog.at_level("WARNING", logger="segreport.slices2d"):
        lists = load_datalists(folder, ratios=(0.7, 0.1, 0.2))
    assert lists["training"] and lists["validation"] == lists["training"] and "no validation slices" in caplog.text
    with pytest.raises(InputError, match="no training slices after the split"):
        load_datalists(folder, ratios=(0.0, 0.5, 0.5))
