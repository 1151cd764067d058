"""Session fixtures of the device tests: one tiny trained world and its packages per test process."""

from __future__ import annotations

import pytest

from tests.edge_client.worlds import shared_packages, shared_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A signed fp32 package (version 1) of a tiny RIB, its keys and one device's raw events."""
    return shared_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def packages(world, tmp_path_factory):
    """v1 (older), v2 (installed), v3 (newer, int8) and a foreign-key package of the same model."""
    return shared_packages(world, tmp_path_factory.mktemp("packages"))
