"""Cache of preprocessed splits: one .npz per (source bytes, mapping, protocol, code version).

Preprocessing a raw log takes seconds to minutes; loading the .npz takes milliseconds. The key hashes the
source files' *bytes* (not their paths or mtimes), so a moved copy still hits and an edited file never
does. Bump ``CODE_VERSION`` whenever a loader or the protocol changes what it produces.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from model.data.dataset import SplitData

CODE_VERSION = "data-2"  # data-2: inferred conversions no longer include RIB page entries (Cart2Product)
CACHE_ENV = "RIB_EDGE_CACHE"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where cached splits live: env ``RIB_EDGE_CACHE``, else ``~/.cache/rib-edge``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rib-edge"


def hash_files(paths: Sequence[Path]) -> str:
    """sha256 over the files' bytes, in order (each prefixed by its length so boundaries count)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(Path(path).stat().st_size).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(files: Sequence[Path], settings: Mapping[str, object]) -> str:
    """The cache key: source bytes + JSON of everything else that shapes the result + CODE_VERSION."""
    digest = hashlib.sha256()
    digest.update(hash_files(files).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(CODE_VERSION.encode())
    return digest.hexdigest()


def cache_path(name: str, key: str) -> Path:
    """File of one cached split; the readable name is only for people listing the directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "data"
    return cache_dir() / f"{safe}-{key[:24]}.npz"


def read_cached(path: Path) -> SplitData | None:
    """The cached split, or None when absent or unreadable (a corrupt file is removed, then rebuilt)."""
    if not path.exists():
        return None
    try:
        return SplitData.load(path)
    except Exception:  # noqa: BLE001 - any damage to a cache file means "rebuild", never a crash
        path.unlink(missing_ok=True)
        return None


def cached_split(
    name: str,
    files: Sequence[Path],
    settings: Mapping[str, object],
    build: Callable[[], SplitData],
    refresh: bool = False,
) -> SplitData:
    """Load the split from the cache, or build, save and return it; ``info['cache']`` says which."""
    key = cache_key(files, settings)
    path = cache_path(name, key)
    split = None if refresh else read_cached(path)
    hit = split is not None
    if split is None:
        split = build()
        split.info["cache"] = {"key": key}
        try:
            split.save(path)
        except OSError as err:  # a read-only or full disk costs speed, not the result
            split.info["cache"]["error"] = str(err)
    split.info["cache"] = {**split.info.get("cache", {}), "hit": hit, "path": str(path), "key": key}
    return split
