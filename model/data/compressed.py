"""Bounded decompression for the data loaders: a small ``.gz`` cannot expand into gigabytes of memory.

Every compressed input the loaders read goes through here. The decompressed output may not pass
``max_bytes`` (default 2 GiB) nor, once past 16 MiB, ``max_ratio`` (default 200) times the compressed
size; past either limit the read stops with ``SchemaError("too_large")``. Decompression runs in bounded
chunks (``GzipFile`` hands ``max_length`` to zlib), so a bomb costs at most the limit in memory: about
16 MiB, or 200 bytes per compressed byte, before it is refused. Streams are checked while they are
read, not after. Multi-member gzip files (concatenated ``.gz``) are read whole, as ``gzip`` does.

The shared datasets are far inside these limits: the largest decompresses to 18 MiB, the most compressible
at 9:1, while a deflate bomb reaches about 1,000:1. A genuine file beyond them is read after raising the
limits with the environment variables ``RIB_EDGE_MAX_DECOMPRESSED_BYTES`` and
``RIB_EDGE_MAX_DECOMPRESSION_RATIO`` (or the ``max_bytes``/``max_ratio`` keywords of these functions).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
from pathlib import Path
from typing import BinaryIO

from edge_client.schema import SchemaError

MAX_BYTES_ENV = "RIB_EDGE_MAX_DECOMPRESSED_BYTES"
MAX_RATIO_ENV = "RIB_EDGE_MAX_DECOMPRESSION_RATIO"
DEFAULT_MAX_DECOMPRESSED_BYTES = (
    2 << 30
)  # 2 GiB: over 100x the largest shared file, room for full public logs
DEFAULT_MAX_RATIO = 200.0  # real logs compress 2-10:1 (shared data at most 9:1); a deflate bomb ~1,000:1
RATIO_FREE_BYTES = 16 << 20  # output below this is never a bomb worth refusing, whatever its ratio
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
# Compressed formats by file name (as pandas infers them); the ones the loaders can read bounded.
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_UNSUPPORTED = (".tar", ".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".zst")


def _env_limit(name: str, default: float, kind: type) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise SchemaError("bad_argument", f"{name}={text!r} must be a positive {kind.__name__}")
    return value


def limits(max_bytes: int | None = None, max_ratio: float | None = None) -> tuple[int, float]:
    """(max_bytes, max_ratio): the arguments when given, else the environment, else the defaults."""
    return (
        int(
            max_bytes
            if max_bytes is not None
            else _env_limit(MAX_BYTES_ENV, DEFAULT_MAX_DECOMPRESSED_BYTES, int)
        ),
        float(max_ratio if max_ratio is not None else _env_limit(MAX_RATIO_ENV, DEFAULT_MAX_RATIO, float)),
    )


class _Budget:
    """The output allowed for ``compressed`` input bytes, and the error that names the limit that was hit."""

    def __init__(self, name: str, compressed: int, max_bytes: int | None, max_ratio: float | None):
        self.name = name
        self.compressed = compressed
        self.max_bytes, self.max_ratio = limits(max_bytes, max_ratio)
        by_ratio = max(RATIO_FREE_BYTES, int(self.max_ratio * compressed))
        self.limit = min(self.max_bytes, by_ratio)
        self.ratio_bound = by_ratio < self.max_bytes

    def error(self) -> SchemaError:
        if self.ratio_bound:
            why = (
                f"more than {self.max_ratio:g} times its {self.compressed:,} compressed bytes (a decompression bomb?); "
                f"a genuine file can be read after raising {MAX_RATIO_ENV} (now {self.max_ratio:g})"
            )
        else:
            why = (
                f"the limit; a genuine file can be read after raising {MAX_BYTES_ENV} (now {self.max_bytes})"
            )
        return SchemaError("too_large", f"{self.name} decompresses past {self.limit:,} bytes, {why}")


def decompress_gzip(
    raw: bytes, name: str, *, max_bytes: int | None = None, max_ratio: float | None = None
) -> bytes:
    """``gzip.decompress(raw)`` (all members) that stops with ``SchemaError("too_large")`` past the limits.

    Damaged streams raise what ``gzip`` raises (``OSError``, ``EOFError``, ``zlib.error``).
    """
    budget = _Budget(name, len(raw), max_bytes, max_ratio)
    with BoundedReader(gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb"), budget) as stream:
        return stream.read()


def maybe_decompress_gzip(
    raw: bytes, name: str, *, max_bytes: int | None = None, max_ratio: float | None = None
) -> bytes:
    """``raw`` decompressed when it starts with the gzip magic, else unchanged."""
    if raw[:2] != _GZIP_MAGIC:
        return raw
    return decompress_gzip(raw, name, max_bytes=max_bytes, max_ratio=max_ratio)


class BoundedReader(io.RawIOBase):
    """A binary stream over a decompressing file that raises ``SchemaError("too_large")`` once past the limits."""

    def __init__(self, inner: BinaryIO, budget: _Budget):
        super().__init__()
        self._inner = inner
        self._budget = budget
        self.decompressed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        with memoryview(buffer) as view:
            n = self._inner.readinto(view[:_CHUNK])
        self.decompressed += n
        if self.decompressed > self._budget.limit:
            raise self._budget.error()
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def open_decompressed(
    path: str | Path, *, max_bytes: int | None = None, max_ratio: float | None = None
) -> BinaryIO:
    """``path`` opened for binary reading, decompressed by its extension (.gz, .bz2, .xz) within the limits.

    A plain file is returned as is. Archive formats (.zip, .tar.*, .zst) are a ``SchemaError("bad_file")``.
    """
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(_UNSUPPORTED):
        raise SchemaError(
            "bad_file", f"{path.name}: archives and zstd are not read; decompress it or use .gz"
        )
    opener = next((o for suffix, o in _OPENERS.items() if lower.endswith(suffix)), None)
    if opener is None:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    budget = _Budget(path.name, path.stat().st_size, max_bytes, max_ratio)
    return io.BufferedReader(BoundedReader(opener(path, "rb"), budget), buffer_size=_CHUNK)
