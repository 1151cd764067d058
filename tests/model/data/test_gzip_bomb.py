"""Gzip bombs: every loader path stops a tiny .gz that expands to 200 MiB, in bounded memory, with a clear error.

The bounds (``model.data.compressed``): at most ``RIB_EDGE_MAX_DECOMPRESSED_BYTES`` (2 GiB) out, and past
16 MiB at most ``RIB_EDGE_MAX_DECOMPRESSION_RATIO`` (200) bytes out per compressed byte. Genuine files,
multi-member ones included, load as before, and raising a limit lets a larger genuine file through.
"""

from __future__ import annotations

import bz2
import gzip
import json
import pickle
import resource
import zlib
from pathlib import Path

import pytest

from edge_client.schema import SchemaError, SkipReport
from model.data.compressed import (
    DEFAULT_MAX_RATIO,
    MAX_BYTES_ENV,
    MAX_RATIO_ENV,
    RATIO_FREE_BYTES,
    decompress_gzip,
)
from model.data.loaders import DATASETS, load_interactions_file, read_otto_jsonl
from model.data.srgnn import load_srgnn_split, restricted_load
from tests.fuzzing import run_bounded
from tests.model.data.test_loaders import log_rows, write_csv

BOMB_BYTES = 200 << 20  # zeros; deflate packs them ~1,000:1 into ~200 KB
# Refused after ~40 MB (200 x ~200 KB); the in-memory readers hold that much, the streaming ones a chunk.
MEMORY_BOUND = 64 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """One gzip member of BOMB_BYTES zeros (built in ~0.6 s)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip header and trailer
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(BOMB_BYTES >> 20)) + packer.flush()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux


def _srgnn(tmp_path: Path, bomb: bytes):
    directory = tmp_path / "srgnn"
    directory.mkdir()
    (directory / "all_train_seq.txt.gz").write_bytes(bomb)
    (directory / "test.txt.gz").write_bytes(gzip.compress(pickle.dumps(([[1]], [2]))))
    return lambda: load_srgnn_split(directory)


def _generic(suffix: str):
    def build(tmp_path: Path, bomb: bytes):
        path = tmp_path / f"log{suffix}"
        # A genuine header member, then the bomb member: the separator is sniffed and pandas streams the rest.
        path.write_bytes(gzip.compress(b"session_id\ttimestamp\titem_id\taction\n") + bomb)
        return lambda: load_interactions_file(path)

    return build


def _registered(tmp_path: Path, bomb: bytes):
    source = DATASETS["taobao_userbehavior_sample"]  # read_text_table, as every registered CSV dataset
    folder = tmp_path / source.directory
    folder.mkdir()
    (folder / source.file_names[0]).write_bytes(bomb)
    return lambda: source.load(tmp_path)


def _jsonl(tmp_path: Path, bomb: bytes):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(bomb)
    return lambda: read_otto_jsonl(path, SkipReport())


@pytest.mark.parametrize(
    "build",
    [_srgnn, _generic(".csv.gz"), _generic(".tsv.gz"), _registered, _jsonl],
    ids=["srgnn_pickle", "generic_csv", "generic_tsv", "registered_csv", "otto_jsonl"],
)
def test_gzip_bomb_is_refused_in_bounded_memory(tmp_path, bomb, build):
    load = build(tmp_path, bomb)
    rss_before = _max_rss_bytes()
    _, error = run_bounded(load, MEMORY_BOUND, (SchemaError,))
    assert isinstance(error, SchemaError) and error.reason == "too_large", error
    assert _max_rss_bytes() - rss_before < BOMB_BYTES // 2  # never the whole bomb (peak RSS only grows)
    message = str(error)
    assert "decompresses past" in message and f"more than {DEFAULT_MAX_RATIO:g} times" in message
    assert MAX_RATIO_ENV in message  # names the knob that lets a genuine file through


def _csv_bytes(n_sessions: int) -> bytes:
    rows = log_rows(n_sessions)
    return (
        "\n".join([",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]) + "\n"
    ).encode()


def _members(data: bytes, n: int) -> bytes:
    """``data`` as ``n`` concatenated gzip members (what ``cat a.gz b.gz`` gives)."""
    step = -(-len(data) // n)
    return b"".join(gzip.compress(data[k : k + step]) for k in range(0, len(data), step))


def test_multi_member_gzip_still_loads(tmp_path):
    data = _csv_bytes(80)
    (tmp_path / "one.csv.gz").write_bytes(gzip.compress(data))
    (tmp_path / "many.csv.gz").write_bytes(_members(data, 5))
    one, many = (
        load_interactions_file(tmp_path / "one.csv.gz"),
        load_interactions_file(tmp_path / "many.csv.gz"),
    )
    assert len(many.frame) == len(one.frame) == 320
    assert many.frame.equals(one.frame)

    events = [{"aid": k, "ts": 1_659_304_800_000 + k, "type": "clicks"} for k in range(3)]
    lines = b"\n".join(json.dumps({"session": s, "events": events}).encode() for s in range(10)) + b"\n"
    (tmp_path / "train.jsonl.gz").write_bytes(_members(lines, 4))
    assert len(read_otto_jsonl(tmp_path / "train.jsonl.gz", SkipReport())) == 30

    value = ([[1, 2, 3], [2, 3]], ([[1], [2]], [2, 3]))
    (tmp_path / "test.txt.gz").write_bytes(_members(pickle.dumps(value), 3))
    assert restricted_load(tmp_path / "test.txt.gz") == value


def test_raising_the_size_limit_lets_a_larger_file_through(tmp_path, monkeypatch):
    data = _csv_bytes(80)  # ~10 KB of CSV
    path = tmp_path / "log.csv.gz"
    path.write_bytes(_members(data, 2))
    monkeypatch.setenv(MAX_BYTES_ENV, "4096")
    with pytest.raises(SchemaError, match="too_large") as err:
        load_interactions_file(path)
    assert MAX_BYTES_ENV in str(err.value) and "4,096" in str(err.value)
    monkeypatch.setenv(MAX_BYTES_ENV, str(len(data)))
    assert len(load_interactions_file(path).frame) == 320


def test_raising_the_ratio_lets_a_compressible_file_through(tmp_path, monkeypatch):
    value = [[1, 2], [bytes(RATIO_FREE_BYTES + (1 << 20))]]  # genuine but ~1,000:1 compressible, past 16 MiB
    path = tmp_path / "all_train_seq.txt.gz"
    path.write_bytes(gzip.compress(pickle.dumps(value, protocol=4), 1))
    with pytest.raises(SchemaError, match="too_large") as err:
        restricted_load(path)
    assert MAX_RATIO_ENV in str(err.value)
    monkeypatch.setenv(MAX_RATIO_ENV, "5000")
    assert restricted_load(path) == value
    assert decompress_gzip(path.read_bytes(), "x", max_ratio=5000) == pickle.dumps(value, protocol=4)


def test_small_files_are_never_refused_by_ratio():
    blob = gzip.compress(bytes(RATIO_FREE_BYTES))  # 16 MiB of zeros in ~16 KB: 1,000:1 but under the floor
    assert len(decompress_gzip(blob, "x")) == RATIO_FREE_BYTES
    with pytest.raises(SchemaError, match="too_large"):
        decompress_gzip(blob, "x", max_bytes=RATIO_FREE_BYTES - 1)


def test_other_compressions_are_bounded_or_refused(tmp_path, monkeypatch):
    data = _csv_bytes(80)
    (tmp_path / "log.csv.bz2").write_bytes(bz2.compress(data))
    assert len(load_interactions_file(tmp_path / "log.csv.bz2").frame) == 320
    monkeypatch.setenv(MAX_BYTES_ENV, "4096")
    with pytest.raises(SchemaError, match="too_large"):
        load_interactions_file(tmp_path / "log.csv.bz2")
    (tmp_path / "log.csv.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(SchemaError, match="bad_file") as err:
        load_interactions_file(tmp_path / "log.csv.zip")
    assert "decompress it" in str(err.value)


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_a_bad_limit_setting_is_a_clear_error(tmp_path, monkeypatch, value):
    path = write_csv(tmp_path / "log.csv", log_rows(2))
    path.with_suffix(".csv.gz").write_bytes(gzip.compress(path.read_bytes()))
    monkeypatch.setenv(MAX_BYTES_ENV, value)
    with pytest.raises(SchemaError, match="bad_argument") as err:
        load_interactions_file(path.with_suffix(".csv.gz"))
    assert MAX_BYTES_ENV in str(err.value)
