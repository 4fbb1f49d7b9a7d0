"""Shared test fixtures. Tests run on CPU with small models and small synthetic inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    # pytest-xdist runs two workers on two cores: one intra-op thread each avoids thrashing.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The real-face data folder (../shared/data), or skip with the reason."""
    if not (SHARED_DATA / "lfw" / "pairs.txt").exists():
        pytest.skip(f"real face data not present at {SHARED_DATA}")
    return SHARED_DATA
