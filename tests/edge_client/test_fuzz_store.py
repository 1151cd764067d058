"""Fuzzing the store's segment and manifest readers with random and mutated bytes.

One store holds one committed record; every case rewrites its segment (or its manifest) and reads the
store back through a fresh ``TupleStore``. Property: the read returns the committed record (or nothing, when
the active segment was cut back to its header: undetectable by design), never anything else, and only when
all the damage is a torn tail after intact committed bytes; otherwise it raises a ``StoreError`` naming the
damaged file, within a memory bound that does not depend on what the bytes claim.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.store import MANIFEST_NAME, MAX_FRAME_BYTES, StoreError, StoreTamperError
from tests.edge_client.test_store import make, rec, segment_files
from tests.fuzzing import (
    EDITS,
    FuzzSurface,
    assert_clear_error,
    context_fixture,
    fuzz_settings,
    mutate_bytes,
    run_bounded,
)


@dataclass(frozen=True)
class StoreFixture:
    """A store directory with one committed record, its segment and manifest bytes."""

    root: Path
    segment: Path
    good: bytes
    manifest: Path
    good_manifest: bytes


@contextlib.contextmanager
def store_context(tmp: Path) -> Iterator[StoreFixture]:
    """One store with one committed record."""
    store = make(tmp, "fuzz")
    store.append([rec(1)])
    store.close()
    (segment,) = segment_files(store)
    manifest = store.directory / MANIFEST_NAME
    yield StoreFixture(tmp, segment, segment.read_bytes(), manifest, manifest.read_bytes())


def _crc_frame(length: int, body: bytes) -> bytes:
    head = struct.pack("<I", length)
    return head + struct.pack("<I", zlib.crc32(b"RIBF" + head)) + body


# (file, kind, argument): what to write instead of the committed bytes of the segment or the manifest.
CASES = st.one_of(
    st.tuples(st.just("segment"), st.just("replace"), st.binary(max_size=400)),
    st.tuples(st.just("segment"), st.just("edit"), EDITS),
    # a frame whose length field passes its CRC, with a random or short body, after the good data or the header
    st.tuples(
        st.just("segment"),
        st.just("frame"),
        st.tuples(st.integers(0, 2**32 - 1) | st.integers(28, 200), st.binary(max_size=300), st.booleans()),
    ),
    st.tuples(st.just("manifest"), st.just("edit"), EDITS),
    st.tuples(st.just("manifest"), st.just("replace"), st.binary(max_size=200)),
)


def _damaged(kind: str, argument: object, good: bytes) -> bytes:
    if kind == "replace":
        return argument  # type: ignore[return-value]
    if kind == "edit":
        return mutate_bytes(good, argument)  # type: ignore[arg-type]
    length, body, keep = argument  # type: ignore[misc]
    return (good if keep else good[:60]) + _crc_frame(length, body)


def check_store_bytes(fx: StoreFixture, case: tuple[str, str, object]) -> str:
    """The committed record exactly, or a StoreError that names the file; bounded memory."""
    target, kind, argument = case
    path, good = (fx.segment, fx.good) if target == "segment" else (fx.manifest, fx.good_manifest)
    data = _damaged(kind, argument, good)
    path.write_bytes(data)
    try:
        got, error = run_bounded(
            lambda: make(fx.root, "fuzz").read(), 2 * MAX_FRAME_BYTES + len(data) + (1 << 20), (StoreError,)
        )
    finally:
        path.write_bytes(good)
    if error is not None:
        assert_clear_error(error)
        if isinstance(error, StoreTamperError):
            assert error.path in str(error) and Path(error.path).name in (fx.segment.name, MANIFEST_NAME)
        return type(error).__name__
    # Nothing but committed records ever reads back. Bytes after the committed frame are a torn tail; cutting
    # the active segment back to a frame boundary is not detectable (documented in edge_client.store).
    assert got in ([rec(1)], []), f"read {got!r} from damaged bytes"
    kept = good if got else good[:60]
    assert data == good or (target == "segment" and data.startswith(kept)), "damage went unnoticed"
    return "intact" if data == good else "torn_tail" if got else "cut_to_header"


SURFACES = (
    FuzzSurface(
        "store_segment",
        "random, mutated and CRC-valid-frame segment bytes; mutated and random manifests",
        CASES,
        store_context,
        check_store_bytes,
    ),
)


fuzz_store = context_fixture(store_context, "fuzz-store")  # every case restores the bytes it changed


@fuzz_settings()
@given(case=CASES)
def test_fuzz_segment_and_manifest_bytes(fuzz_store, case):
    check_store_bytes(fuzz_store, case)


def test_huge_declared_length_is_rejected_without_allocating(fuzz_store):
    fuzz_store.segment.write_bytes(fuzz_store.good + _crc_frame(2**32 - 1, b"\0" * 64))
    try:
        with pytest.raises(StoreTamperError, match="impossible length"):
            make(fuzz_store.root, "fuzz").read()
    finally:
        fuzz_store.segment.write_bytes(fuzz_store.good)
