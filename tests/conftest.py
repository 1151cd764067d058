"""Shared fixtures: where the real data lives, and skipping cleanly where it does not."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Flower writes a telemetry id under FLWR_HOME (default ~/.flwr) whenever a run starts: keep tests out of
# the user's home, and never post telemetry from a test run.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="rib-edge-test-flwr-home-"))
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RIB_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data directory; tests that use it skip on a fresh clone without it."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real datasets not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's preprocessing cache out of the user's home."""
    monkeypatch.setenv("RIB_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is fastest and leaves the other core to parallel test workers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
