"""Shared test fixtures: paths to the real data in ../shared/data, small torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEGREPORT_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public fixtures (shared/data beside the checkout). CI always has them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_DATA} (set SEGREPORT_SHARED_DATA)")
    return SHARED_DATA
