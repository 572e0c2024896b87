"""Hands off user data: training on a dataset folder in every layout the readers accept leaves that
folder byte-identical (no phantom written into it, no cache, no split file)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _layout(phantom_dir: Path, dest: Path, layout: str) -> Path:
    if layout == "lvit":  # MosMedData+ / QaTa: Train_Folder, Val_Folder, Test_Folder at the root
        shutil.copytree(phantom_dir / "slices2d", dest)
    elif layout == "msd":  # dataset.json + imagesTr/ labelsTr/ ...
        shutil.copytree(phantom_dir, dest, ignore=shutil.ignore_patterns("slices2d"))
    else:  # imagesTr/ + labelsTr/ alone
        for sub in ("imagesTr", "labelsTr"):
            shutil.copytree(phantom_dir / sub, dest / sub)
    return dest


@pytest.mark.parametrize("bundle, layout", [("medsegtext", "lvit"), ("medsegtext", "msd"), ("medsegtext", "folders"),
                                            ("lesion_report_3d", "msd")])
def test_training_leaves_the_users_dataset_byte_identical(phantom_dir, tmp_path, bundle, layout):
    from monai.bundle import run

    data = _layout(phantom_dir, tmp_path / "user_data", layout)
    before = _tree(data)
    overrides = dict(image_size=32) if bundle == "medsegtext" else dict(spacing=[6.4, 6.4, 10.0], max_rounds=1, batch_size=2)
    if bundle == "medsegtext" and layout != "lvit":
        overrides["data_format"] = "volumes"
    run("training", config_file=[str(REPO / "bundles" / bundle / "configs" / "train.yaml")], bundle_root=str(REPO / "bundles" / bundle),
        output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "out" / "models"), dataset_dir=str(data), epochs=1,
        val_interval=1, num_threads=1, **overrides)
    assert (tmp_path / "out" / "models" / "model_final.pt").is_file()
    assert _tree(data) == before


def test_a_folder_without_a_dataset_is_refused_not_filled(tmp_path):
    from monai.bundle import run

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception) as info:
        run("training", config_file=[str(REPO / "bundles" / "medsegtext" / "configs" / "train.yaml")],
            bundle_root=str(REPO / "bundles" / "medsegtext"), output_dir=str(tmp_path / "out"), dataset_dir=str(empty), epochs=1)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert any("no dataset found" in text for text in chain) and not any(empty.iterdir())
