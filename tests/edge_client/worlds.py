"""A tiny trained world for device-side tests, built once per process: a signed package, keys, raw events.

``shared_world`` trains a small RIB on a small synthetic population (a few seconds) and exports a signed
fp32 package; ``shared_packages`` adds the packages the tamper and package-fuzz tests swap against. The
``world`` and ``packages`` session fixtures (``conftest.py``) and ``experiments/security.py`` all use
these, so one process trains at most once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_client.package import generate_keypair, sign_package, verify_package

DEVICE = "device-000000"

_WORLD: dict[str, object] | None = None
_PACKAGES: dict[str, object] | None = None


def build_world(base: Path) -> dict[str, object]:
    """A tiny trained package on a small synthetic population, and that population's raw events."""
    from model.data.open import synthetic_split
    from model.data.synthetic import SyntheticConfig, generate_population
    from model.export import build_package, popularity_from
    from model.train import TrainConfig, rib_config_for, train_rib

    config = SyntheticConfig(n_devices=40, n_items=60, n_categories=6)
    split = synthetic_split(config)
    tc = TrainConfig(epochs=1, min_steps=0, patience=10, w2v_init=False)
    rec, _ = train_rib(split.train, rib_config_for(split.train, hidden_dim=16, max_len=8), tc, progress=False)
    private, public = generate_keypair(base / "keys")
    package = base / "pkg"
    popular = popularity_from(split.train)
    build_package(rec.model, split.vocab, package, private, 1, popular, int8=False)
    events = [e for e in generate_population(config) if e.device_id == DEVICE]
    return {
        "package": package,
        "public": public,
        "private": private,
        "events": events,
        "popular": popular[0],
        "popular_counts": popular[1],
        "model": rec.model,
        "vocab": split.vocab,
    }


def shared_world(base: Path) -> dict[str, object]:
    """``build_world`` under ``base`` the first time this process asks; the same world after that."""
    global _WORLD
    if _WORLD is None:
        base.mkdir(parents=True, exist_ok=True)
        _WORLD = build_world(base)
    return _WORLD


def resign_copy(source: Path, public_key: object, target: Path, private_key: object, version: int) -> Path:
    """A copy of a verified package's payload, signed again with ``private_key`` as ``version``."""
    manifest = verify_package(source, public_key)
    target.mkdir(parents=True)
    for name in manifest.files:
        shutil.copyfile(source / name, target / name)
    sign_package(
        target, private_key, version, manifest.model, manifest.precision, manifest.extra, manifest.created
    )
    return target


def shared_packages(world: dict[str, object], base: Path) -> dict[str, Path]:
    """Packages of one model: v1 (fp32, older), v2 (the one a device has installed), v3 (int8 with another
    popularity list: a genuine newer update whose graph and popularity bytes differ from v2's), and
    ``foreign`` (v3's payload signed as version 4 by a key the device does not trust)."""
    global _PACKAGES
    if _PACKAGES is not None:
        return _PACKAGES
    from model.export import build_package

    base.mkdir(parents=True, exist_ok=True)
    v1 = Path(world["package"])
    private = world["private"]
    v2 = resign_copy(v1, world["public"], base / "v2", private, 2)
    popular = (list(reversed(world["popular"])), sorted(world["popular_counts"]))
    v3 = base / "v3"
    build_package(world["model"], world["vocab"], v3, private, 3, popular, int8=True)
    other_private, other_public = generate_keypair(base / "other-keys")
    foreign = resign_copy(v3, world["public"], base / "foreign", other_private, 4)
    _PACKAGES = {
        "v1": v1,
        "v2": v2,
        "v3": v3,
        "foreign": foreign,
        "other_public": other_public,
        "other_private": other_private,
    }
    return _PACKAGES
