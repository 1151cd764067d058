"""model.analysis: conversion rates (RIB Eq. 1), distributions, missing fields, files written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edge_client.schema import RIB_ACTIVITY_VOCAB, ActivityVocabulary
from model.analysis import dataset_stats, format_stats, plot_stats, write_stats
from model.data.protocol import ProtocolConfig, build_split, describe, to_visit_tuples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_PLOTS = {
    "activity_distribution.png",
    "dwell_distribution.png",
    "conversion_by_activity.png",
    "conversion_by_dwell.png",
    "dwell_by_activity.png",
}


def _rows(session: str, events: list[tuple[float, str, str]]) -> list[dict]:
    return [
        {"session_id": session, "timestamp_ms": int(t * 1000), "item_id": item, "activity": act}
        for t, item, act in events
    ]


@pytest.fixture(scope="module")
def tiny_split():
    """Four hand-built sessions whose conversions and dwell buckets are known exactly (see comments)."""
    rows = (
        # s1: A(Home, comments) 30 s -> B(Search, Cart) 70 s -> A(Home, Order) last. Every tuple converts:
        # A's tuples precede the Order, B's the Cart. Ordering: A's yes, B's no (B is only carted).
        _rows(
            "s1",
            [
                (0, "A", "Home2Product"),
                (5, "A", "Detail_comments"),
                (30, "B", "SearchList2Product"),
                (35, "B", "Cart"),
                (100, "A", "Home2Product"),
                (110, "A", "Order"),
            ],
        )
        # s2: C 5 s -> A 15 s -> C last; nothing converts.
        + _rows(
            "s2",
            [(1000, "C", "SearchList2Product"), (1005, "A", "Home2Product"), (1020, "C", "Home2Product")],
        )
        # s3 (test): A 200 s -> B(Search, Order) last; B's two tuples convert and order.
        + _rows("s3", [(5000, "A", "Home2Product"), (5200, "B", "SearchList2Product"), (5210, "B", "Order")])
        # s4: D(Cart, then Home) 12 s -> E last. The Home after the Cart does not convert: "at or after" only.
        + _rows("s4", [(2000, "D", "Cart"), (2001, "D", "Home2Product"), (2012, "E", "Home2Product")])
    )
    config = ProtocolConfig(min_item_support=1, fit_dwell_edges=False)  # paper edges 10/25/61/121 s
    return build_split(pd.DataFrame(rows), "tiny", RIB_ACTIVITY_VOCAB, config, test_sessions={"s3"})


def _fractions(table: dict, key_num: str = "converted", key_den: str = "tuples") -> dict:
    return {name: (row[key_num], row[key_den]) for name, row in table.items() if row[key_den]}


def test_exact_conversion_by_activity(tiny_split):
    stats = dataset_stats(tiny_split)
    assert stats["conversion"]["targets"] == ["Cart", "Order"]
    assert _fractions(stats["conversion"]["by_activity"]) == {
        "Home2Product": (2, 7),
        "SearchList2Product": (2, 3),
        "Detail_comments": (1, 1),
        "Cart": (2, 2),
        "Order": (2, 2),
    }
    assert stats["conversion"]["by_activity"]["Home2Product"]["rate"] == pytest.approx(2 / 7)
    assert stats["conversion"]["by_activity"]["Sale2Product"] == {"tuples": 0, "converted": 0, "rate": None}
    assert stats["conversion"]["overall"] == {"tuples": 15, "converted": 9, "rate": pytest.approx(9 / 15)}
    assert stats["ordering"]["targets"] == ["Order"]
    assert _fractions(stats["ordering"]["by_activity"]) == {
        "Home2Product": (2, 7),
        "SearchList2Product": (1, 3),
        "Detail_comments": (1, 1),
        "Cart": (0, 2),
        "Order": (2, 2),
    }


def test_exact_conversion_and_distribution_by_dwell(tiny_split):
    stats = dataset_stats(tiny_split)
    labels = ["0-10s", "10-25s", "25-61s", "61-121s", ">=121s", "unknown"]
    assert stats["dwell"]["labels"] == labels
    by_dwell = stats["conversion"]["by_dwell"]
    assert [(by_dwell[b]["converted"], by_dwell[b]["tuples"]) for b in labels] == [
        (0, 1),
        (1, 3),
        (2, 2),
        (2, 2),
        (0, 1),
        (4, 6),
    ]
    # Visits judged from their first tuple: the 10-25s bucket holds s2's A (no) and s4's D (Cart first, yes).
    assert [(by_dwell[b]["visits_converted"], by_dwell[b]["visits"]) for b in labels] == [
        (0, 1),
        (1, 2),
        (1, 1),
        (1, 1),
        (0, 1),
        (2, 4),
    ]
    assert [b["tuples"] for b in stats["dwell"]["buckets"]] == [1, 3, 2, 2, 1, 6]
    assert stats["dwell"]["share_unknown"] == pytest.approx(6 / 15)
    # Known visit dwells: 5, 12, 15, 30, 70, 200 s.
    expected = np.quantile([5, 12, 15, 30, 70, 200], [0.1, 0.5, 0.9])
    assert [stats["dwell"]["seconds_quantiles"][k] for k in ("p10", "p50", "p90")] == pytest.approx(expected)
    cross = stats["dwell_by_activity"]["rows"]
    # Home2Product's known dwells: s1 A (25-61s), s2 A (10-25s), s3 A (>=121s), s4 D (10-25s); 3 unknown.
    assert cross["Home2Product"]["counts"] == [0, 2, 1, 0, 1]
    assert cross["Home2Product"]["shares"] == pytest.approx([0, 0.5, 0.25, 0, 0.25])
    assert cross["Home2Product"]["unknown_share"] == pytest.approx(3 / 7)
    assert cross["Sale2Product"]["shares"] is None


def test_activity_distribution_and_counts_match_describe(tiny_split):
    stats = dataset_stats(tiny_split)
    act = stats["activity"]["by_activity"]
    assert act["Home2Product"] == {"count": 7, "share": pytest.approx(7 / 15), "train": 6, "test": 1}
    assert sum(row["count"] for row in act.values()) == stats["activity"]["total"] == 15
    for part in ("train", "test"):
        reference = describe(getattr(tiny_split, part))
        counts = stats["counts"][part]
        assert counts == {
            "sessions": reference["sessions"],
            "visits": reference["visits"],
            "tuples": reference["tuples"],
            "items": reference["items_present"],
            "examples": reference["examples"],
        }
        assert reference == tiny_split.info[part]


def _planted_frame(
    n_sessions: int, rates: dict[str, float], seed: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Sessions: entry visit (activity from ``rates``) -> Cart on that item with its rate -> a ShopList visit."""
    rng = np.random.default_rng(seed)
    entries = list(rates)
    rows, carted = [], dict.fromkeys(entries, 0)
    for s in range(n_sessions):
        t0 = s * 10_000.0  # sessions far apart in time
        x, y = rng.choice(40, size=2, replace=False)
        entry = entries[rng.integers(len(entries))]
        events = [(t0, f"i{x}", entry)]
        if rng.random() < rates[entry]:
            events.append((t0 + 3, f"i{x}", "Cart"))
            carted[entry] += 1
        events.append((t0 + 20 + rng.integers(200), f"i{y}", "ShopList2Product"))
        rows += _rows(f"s{s}", events)
    return pd.DataFrame(rows), carted


