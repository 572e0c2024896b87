"""Shared test fixtures: paths to the real data in ../shared/data, small torch threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# this checkout's package, whatever checkout the shared venv's editable install points at
sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("SEGREPORT_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    import torch

    # one thread: the models under test are tiny, and on a 2-core machine two threads contending
    # with anything else made them ~100x slower (measured), while one thread is never worse
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public fixtures (shared/data beside the checkout). CI always has them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_DATA} (set SEGREPORT_SHARED_DATA)")
    return SHARED_DATA


# Phantom fixture (owner: phantom/findings). 6 cases of 96x96x24 at 3.2x3.2x10 mm (a full-size chest
# on a coarse grid), LPS storage, 2D LViT export included; about a second or two to generate.
PHANTOM_KWARGS = dict(n_cases=6, seed=0, shape=(96, 96, 24), spacing=(3.2, 3.2, 10.0), orientation="LPS")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A tiny generated phantom dataset (read-only for tests: copy before modifying)."""
    from segreport.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(out, **PHANTOM_KWARGS)
    return out


def train_and_evaluate_bundle(bundle: Path, out: Path, dataset_dir: Path, **overrides) -> Path:
    """One epoch of ``monai.bundle run training``, then ``evaluating``, with the bundle's own configs
    (exactly as its README says), outputs and weights under ``out``."""
    from monai.bundle import run

    configs = bundle / "configs"
    common = dict(bundle_root=str(bundle), output_dir=str(out), ckpt_dir=str(out / "models"),
                  dataset_dir=str(dataset_dir), **overrides)
    files = [str(configs / "train.yaml")]
    run("training", config_file=files, epochs=1, **common)
    run("evaluating", config_file=files + [str(configs / "evaluate.yaml")], **common)
    return out
