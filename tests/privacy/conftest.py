"""Privacy tests train small models: one torch thread keeps them fast and stable on 2 cores."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every privacy test module runs with ``one_torch_thread`` (tests/conftest.py)."""
