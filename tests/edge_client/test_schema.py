"""The schema: events validate strictly, errors are clear SchemaErrors, vocabularies round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_client.schema import (
    PAPER_DWELL_EDGES_S,
    RIB_ACTIVITIES,
    ActivityVocabulary,
    DwellBuckets,
    EventType,
    RawEvent,
    SchemaError,
    SkipReport,
    parse_event_line,
    read_event_lines,
)

GOOD = {
    "device_id": "d1",
    "session_id": "s1",
    "timestamp_ms": 1_700_000_000_000,
    "event_type": "page_enter",
    "item_id": "42",
    "page_source": "search",
}


def test_valid_event_round_trips_through_json():
    event = RawEvent.from_dict(GOOD)
    assert event.event_type is EventType.PAGE_ENTER
    assert parse_event_line(event.to_json()) == event
    assert json.loads(event.to_json())["schema_version"] == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"event_type": "teleport"}, "unknown_event_type"),
        ({"timestamp_ms": None}, "missing_field"),
        ({"timestamp_ms": "yesterday"}, "bad_type"),
        ({"timestamp_ms": -5}, "bad_value"),
        ({"timestamp_ms": True}, "bad_type"),
        ({"page_source": "billboard"}, "bad_value"),
        ({"page_source": None}, "missing_field"),
        ({"item_id": None}, "missing_field"),
        ({"device_id": ""}, "bad_value"),
        ({"device_id": "x" * 500}, "bad_value"),
        ({"colour": "red"}, "unknown_field"),
        ({"schema_version": 99}, "bad_version"),
        ({"value": float("nan")}, "bad_type"),
        ({"module": "comments"}, "bad_value"),
    ],
)
def test_bad_fields_give_reasoned_errors(change, reason):
    record = {**GOOD, **change}
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(SchemaError) as info:
        RawEvent.from_dict(record)
    assert info.value.reason == reason


def test_event_specific_requirements():
    on_page = {k: v for k, v in GOOD.items() if k != "page_source"}
    with pytest.raises(SchemaError, match="'module' is required"):
        RawEvent.from_dict({**on_page, "event_type": "module_view"})
    scroll = {**on_page, "event_type": "scroll", "value": 1.5}
    with pytest.raises(SchemaError, match="scroll depth"):
        RawEvent.from_dict(scroll)
    leave = {"device_id": "d", "session_id": "s", "timestamp_ms": 5, "event_type": "page_leave"}
    assert RawEvent.from_dict(leave).item_id is None


def test_reader_counts_bad_lines_and_keeps_good_ones():
    lines = [
        json.dumps(GOOD).encode(),
        b"{not json",
        b"\xff\xfe garbage",
        b"",
        json.dumps({**GOOD, "event_type": "nope"}).encode(),
        b"[1, 2]",
        b"x" * 10_000,
        json.dumps({**GOOD, "timestamp_ms": GOOD["timestamp_ms"] + 1}).encode(),
    ]
    report = SkipReport()
    events = list(read_event_lines(lines, report))
    assert len(events) == 2
    assert report.read == 7 and report.kept == 2 and report.n_skipped == 5
    assert report.skipped == {
        "bad_json": 1,
        "not_utf8": 1,
        "unknown_event_type": 1,
        "bad_type": 1,
        "too_large": 1,
    }


def test_activity_vocabulary_defaults_and_validation():
    vocab = ActivityVocabulary()
    assert vocab.names == RIB_ACTIVITIES and len(vocab) == 10
    assert (
        vocab.index("Cart") == 8 and vocab.is_conversion("Order") and not vocab.is_conversion("Detail_bottom")
    )
    assert ActivityVocabulary.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(SchemaError):
        vocab.index("Teleport")
    with pytest.raises(SchemaError):
        ActivityVocabulary(("a", "a"))
    with pytest.raises(SchemaError):
        ActivityVocabulary(("a",), frozenset({"b"}))


def test_paper_dwell_buckets_match_table_1():
    buckets = DwellBuckets()
    assert buckets.edges_s == PAPER_DWELL_EDGES_S
    # Table 1: 0-9, 10-24, 25-60, 61-120, >120 seconds.
    expected = {0: 0, 9: 0, 9.9: 0, 10: 1, 24: 1, 25: 2, 60: 2, 61: 3, 120: 3, 121: 4, 5000: 4}
    assert {s: buckets.bucket_of(s) for s in expected} == expected
    assert buckets.bucket_of(float("nan")) == buckets.unknown == 5
    assert buckets.vocab_size == 6
    np.testing.assert_array_equal(buckets.bucketize(np.array([0, 10, np.nan, -1, 200])), [0, 1, 5, 5, 4])


def test_equal_frequency_edges_balance_buckets():
    rng = np.random.default_rng(0)
    dwell = rng.exponential(40, 10_000)
    buckets = DwellBuckets.fit_equal_frequency(dwell, 5)
    counts = np.bincount(buckets.bucketize(dwell), minlength=5)
    assert buckets.n_buckets == 5
    assert counts.min() > 1900 and counts.max() < 2100
    assert DwellBuckets.from_dict(buckets.to_dict()) == buckets


def test_equal_frequency_merges_tied_quantiles():
    # 1-second logs: most dwells are 0 s, so the low quantiles coincide and merge.
    dwell = np.r_[np.zeros(800), np.arange(1, 201)]
    buckets = DwellBuckets.fit_equal_frequency(dwell, 5)
    assert buckets.n_buckets < 5
    assert all(edge > 0 for edge in buckets.edges_s)


def test_bad_dwell_edges_are_rejected():
    for edges in [(10.0, 5.0), (-1.0,), (float("inf"),), (3.0, 3.0)]:
        with pytest.raises(SchemaError):
            DwellBuckets(edges)


def test_action_events_carry_an_apps_own_activity_name():
    event = {**GOOD, "event_type": "action", "action": "ViewRoom"}
    del event["page_source"]
    parsed = parse_event_line(json.dumps(event))
    assert parsed.event_type is EventType.ACTION and parsed.action == "ViewRoom"
    assert RawEvent.from_dict(json.loads(parsed.to_json())) == parsed
    for change, reason in (
        ({"action": None}, "missing_field"),  # an action event names its action
        ({"action": ""}, "bad_value"),
        ({"action": "x" * 200}, "bad_value"),
        ({"action": "a\nb"}, "bad_value"),
        ({"action": ["Book"]}, "bad_type"),
        ({"item_id": None}, "missing_field"),  # on an item, like a cart
    ):
        broken = {k: v for k, v in {**event, **change}.items() if v is not None}
        with pytest.raises(SchemaError) as err:
            RawEvent.from_dict(broken)
        assert err.value.reason == reason, change
    with pytest.raises(SchemaError, match="action only belongs to action events"):
        RawEvent.from_dict({**GOOD, "action": "ViewRoom"})