def test_planted_conversion_rates():
    rates = {"SearchList2Product": 0.8, "Home2Product": 0.1}
    frame, carted = _planted_frame(2000, rates, seed=7)
    split = build_split(frame, "planted", RIB_ACTIVITY_VOCAB)
    stats = dataset_stats(split)
    assert split.info["raw"]["tuples"] == split.train.n_tuples + split.test.n_tuples  # nothing filtered
    table = stats["conversion"]["by_activity"]
    for entry, planted in rates.items():
        row = table[entry]
        # Exactly what was drawn...
        assert row["converted"] == carted[entry]
        # ...and the drawn rate agrees with the planted probability within 4 binomial standard errors.
        assert abs(row["rate"] - planted) < 4 * math.sqrt(planted * (1 - planted) / row["tuples"])
    assert table["ShopList2Product"]["converted"] == 0
    assert table["Cart"]["rate"] == 1.0
    assert stats["ordering"]["overall"]["converted"] == 0  # no Order was planted


def test_missing_activity_and_dwell_reported_not_faked(tmp_path):
    rows = []
    for s in range(30):
        rows += [
            {"session_id": f"s{s}", "timestamp_ms": 0, "item_id": f"i{(s + k) % 6}", "activity": "view"}
            for k in range(3)
        ]
    vocab = ActivityVocabulary(("view",), frozenset())
    split = build_split(
        pd.DataFrame(rows), "bare", vocab, ProtocolConfig(min_item_support=1), test_sessions={"s0", "s1"}
    )
    assert not split.train.has_activity and not split.train.has_dwell
    stats = write_stats(split, tmp_path, "bare")
    for field in ("activity", "conversion", "ordering", "dwell", "dwell_by_activity"):
        assert stats[field] is None
        assert stats["notes"][field]
    assert stats["counts"]["train"]["tuples"] == split.train.n_tuples
    assert stats["plots"] == [] and not list(tmp_path.glob("*.png"))
    assert "note [activity]" in format_stats(stats)


