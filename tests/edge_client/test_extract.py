"""The extractor: visits, dwell net of hidden time, activity mapping, robustness, batch == streaming."""

from __future__ import annotations

import math

from edge_client.extract import ExtractorConfig, TupleExtractor, extract_population
from edge_client.schema import EventType, RawEvent, SkipReport
from model.data.synthetic import SyntheticConfig, generate_population


def ev(ts_s: float, kind: str, item: str | None = "A", session: str = "s", **fields) -> RawEvent:
    return RawEvent("dev", session, int(ts_s * 1000), EventType(kind), item, **fields)


def run(events, config=None):
    extractor = TupleExtractor(config)
    out = []
    for event in events:
        out += extractor.push(event)
    return out + extractor.flush(), extractor


def test_visit_with_modules_cart_and_hidden_time():
    out, _ = run(
        [
            ev(0, "page_enter", page_source="search"),
            ev(5, "module_view", module="comments"),
            ev(6, "module_view", module="comments"),  # repeated read is one micro behavior
            ev(10, "visibility_hidden"),
            ev(110, "visibility_visible"),  # 100 s in the background must not count
            ev(115, "cart"),
            ev(120, "page_leave"),
        ]
    )
    assert [(m.item_id, m.activity) for m in out] == [("A", "SearchList2Product"), ("A", "Detail_comments"), ("A", "Cart")]
    assert all(m.dwell_seconds == 20.0 for m in out)
    assert [m.timestamp_ms for m in out] == [0, 5000, 115000]


def test_next_enter_closes_page_without_leave_and_idle_cap():
    out, _ = run(
        [
            ev(0, "page_enter", page_source="home"),
            ev(30, "page_enter", "B", page_source="sale"),
            ev(31, "scroll", "B", value=0.4),
            ev(90, "order", "B"),
        ],
        ExtractorConfig(max_dwell_s=50),
    )
    assert [(m.item_id, m.activity, m.dwell_seconds) for m in out] == [
        ("A", "Home2Product", 30.0),
        ("B", "Sale2Product", 50.0),  # capped: 60 s > max_dwell_s
        ("B", "Order", 50.0),
    ]


def test_session_timeout_closes_open_page_at_its_last_event():
    out, extractor = run(
        [
            ev(0, "page_enter", page_source="home"),
            ev(20, "scroll", value=0.9),
            ev(20 + 3600, "page_enter", "B", page_source="search"),
        ]
    )
    assert out[0].item_id == "A" and out[0].dwell_seconds == 20.0
    assert extractor.open_sessions == 0


def test_flush_with_now_only_closes_idle_sessions():
    extractor = TupleExtractor()
    extractor.push(ev(0, "page_enter", session="old", page_source="home"))
    extractor.push(ev(3000, "page_enter", session="new", page_source="home"))
    closed = extractor.flush(now_ms=3100 * 1000)
    assert [m.session_id for m in closed] == ["old"]
    assert extractor.open_sessions == 1


def test_cart_without_page_opens_its_own_visit():
    out, _ = run([ev(0, "page_enter", page_source="home"), ev(4, "cart", "B"), ev(9, "page_leave", "B")])
    assert [(m.item_id, m.activity, m.dwell_seconds) for m in out] == [("A", "Home2Product", 4.0), ("B", "Cart", 5.0)]


def test_duplicates_and_backwards_time_are_counted_not_lost_silently():
    report = SkipReport()
    extractor = TupleExtractor(report=report)
    first = ev(10, "page_enter", page_source="home")
    extractor.push(first)
    extractor.push(first)
    extractor.push(ev(5, "module_view", module="bottom"))
    out = extractor.push(ev(20, "page_leave"))
    assert report.skipped == {"duplicate": 1, "time_backwards": 1}
    assert report.read == 4 and report.kept == 2
    assert [m.activity for m in out] == ["Home2Product"]


def test_leave_for_other_item_does_not_close_page():
    out, _ = run([ev(0, "page_enter", page_source="home"), ev(3, "page_leave", "Z"), ev(8, "page_leave")])
    assert len(out) == 1 and math.isclose(out[0].dwell_seconds, 8.0)


def test_batch_path_equals_streaming_path_on_a_population():
    events = list(generate_population(SyntheticConfig(n_devices=20), seed=3))
    batch = extract_population(reversed(events))  # batch sorts, so input order does not matter
    for device_id, records in batch.items():
        streamed, _ = run([e for e in events if e.device_id == device_id])
        assert streamed == records
    assert sum(map(len, batch.values())) > 500
