"""Signed model releases from the federation: the edge package format (``edge_client.package``).

The model version of a release is the server round it was taken at, so it only ever grows and a device
refuses an older release. The package is built in a temporary directory and renamed into place, so a crash
never leaves a half-written release where devices look.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from model.data.dataset import Vocabulary
from model.export import build_package
from model.local import set_weights
from model.rib import RIB, RIBConfig

POPULAR_TOP = 1000


def release_path(release_dir: str | Path, version: int) -> Path:
    """Where release ``version`` goes."""
    return Path(release_dir) / f"v{int(version):06d}"


def publish_release(
    weights: list[np.ndarray],
    rib_config: RIBConfig,
    vocab: Vocabulary,
    release_dir: str | Path,
    signing_key: str | Path,
    version: int,
    extra: dict[str, object] | None = None,
) -> Path:
    """Export, quantise (int8) and sign the global model as release ``version``; returns its directory."""
    target = release_path(release_dir, version)
    if target.exists():
        return target  # a resumed run re-reaching a release round: the signed package is already there
    model = RIB(rib_config)
    set_weights(model, weights)
    model.eval()
    # The server holds no interaction counts; the shared vocabulary is ordered by training frequency
    # (model.data.protocol), so the cold-start list is its head, scored by rank (not by counts).
    top = [str(i) for i in vocab.item_ids[:POPULAR_TOP]]
    scores = [float(len(top) - rank) for rank in range(len(top))]
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        build_package(
            model, vocab, tmp, signing_key, int(version), popular=(top, scores), int8=True, extra=extra
        )
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