def test_missing_activity_keeps_dwell(tmp_path):
    rows = []
    for s in range(30):
        rows += [
            {
                "session_id": f"s{s}",
                "timestamp_ms": s * 10**6 + k * 7000 * (s % 5 + 1),
                "item_id": f"i{(s + k) % 6}",
                "activity": "view",
            }
            for k in range(3)
        ]
    split = build_split(
        pd.DataFrame(rows),
        "views",
        ActivityVocabulary(("view",), frozenset()),
        ProtocolConfig(min_item_support=1),
    )
    stats = dataset_stats(split)
    assert stats["activity"] is None and stats["conversion"] is None and stats["dwell"] is not None
    assert {p.name for p in plot_stats(stats, tmp_path, "views")} == {"dwell_distribution.png"}


def test_write_stats_files_and_json(tiny_split, tmp_path):
    out = tmp_path / "out"
    stats = write_stats(tiny_split, out, "tiny dataset")
    assert stats["name"] == "tiny dataset"
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats, allow_nan=False))
    assert set(stats["plots"]) == EXPECTED_PLOTS
    for name in EXPECTED_PLOTS:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    text = format_stats(stats)
    assert "SearchList2Product" in text and "66.7%" in text and "2/3" in text


def test_taobao_timeslice_sane(shared_data: Path):
    raw = pd.read_csv(
        shared_data / "taobao_userbehavior_timeslice" / "UserBehavior_timeslice_110k.csv.gz",
        header=None,
        names=["user_id", "item_id", "category_id", "behavior_type", "timestamp"],
    )
    frame = pd.DataFrame(
        {
            "user_id": raw["user_id"],
            "item_id": raw["item_id"],
            "activity": raw["behavior_type"],
            "timestamp_ms": raw["timestamp"].astype(np.int64) * 1000,
        }
    )
    vocab = ActivityVocabulary(("pv", "cart", "fav", "buy"), frozenset({"cart", "buy"}))
    # Support 1: the 2-hour window has ~85k items for 110k rows, the default of 5 keeps only ~1k tuples.
    config = ProtocolConfig(min_item_support=1)
    split = build_split(frame, "taobao", vocab, config)
    stats = json.loads(json.dumps(dataset_stats(split), allow_nan=False))

    conversion, ordering = stats["conversion"]["by_activity"], stats["ordering"]["by_activity"]
    assert stats["ordering"]["targets"] == ["buy"]
    assert (
        conversion["cart"]["rate"] == 1.0
        and conversion["buy"]["rate"] == 1.0
        and ordering["buy"]["rate"] == 1.0
    )
    assert 0 <= conversion["pv"]["rate"] < conversion["cart"]["rate"]
    assert ordering["cart"]["converted"] <= conversion["cart"]["converted"]

    # Activity counts are the raw rows less what the protocol removes: with support 1, training keeps
    # every tuple (after collapsing repeats) of its sessions; test additionally drops unseen items.
    tuples = to_visit_tuples(frame, config)
    act = stats["activity"]["by_activity"]
    train_counts = tuples.loc[
        tuples["session_id"].isin(set(split.train.session_ids)), "activity"
    ].value_counts()
    test_counts = tuples.loc[
        tuples["session_id"].isin(set(split.test.session_ids)), "activity"
    ].value_counts()
    raw_counts = raw["behavior_type"].value_counts()
    for name in vocab.names:
        assert act[name]["train"] == train_counts.get(name, 0)
        assert act[name]["test"] <= test_counts.get(name, 0)
        assert act[name]["count"] <= raw_counts[name]
    assert sum(row["count"] for row in act.values()) == stats["activity"]["total"]
    assert (
        stats["activity"]["total"] == stats["counts"]["train"]["tuples"] + stats["counts"]["test"]["tuples"]
    )
    assert act["pv"]["share"] == max(row["share"] for row in act.values())
    shares = [b["share"] for b in stats["dwell"]["buckets"]]
    assert sum(shares) == pytest.approx(1.0)
    # Equal-frequency edges fitted on train: the five known buckets hold similar tuple counts.
    known = [b["tuples"] for b in stats["dwell"]["buckets"][:-1]]
    assert max(known) < 1.2 * min(known)
