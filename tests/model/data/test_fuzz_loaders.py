"""Fuzzing the data loaders: users' CSV/TSV/gzip/Parquet logs, OTTO-style JSONL and SR-GNN pickles.

Properties: ``load_interactions_file`` returns a frame whose skip report adds up (read = kept + skipped, every
skip under a documented reason, every kept row valid) or raises ``SchemaError`` with a documented reason;
``read_otto_jsonl`` + ``finish_frame`` likewise; ``load_srgnn_split`` returns the published examples or a
``SchemaError``, and a pickle that names any global (a class, a function) is refused without running it.
Nothing else may escape, and each case stays within a memory bound.
"""

from __future__ import annotations

import collections
import contextlib
import fractions
import gzip
import io
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edge_client.schema import MAX_ID_CHARS, MAX_TIMESTAMP_MS, SchemaError, SkipReport
from model.data.loaders import SKIP_REASONS, finish_frame, load_interactions_file, read_otto_jsonl
from model.data.srgnn import load_srgnn_split
from tests.fuzzing import (
    EDITS,
    JSON,
    FuzzSurface,
    assert_clear_error,
    context_fixture,
    fuzz_settings,
    mutate_bytes,
    run_bounded,
)
from tests.model.data.test_loaders import log_rows

FILE_REASONS = frozenset({"missing_data", "bad_file", "empty", "missing_field", "bad_mapping", "too_large"})
SRGNN_REASONS = frozenset({"bad_file", "unsafe_pickle", "bad_benchmark", "missing_data", "too_large"})
LOADER_BOUND_BYTES = 64 << 20  # a case is a file of a few KiB; pandas' working set stays far below this


@contextlib.contextmanager
def workdir(tmp: Path) -> Iterator[Path]:
    """A scratch directory; every case overwrites its own files in it."""
    tmp.mkdir(parents=True, exist_ok=True)
    yield tmp


# ---- users' interaction files ----------------------------------------------------------------------

_CLEAN = (
    "\n".join(
        [",".join(log_rows(1)[0])] + [",".join(str(v) for v in row.values()) for row in log_rows(12)]
    ).encode()
    + b"\n"
)
_COLUMNS = ["session_id", "user_id", "timestamp", "item_id", "action", "dwell_seconds"]
_field = st.one_of(
    st.sampled_from(
        [
            "s1",
            "s2",
            "u1",
            "item1",
            "item2",
            "view",
            "add_to_cart",
            "purchase",
            "",
            " ",
            "NA",
            "nan",
            "inf",
            "-inf",
            "-5",
            "0",
            "1700000000",
            "1700000000000",
            "17000000000000000000000",
            "1e400",
            "2023-11-14T10:00:00Z",
            "2023-11-14 10:00",
            "0001-01-01T00:00",
            "9999-12-31",
            "10000-01-01",
            "True",
            '"quoted,field"',
            '"unterminated',
            "x" * (MAX_ID_CHARS + 1),
            "a\x01b",
            "caf\udce9",
        ]
    ),
    st.text(max_size=20),
    st.integers().map(str),
    st.floats().map(str),
)


@st.composite
def tables(draw: st.DrawFn) -> tuple[str, bytes]:
    """A delimited table of random columns (mostly the expected ones) and random field values."""
    columns = draw(st.lists(st.sampled_from(_COLUMNS) | st.text(max_size=8), min_size=1, max_size=7))
    sep = draw(st.sampled_from([",", "\t", ";", "|"]))
    rows = draw(st.lists(st.lists(_field, min_size=len(columns) - 1, max_size=len(columns) + 1), max_size=12))
    text = "\n".join(sep.join(line) for line in [columns, *rows]) + draw(st.sampled_from(["\n", "", "\r\n"]))
    data = text.encode("utf-8", "surrogateescape")
    suffix = draw(st.sampled_from([".csv", ".tsv", ".txt", ".csv.gz"]))
    return suffix, gzip.compress(data) if suffix.endswith(".gz") else data


FILES = st.one_of(
    tables(),
    st.tuples(st.just(".csv"), EDITS.map(lambda edits: mutate_bytes(_CLEAN, edits))),
    st.tuples(st.just(".csv.gz"), EDITS.map(lambda edits: mutate_bytes(gzip.compress(_CLEAN), edits))),
    st.tuples(st.sampled_from([".csv", ".csv.gz", ".parquet", ".txt"]), st.binary(max_size=300)),
)


