"""The thin `segreport` command: it dispatches, and `synth` writes a dataset and a preview."""

import json
from pathlib import Path

from segreport.cli import main


def test_synth_writes_dataset_and_preview(tmp_path, capsys):
    out = tmp_path / "phantom"
    assert main(["synth", "--out", str(out), "--cases", "3", "--seed", "1", "--shape", "64", "64", "16"]) == 0
    data = json.loads((out / "dataset.json").read_text())
    assert data["numTraining"] == 3 and len(list((out / "imagesTr").glob("*.nii.gz"))) == 3
    assert (out / "preview.png").stat().st_size > 10_000
    texts = list((out / "slices2d").glob("*_Folder/*_text.xlsx"))
    assert texts, "2D LViT export missing"
    assert "preview:" in capsys.readouterr().out


def test_unknown_command_prints_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "segreport synth" in capsys.readouterr().out


def test_the_demo_finds_every_bundle_config_it_runs():
    """`make demo` takes minutes, so the suite does not run it; what it reads must still be where it looks."""
    from segreport import demo

    for bundle, names in {"medsegtext": ("train.yaml", "evaluate.yaml", "inference.json"),
                          "lesion_report_3d": ("train.yaml", "evaluate.yaml", "inference.json"),
                          "tmc": ("train.yaml", "evaluate.yaml", "inference.json")}.items():
        for path in demo._configs(bundle, *names):
            assert Path(path).is_file(), path
