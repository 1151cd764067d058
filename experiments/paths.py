"""Where experiment results go: ``benchmarks/results/`` of the checkout the experiments run from."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