def _check_report(report: SkipReport, kept_rows: int) -> None:
    assert report.read == report.kept + report.n_skipped, report.summary()
    assert report.kept == kept_rows and set(report.skipped) <= set(SKIP_REASONS), report.summary()


def _check_frame(frame) -> None:
    ts = frame["timestamp_ms"].to_numpy()
    assert ts.dtype == np.int64 and ((ts >= 0) & (ts <= MAX_TIMESTAMP_MS)).all()
    for column in ("item_id", "session_id", "user_id"):
        if column in frame:
            values = [v for v in frame[column] if v is not None]
            assert all(isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS and min(v) >= " " for v in values), (
                values[:5]
            )
    if "dwell_seconds" in frame:
        dwell = frame["dwell_seconds"].to_numpy(np.float64)
        assert not (dwell < 0).any() and not np.isinf(dwell).any()


def check_interactions_file(directory: Path, case: tuple[str, bytes]) -> str:
    """A frame whose report adds up, or a SchemaError with a documented reason."""
    suffix, data = case
    path = directory / f"log{suffix}"
    path.write_bytes(data)
    try:
        loaded, error = run_bounded(lambda: load_interactions_file(path), LOADER_BOUND_BYTES, (SchemaError,))
    finally:
        path.unlink()
    if error is not None:
        assert_clear_error(error, FILE_REASONS)
        return error.reason  # type: ignore[attr-defined]
    _check_report(loaded.skips, len(loaded.frame))
    _check_frame(loaded.frame)
    assert loaded.mapping.activities  # an inferred mapping covers the kept actions
    return "loaded"


# ---- OTTO-style JSONL ------------------------------------------------------------------------------

_otto_values = JSON | st.sampled_from(
    [1_659_304_800_000, "1659304800000", 10**30, -1, True, 1e300, None, "clicks", "carts", "orders", [], {}]
)


@st.composite
def otto_lines(draw: st.DrawFn) -> bytes:
    """An OTTO line of mostly valid events (some fields odd), or arbitrary JSON, or text."""
    kind = draw(st.integers(0, 5))
    if kind == 4:
        return json.dumps(draw(JSON)).encode()
    if kind == 5:
        return draw(st.text(max_size=60)).encode("utf-8", "surrogatepass")
    events = []
    for _ in range(draw(st.integers(0, 6))):
        event = {
            "aid": draw(st.integers(1, 30)),
            "ts": 1_659_304_800_000 + draw(st.integers(0, 10**9)),
            "type": draw(st.sampled_from(["clicks", "carts", "orders"])),
        }
        if draw(st.integers(0, 3)) == 0:
            event[draw(st.sampled_from(["aid", "ts", "type", "x"]))] = draw(_otto_values)
        events.append(event if draw(st.integers(0, 9)) else draw(JSON))
    record: object = {
        "session": draw(st.integers(0, 20)) if draw(st.integers(0, 5)) else draw(_otto_values),
        "events": events,
    }
    if draw(st.integers(0, 5)) == 0:
        record = {**record, draw(st.sampled_from(["session", "events", "x"])): draw(_otto_values)}  # type: ignore[dict-item]
    return json.dumps(record).encode()


JSONL = st.one_of(
    st.tuples(st.lists(otto_lines(), max_size=8), st.booleans()),
    st.tuples(st.lists(otto_lines() | st.binary(max_size=40), max_size=8), st.booleans()),
    st.tuples(st.binary(max_size=200).map(lambda b: [b]), st.booleans()),
)


def check_jsonl(directory: Path, case: tuple[list[bytes], bool]) -> str:
    """read_otto_jsonl + finish_frame: a frame whose report adds up, or a documented SchemaError."""
    lines, compress = case
    data = b"\n".join(lines)
    path = directory / "train.jsonl"
    path.write_bytes(gzip.compress(data) if compress else data)

    def load():
        report = SkipReport()
        frame, _ = finish_frame(read_otto_jsonl(path, report), report, "otto")
        return frame, report

    result, error = run_bounded(load, LOADER_BOUND_BYTES, (SchemaError,))
    if error is not None:
        assert_clear_error(error, FILE_REASONS)
        return error.reason  # type: ignore[attr-defined]
    frame, report = result
    _check_report(report, len(frame))
    _check_frame(frame)
    return "loaded"


# ---- SR-GNN pickles ----------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this would create a file: the classic pickle attack."""

    def __reduce__(self):
        return (os.mknod, ("/tmp/rib-edge-fuzz-pwned",))


