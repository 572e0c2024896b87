"""The installed product (issue 35): the wheel ships every bundle's configs and docs, and after
``pip install`` ``segreport infer --bundle medsegtext`` runs from any folder, outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("medsegtext", "lesion_report_3d", "tmc", "lapft")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the tracked files only (a clean copy: nothing the checkout happens to hold)."""
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True)
    return next(dist.glob("segreport-*.whl"))


def test_the_wheel_ships_every_bundle_and_no_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for bundle in BUNDLES:
        for part in ("configs/inference.json", "configs/train.yaml", "configs/metadata.json", "docs/README.md",
                     "LICENSE", "large_files.yml"):
            assert f"segreport/bundles/{bundle}/{part}" in names, (bundle, part)
    assert not [n for n in names if n.endswith(".pt")]


def test_installed_segreport_infers_from_another_folder(wheel, tmp_path, phantom_dir):
    """A fresh venv that reuses this environment's dependencies (a .pth line; not its editable segreport),
    the wheel installed into it, then ``segreport infer --bundle medsegtext`` from an unrelated folder."""
    from segreport.models.untrained import write_untrained_checkpoint

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    checkpoint = write_untrained_checkpoint("medsegtext", tmp_path / "weights" / "model.pt")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0], work / "ct.nii.gz")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    python = str(venv / "bin" / "python")
    where = subprocess.run([python, "-c", "import segreport; print(segreport.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed wheel, not this checkout
    run = subprocess.run([python, "-m", "segreport.cli", "infer", "--bundle", "medsegtext", "--checkpoint", str(checkpoint),
                          "-i", "ct.nii.gz", "-o", "out", "--no-progress"], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["bundle"]["path"] == str(site / "segreport" / "bundles" / "medsegtext")
    assert (work / "out" / "ct_seg.nii.gz").is_file()
