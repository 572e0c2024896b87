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


def test_version(capsys):
    import segreport

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"segreport {segreport.__version__}"


def test_every_option_of_every_command_has_help(monkeypatch, capsys):
    """Each subcommand's parser, caught as it parses ``--help``: no option without a help text."""
    import argparse

    import pytest

    parsers = []
    original = argparse.ArgumentParser.parse_args

    def catching(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catching)
    for command in ("synth", "infer", "evaluate", "label", "bundles", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    assert len(parsers) == 6
    bare = [f"{p.prog} {'/'.join(a.option_strings)}" for p in parsers for a in p._actions
            if a.option_strings and not a.help]
    assert not bare, bare


def test_bundles_lists_every_shipped_bundle_and_its_weights(tmp_path, monkeypatch, capsys):
    from segreport.models.untrained import write_untrained_checkpoint

    monkeypatch.setenv("SEGREPORT_HOME", str(tmp_path))
    write_untrained_checkpoint("tmc", tmp_path / "tmc" / "model.pt")
    assert main(["bundles", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"medsegtext", "lesion_report_3d", "tmc", "lapft"} <= set(rows)
    assert rows["tmc"]["weights"] == str(tmp_path / "tmc" / "model.pt")  # the user folder, when the bundle has none
    assert rows["lapft"]["weights"] is None