_plain = st.recursive(
    st.integers(-3, 80)
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**63, 10**30])
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.tuples(inner, inner)
        | st.dictionaries(st.integers(0, 9), inner, max_size=3)
        | st.frozensets(st.integers(0, 9), max_size=3)
    ),
    max_leaves=30,
)
_sessions = st.lists(st.lists(st.integers(1, 60), min_size=1, max_size=6), max_size=8)


def _srgnn_test(sessions: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """SR-GNN's longest-first prefix expansion of test sessions."""
    prefixes, labels = [], []
    for s in sessions:
        for end in range(len(s) - 1, 0, -1):
            prefixes.append(s[:end])
            labels.append(s[end])
    return prefixes, labels


_globals = st.sampled_from(
    [
        collections.OrderedDict(a=1),
        range(3),
        complex(1, 2),
        fractions.Fraction(1, 3),
        _Exploit(),
        np.int64(3),
        collections.Counter("ab"),
    ]
)
_structures = st.one_of(
    st.tuples(_sessions, _sessions.map(_srgnn_test)),  # valid
    st.tuples(_sessions, st.tuples(_plain, _plain)),
    st.tuples(_plain, _sessions.map(_srgnn_test)),
    st.tuples(st.tuples(_sessions, _plain).map(lambda t: [*t[0], t[1]]), _sessions.map(_srgnn_test)),
    st.tuples(
        st.just([[1, 2]]),
        st.tuples(st.lists(st.just([1])), st.lists(st.integers() | st.sampled_from([2**31, 10**12]))),
    ),
    st.tuples(_sessions, _globals.map(lambda g: ([[1]], [g]))),
    st.tuples(_globals.map(lambda g: [[1, 2], g]), _sessions.map(_srgnn_test)),
)


@st.composite
def srgnn_directories(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(all_train_seq bytes, test bytes): pickles of valid, odd or global-naming data, maybe gzipped or mutated."""
    train, test = draw(_structures)
    out = []
    for value in (train, test):
        blob = pickle.dumps(value, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))
        how = draw(st.sampled_from(["plain", "gzip", "edit", "random"]))
        if how == "gzip":
            blob = gzip.compress(blob)
        elif how == "edit":
            blob = mutate_bytes(blob, draw(EDITS))
        elif how == "random":
            blob = draw(st.binary(max_size=100))
        out.append(blob)
    return out[0], out[1]


def check_srgnn(directory: Path, case: tuple[bytes, bytes]) -> str:
    """load_srgnn_split: the published examples or a documented SchemaError; never runs pickled code."""
    marker = Path("/tmp/rib-edge-fuzz-pwned")
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    srgnn = directory / "srgnn"
    srgnn.mkdir(exist_ok=True)
    (srgnn / "all_train_seq.txt").write_bytes(case[0])
    (srgnn / "test.txt").write_bytes(case[1])
    split, error = run_bounded(lambda: load_srgnn_split(srgnn), LOADER_BOUND_BYTES, (SchemaError,))
    assert not marker.exists(), "a pickle ran code"
    if error is not None:
        assert_clear_error(error, SRGNN_REASONS)
        return error.reason  # type: ignore[attr-defined]
    test = pickle.Unpickler(
        io.BytesIO(gzip.decompress(case[1]) if case[1][:2] == b"\x1f\x8b" else case[1])
    ).load()
    assert len(split.test.examples()) == len(test[1])
    return "loaded"


SURFACES = (
    FuzzSurface(
        "loader_interactions_file",
        "load_interactions_file on random tables, mangled CSV/gzip and random "
        "bytes as .csv/.csv.gz/.parquet/.txt",
        FILES,
        workdir,
        check_interactions_file,
    ),
    FuzzSurface(
        "loader_jsonl",
        "read_otto_jsonl + finish_frame on random OTTO-style JSON lines and bytes, maybe gzipped",
        JSONL,
        workdir,
        check_jsonl,
    ),
    FuzzSurface(
        "loader_srgnn_pickle",
        "load_srgnn_split (restricted unpickler) on valid, odd, mutated, random and global-naming pickles",
        srgnn_directories(),
        workdir,
        check_srgnn,
    ),
)


scratch = context_fixture(workdir, "fuzz-loaders")


@fuzz_settings()
@given(case=FILES)
def test_fuzz_interactions_file(scratch, case):
    check_interactions_file(scratch, case)


@fuzz_settings()
@given(case=JSONL)
def test_fuzz_jsonl(scratch, case):
    check_jsonl(scratch, case)


@fuzz_settings()
@given(case=srgnn_directories())
def test_fuzz_srgnn_pickles(scratch, case):
    check_srgnn(scratch, case)
