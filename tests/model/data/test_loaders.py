"""Loaders: users' own logs (good and broken), the cache, and every shared dataset under the protocol."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edge_client.schema import SchemaError, SkipReport
from model.data.cache import cache_dir
from model.data.loaders import (
    DATASETS,
    SKIP_REASONS,
    available_datasets,
    finish_frame,
    load_dataset,
    load_interactions_file,
    parse_timestamps,
    read_otto_jsonl,
)
from model.data.protocol import ProtocolConfig

BASE_S = 1_700_000_000  # 2023-11-14, a plausible log time
ITEMS = [f"item{i}" for i in range(12)]


def log_rows(n_sessions: int = 80) -> list[dict]:
    """A clean log: hour-apart sessions of four one-minute-apart events over a small catalogue."""
    rows = []
    for s in range(n_sessions):
        for j in range(4):
            rows.append(
                {
                    "session_id": f"s{s}",
                    "timestamp": BASE_S + s * 3600 + j * 60,
                    "item_id": ITEMS[(s + 3 * j) % len(ITEMS)],
                    "action": "add_to_cart" if j == 3 and s % 4 == 0 else "view",
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict], timestamp=lambda t: str(t), sep: str = ",") -> Path:
    header = list(rows[0])
    lines = [sep.join(header)]
    for row in rows:
        lines.append(sep.join(timestamp(v) if k == "timestamp" else str(v) for k, v in row.items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the generic format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "encode"),
    [
        ("s", str),
        ("ms", lambda t: str(t * 1000 + 250)),
        ("iso", lambda t: pd.Timestamp(t, unit="s").strftime("%Y-%m-%dT%H:%M:%S")),
        ("iso", lambda t: pd.Timestamp(t, unit="s", tz="UTC").tz_convert("Asia/Tokyo").isoformat()),
    ],
)
def test_timestamp_units_are_detected(tmp_path, unit, encode):
    loaded = load_interactions_file(write_csv(tmp_path / "log.csv", log_rows(), encode))
    expected = np.array([r["timestamp"] for r in log_rows()], dtype=np.int64) * 1000
    got = loaded.frame["timestamp_ms"].to_numpy()
    assert got.dtype == np.int64
    assert np.array_equal(got - got % 1000, expected)
    assert f"timestamps read as {unit}" in loaded.notes


def test_parse_timestamps_magnitude_rule():
    ms, unit = parse_timestamps(pd.Series([1.7e9, 1.7e9 + 1]))
    assert unit == "s" and ms[0] == 1.7e12
    ms, unit = parse_timestamps(pd.Series([1.7e12, 1.7e12 + 1]))
    assert unit == "ms" and ms[0] == 1.7e12
    ms, unit = parse_timestamps(pd.Series(["2024-01-01T00:00:00Z", "garbage", ""]))
    assert unit == "iso" and ms[0] == 1_704_067_200_000 and np.isnan(ms[1:]).all()


def test_generic_csv_end_to_end(tmp_path):
    split = load_dataset(str(write_csv(tmp_path / "log.csv", log_rows())))
    assert split.info["source"] == "log.csv"
    assert split.vocab.activities.names == ("view", "add_to_cart")
    assert split.vocab.activities.conversions == frozenset({"add_to_cart"})
    assert split.train.n_sessions > 0 and split.test.n_sessions > 0
    assert split.train.timestamps_ms.max() < split.info["split_time_ms"]
    assert split.info["skips"]["read"] == 320 and split.info["skips"]["kept"] == 320
    assert split.train.has_dwell and split.train.has_time and split.train.has_activity


def test_broken_lines_are_counted_not_fatal(tmp_path):
    path = write_csv(tmp_path / "log.csv", log_rows())
    with open(path, "ab") as handle:
        handle.write(b"s900,1700000000,caf\xe9,view\n")  # Latin-1 byte: not UTF-8
        handle.write(b"s901,1700000000,item1,view,extra,fields\n")  # wrong field count
        handle.write(b"s902,1700000000\n")  # truncated line
        handle.write(b"s903,yesterday,item1,view\n")  # unparsable timestamp
        handle.write(b"s904,-5,item1,view\n")  # negative timestamp
        handle.write(b"s905,nan,item1,view\n")  # NaN timestamp
        handle.write(b"s906,1700000000,,view\n")  # empty item
        handle.write(b"s907,1700000000," + b"x" * 200 + b",view\n")  # absurd id
    loaded = load_interactions_file(path)
    assert loaded.skips.skipped == Counter(
        {"not_utf8": 1, "malformed_line": 1, "missing_field": 2, "bad_timestamp": 3, "bad_id": 1}
    )
    assert loaded.skips.read == 320 + 8
    assert loaded.skips.kept == 320 == len(loaded.frame)
    assert set(loaded.skips.skipped) <= set(SKIP_REASONS)
    split = load_dataset(str(path))
    assert split.info["skips"]["skipped"] == dict(loaded.skips.skipped)


def test_gzip_csv_with_an_unterminated_quote(tmp_path):
    text = write_csv(tmp_path / "plain.csv", log_rows()).read_bytes() + b's999,1700000000,"item1,view\n'
    (tmp_path / "log.csv.gz").write_bytes(gzip.compress(text))
    loaded = load_interactions_file(tmp_path / "log.csv.gz")
    assert len(loaded.frame) == 321  # quotes read as plain text: the row survives with item '"item1'


def test_jsonl_reader_counts_bad_lines_and_events(tmp_path):
    good = {
        "session": 1,
        "events": [{"aid": 5, "ts": 1_659_304_800_000 + k, "type": "clicks"} for k in range(3)],
    }
    lines = [
        json.dumps(good).encode(),
        b'{"session": 2, "events": [',  # cut mid-line
        b'{"session": 3, "events": "none"}',
        b'{"session": 4, "events": [{"aid": null, "ts": 1, "type": "clicks"}, 7, {"aid": 1, "ts": "x", "type": "carts"}]}',
        b'{"session": 5, "events": [{"aid": "caf\xe9"}]}',  # not UTF-8
    ]
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    report = SkipReport()
    frame = read_otto_jsonl(path, report)
    assert len(frame) == 5  # 3 good events + the null-aid and bad-ts events, judged by finish_frame
    assert report.skipped == Counter({"malformed_line": 2, "missing_field": 1, "not_utf8": 1})
    frame, _ = finish_frame(frame, report, "otto")
    assert len(frame) == 3
    assert report.skipped == Counter(
        {"malformed_line": 2, "missing_field": 2, "not_utf8": 1, "bad_timestamp": 1}
    )


@pytest.mark.parametrize(
    ("content", "reason", "message"),
    [
        (b"", "empty", "empty"),
        (b"session_id,timestamp,item_id,action\n", "empty", "no data rows"),
        (b"session_id,timestamp,item_id\ns1,1700000000,item1\n", "missing_field", "'action'"),
        (b"timestamp,item_id,action\n1700000000,item1,view\n", "missing_field", "session_id or a user_id"),
        (b"session_id,timestamp,item_id,action\ns1,soon,item1,view\n", "empty", "no usable rows"),
    ],
)
def test_unusable_files_raise_clear_errors(tmp_path, content, reason, message):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    with pytest.raises(SchemaError, match=reason) as err:
        load_dataset(str(path))
    assert message in str(err.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(SchemaError, match="unknown_dataset") as err:
        load_dataset("no_such_dataset", data_dir=tmp_path)
    assert "jdata2016_sample" in str(err.value) and "srgnn_diginetica" in str(err.value)
    with pytest.raises(SchemaError, match="RIB_EDGE_DATA"):
        load_dataset("jdata2016_sample", data_dir=tmp_path / "absent")
    with pytest.raises(SchemaError, match="missing_data"):
        load_dataset("jdata2016_sample", data_dir=tmp_path)


def test_dwell_column_and_out_of_order_rows(tmp_path):
    rows = log_rows()
    for k, row in enumerate(rows):
        row["dwell_seconds"] = "" if k % 7 == 0 else str(5 + k % 50)
    rows[1]["dwell_seconds"] = "-3"
    rows[2]["dwell_seconds"] = "abc"
    rows[5]["timestamp"], rows[6]["timestamp"] = rows[6]["timestamp"], rows[5]["timestamp"]
    path = write_csv(tmp_path / "log.csv", rows)
    loaded = load_interactions_file(path)
    assert loaded.skips.skipped == Counter({"bad_dwell": 2})
    assert loaded.out_of_order_rows == 1
    assert loaded.frame["dwell_seconds"].isna().sum() == sum(1 for k in range(320) if k % 7 == 0)
    split = load_dataset(str(path))
    assert split.info["out_of_order_rows"] == 1
    assert split.train.has_dwell


def test_separators_are_sniffed(tmp_path):
    for sep, name in (("\t", "log.tsv"), (";", "log.txt")):
        loaded = load_interactions_file(write_csv(tmp_path / name, log_rows(), sep=sep))
        assert len(loaded.frame) == 320


def test_parquet_with_users_only_is_sessionized(tmp_path):
    rows = log_rows()
    frame = pd.DataFrame(
        {
            "user_id": [int(r["session_id"][1:]) % 10 for r in rows],  # 8 hour-apart sessions per user
            "timestamp": [r["timestamp"] * 1000 for r in rows],  # epoch ms
            "item_id": [int(r["item_id"][4:]) for r in rows],
            "action": [r["action"] for r in rows],
        }
    )
    path = tmp_path / "log.parquet"
    frame.to_parquet(path)
    split = load_dataset(str(path))
    assert split.info["raw"]["sessions"] == 80  # cut at the 30-minute gap
    assert set(split.vocab.item_ids) <= {str(i) for i in range(12)}
    assert split.train.user_ids is not None


def test_damaged_parquet_is_a_schema_error(tmp_path):
    path = tmp_path / "log.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(SchemaError, match="bad_file"):
        load_dataset(str(path))


def test_mapping_file_maps_drops_and_refuses_unknown_actions(tmp_path):
    rows = log_rows()
    rows[0]["action"] = "remove_from_cart"
    path = write_csv(tmp_path / "log.csv", rows)
    toml = tmp_path / "mapping.toml"
    toml.write_text(
        'drop = ["remove_from_cart"]\nconversions = ["Cart"]\n[actions]\nview = "View"\nadd_to_cart = "Cart"\n'
    )
    split = load_dataset(str(path), mapping=toml)
    assert split.vocab.activities.names == ("View", "Cart")
    assert split.info["skips"]["skipped"] == {"dropped_action": 1}
    assert split.info["mapping"]["drop"] == ["remove_from_cart"]
    toml.write_text('[actions]\nview = "View"\n')
    with pytest.raises(SchemaError, match="unmapped_action") as err:
        load_dataset(str(path), mapping=toml)
    assert "add_to_cart" in str(err.value) and "remove_from_cart" in str(err.value)


# ---- the cache -------------------------------------------------------------------------------------------


def test_second_load_is_a_cache_hit_with_equal_arrays(tmp_path):
    path = write_csv(tmp_path / "log.csv", log_rows())
    first = load_dataset(str(path), refresh=True)  # the cache is shared by the session's tests
    second = load_dataset(str(path))
    assert not first.info["cache"]["hit"] and second.info["cache"]["hit"]
    cached = Path(second.info["cache"]["path"])
    assert cached.exists() and cached.parent == cache_dir()
    for part in ("train", "test"):
        for name, array in getattr(first, part).arrays().items():
            assert np.array_equal(
                array, getattr(second, part).arrays()[name], equal_nan=array.dtype.kind == "f"
            ), name
    assert np.array_equal(first.vocab.item_ids, second.vocab.item_ids)
    assert second.info["skips"] == first.info["skips"]
    assert not load_dataset(str(path), refresh=True).info["cache"]["hit"]


def test_cache_key_follows_bytes_config_and_mapping(tmp_path):
    path = write_csv(tmp_path / "log.csv", log_rows())
    base = load_dataset(str(path)).info["cache"]["key"]
    other_config = load_dataset(str(path), config=ProtocolConfig(test_fraction=0.2)).info["cache"]
    assert other_config["key"] != base and not other_config["hit"]
    toml = tmp_path / "m.toml"
    toml.write_text('[actions]\nview = "View"\nadd_to_cart = "Cart"\n')
    assert load_dataset(str(path), mapping=toml).info["cache"]["key"] != base
    write_csv(path, log_rows(79))
    assert load_dataset(str(path)).info["cache"]["key"] != base


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    path = write_csv(tmp_path / "log.csv", log_rows())
    first = load_dataset(str(path))
    cached = Path(first.info["cache"]["path"])
    cached.write_bytes(b"not an npz at all")
    again = load_dataset(str(path))
    assert not again.info["cache"]["hit"]
    assert np.array_equal(again.train.items, first.train.items)
    assert load_dataset(str(path)).info["cache"]["hit"]


# ---- the shared datasets -------------------------------------------------------------------------------

# Exact figures from shared/data/README.md: rows read, distinct items before the protocol, action counts.
README_COUNTS = {
    "jdata2018_mkmsr_demo": (27_183 + 3_177, None, None),
    "jdata2016_sample": (
        3 * 29_999,
        None,
        {"browse": 12_023 + 11_403 + 10_800, "remove_cart": 175 + 210 + 205},
    ),
    "diginetica_sample": (12_391, 7_139, {"view": 12_391}),
    "yoochoose_100k": (70_278 + 13_568, 2_933, {"click": 83_846}),
    "taobao_userbehavior_timeslice": (
        110_300,
        84_793,
        {"pv": 98_361, "cart": 6_063, "fav": 3_383, "buy": 2_493},
    ),
    "taobao_userbehavior_sample": (4_321, 3_276, {"pv": 3_926, "cart": 190, "fav": 128, "buy": 77}),
    "otto_sample": (862, 510, {"clicks": 800, "carts": 52, "orders": 10}),
}


def test_every_registered_dataset_has_readme_counts():
    assert set(README_COUNTS) == set(DATASETS)
    assert set(available_datasets()) >= set(DATASETS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_raw_counts_match_the_readme(shared_data, name):
    rows, items, actions = README_COUNTS[name]
    loaded = DATASETS[name].load(shared_data)
    assert loaded.skips.read == rows
    assert loaded.skips.n_skipped == 0
    if items is not None:
        assert loaded.frame["item_id"].nunique() == items
    if actions is not None:
        counts = loaded.frame["action"].value_counts()
        assert {a: int(counts.get(a, 0)) for a in actions} == actions
    assert loaded.frame["timestamp_ms"].dtype == np.int64


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_protocol_invariants_on_shared_data(shared_data, name):
    split = load_dataset(name, data_dir=shared_data)
    train, test = split.train, split.test
    config = DATASETS[name].config
    assert split.info["source"] == name and split.info["notes"]
    assert train.n_sessions > 0 and test.n_sessions > 0 and len(test.examples()) > 0
    # Nothing at or after the split time is in training; every test session was active at/after it.
    assert train.timestamps_ms.max() < split.info["split_time_ms"]
    assert not set(test.session_ids) & set(train.session_ids)
    assert set(np.unique(test.items)) <= set(np.unique(train.items))
    assert (train.visits_per_session() >= config.min_session_visits).all()
    assert (test.visits_per_session() >= config.min_session_visits).all()
    assert train.n_items == len(np.unique(train.items))
    assert split.info["skips"]["kept"] == split.info["raw"]["rows"]
    assert list(split.vocab.activities.names) == split.info["mapping"]["activities"]


def test_custom_mapping_on_a_registered_dataset(shared_data, tmp_path):
    toml = tmp_path / "taobao.toml"
    toml.write_text(
        'drop = ["fav"]\nconversions = ["Cart", "Order"]\n[actions]\npv = "View"\ncart = "Cart"\nbuy = "Order"\n'
    )
    split = load_dataset("taobao_userbehavior_sample", data_dir=shared_data, mapping=toml)
    assert split.vocab.activities.names == ("View", "Cart", "Order")
    assert split.info["skips"]["skipped"] == {"dropped_action": 128}


def _test_session_ends(split) -> np.ndarray:
    return np.maximum.reduceat(split.test.timestamps_ms, split.test.offsets[:-1])


@pytest.mark.parametrize(
    "name", ["jdata2016_sample", "yoochoose_100k", "diginetica_sample", "taobao_userbehavior_timeslice"]
)
def test_no_training_tuple_at_or_after_the_split(shared_data, name):
    # Test sessions are chosen by their raw end time; filtering may remove their late visits, so the
    # guarantee is about training: nothing in it happens at or after the split.
    split = load_dataset(name, data_dir=shared_data)
    assert split.train.timestamps_ms.max() < split.info["split_time_ms"] <= _test_session_ends(split).max()
    assert not set(split.train.session_ids) & set(split.test.session_ids)


def test_dataset_config_can_be_overridden(shared_data):
    config = dataclasses.replace(DATASETS["taobao_userbehavior_sample"].config, test_seconds=3 * 86400.0)
    split = load_dataset("taobao_userbehavior_sample", data_dir=shared_data, config=config)
    assert split.info["protocol"]["test_seconds"] == 3 * 86400.0
