"""The extractor: visits, dwell net of hidden time, activity mapping, robustness, batch == streaming.

Generated streams pinning batch == streaming byte for byte are in test_extract_batch.py.
"""

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
    assert [(m.item_id, m.activity) for m in out] == [
        ("A", "SearchList2Product"),
        ("A", "Detail_comments"),
        ("A", "Cart"),
    ]
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


def test_session_gap_is_exclusive():
    """A pause of exactly session_gap_s keeps the visit open; one millisecond more closes it at its last event."""
    for pause_ms, dwell_s in ((60_000, 60.0), (60_001, 0.0)):
        events = [
            ev(0, "page_enter", page_source="home"),
            RawEvent("dev", "s", pause_ms, EventType.PAGE_LEAVE, "A"),
        ]
        out, _ = run(events, ExtractorConfig(session_gap_s=60))
        assert [m.dwell_seconds for m in out] == [dwell_s]


def test_flush_with_now_only_closes_idle_sessions():
    extractor = TupleExtractor()
    extractor.push(ev(0, "page_enter", session="old", page_source="home"))
    extractor.push(ev(3000, "page_enter", session="new", page_source="home"))
    closed = extractor.flush(now_ms=3100 * 1000)
    assert [m.session_id for m in closed] == ["old"]
    assert extractor.open_sessions == 1


def test_cart_without_page_opens_its_own_visit():
    out, _ = run([ev(0, "page_enter", page_source="home"), ev(4, "cart", "B"), ev(9, "page_leave", "B")])
    assert [(m.item_id, m.activity, m.dwell_seconds) for m in out] == [
        ("A", "Home2Product", 4.0),
        ("B", "Cart", 5.0),
    ]


def test_duplicates_and_backwards_time_are_counted_not_lost_silently():
    report = SkipReport()
    extractor = TupleExtractor(report=report)
    first = ev(10, "page_enter", page_source="home")
    extractor.push(first)
    extractor.push(ev(10, "page_enter", page_source="home"))  # equal, not the same object (a line read twice)
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


# -- out-of-order delivery, late events, micro-intent cues ------------------------------------------

import random  # noqa: E402
from collections import defaultdict  # noqa: E402

import edge_client.extract as extract_module  # noqa: E402
from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, VisitSummary  # noqa: E402

WINDOW = DEVICE_EXTRACTOR_CONFIG.reorder_window_ms


def shuffle_within_window(events, window_ms, seed=0):
    """Deliver events out of order, each at most ``window_ms`` behind the newest already delivered.

    Every distinct timestamp gets one random delay < window; events are delivered in order of
    timestamp + delay (stable), so same-ms events keep their relative order, as a real UI logger would.
    """
    rng = random.Random(seed)
    delay: dict[int, float] = {}
    for event in events:
        delay.setdefault(event.timestamp_ms, rng.random() * window_ms * 0.999)
    return sorted(events, key=lambda e: e.timestamp_ms + delay[e.timestamp_ms])


def by_session(records):
    out = defaultdict(list)
    for record in records:
        out[record.session_id].append(record)
    return dict(out)


def population_events(n_devices=20, seed=3):
    return list(generate_population(SyntheticConfig(n_devices=n_devices), seed=seed))


def test_out_of_order_within_window_gives_the_in_order_tuples():
    events = [
        ev(0, "page_enter", page_source="search"),
        ev(5, "module_view", module="comments"),
        ev(10, "cart"),
        ev(12, "page_leave"),
        ev(13, "page_enter", "B", page_source="home"),
        ev(20, "page_leave", "B"),
    ]
    in_order, _ = run(events)
    shuffled = [events[0], events[2], events[1], events[4], events[3], events[5]]  # up to 5 s late
    report = SkipReport()
    extractor = TupleExtractor(ExtractorConfig(reorder_window_ms=6000), report)
    out = [m for e in shuffled for m in extractor.push(e)] + extractor.flush()
    assert out == in_order and extractor.too_late == 0 and report.n_skipped == 0


def test_events_behind_the_window_are_dropped_and_counted_never_raise():
    report = SkipReport()
    extractor = TupleExtractor(DEVICE_EXTRACTOR_CONFIG, report)
    out = []
    out += extractor.push(ev(10, "page_enter", page_source="home"))
    out += extractor.push(ev(9, "module_view", module="bottom"))  # 1 s late: within window, reordered
    out += extractor.push(ev(20, "page_leave"))
    out += extractor.push(ev(12, "module_view", module="comments"))  # 8 s behind the newest: too late
    out += extractor.push(ev(10, "page_enter", page_source="home", session="other"))
    out += extractor.flush()
    assert extractor.too_late == 1 and report.skipped == {"too_late": 1}
    assert [(m.session_id, m.activity, m.timestamp_ms) for m in out][:2] == [
        ("s", "Detail_bottom", 9000),
        ("s", "Home2Product", 10000),
    ]
    assert report.read == 5 and report.kept == 4


def test_held_events_are_released_by_time_and_by_flush_now():
    extractor = TupleExtractor(DEVICE_EXTRACTOR_CONFIG)
    assert extractor.push(ev(0, "page_enter", page_source="home")) == []
    assert extractor.push(ev(1, "page_leave")) == []  # both held: newest - window < 1 s
    assert extractor.pending_events == 2
    assert [m.activity for m in extractor.push(ev(3.5, "scroll", "Z", value=0.1))] == ["Home2Product"]
    assert extractor.pending_events == 1
    assert extractor.flush(now_ms=4000) == [] and extractor.pending_events == 1  # 3.5 s not yet 2 s old
    assert (
        extractor.flush(now_ms=6000) == [] and extractor.pending_events == 0 and extractor.open_sessions == 1
    )
    assert extractor.flush(now_ms=3.5 * 1000 + 1800 * 1000 + 1) == [] and extractor.open_sessions == 0


def test_reorder_buffer_is_bounded(monkeypatch):
    monkeypatch.setattr(extract_module, "MAX_PENDING_PER_SESSION", 4)
    extractor = TupleExtractor(ExtractorConfig(reorder_window_ms=10**9))
    for i in range(10):
        extractor.push(ev(i, "module_view", module="comments" if i % 2 else "bottom"))
    assert extractor.pending_events == 4
    extractor.push(ev(0.5, "cart"))  # behind what was force-released: counted, not applied out of order
    assert extractor.too_late == 1


def test_batch_equals_streaming_on_in_order_and_shuffled_input_with_a_window():
    events = population_events()
    training = extract_population(events)  # the training path: no window
    batch = extract_population(reversed(events), DEVICE_EXTRACTOR_CONFIG)
    assert batch.keys() == training.keys()
    late_deliveries = 0
    for device_id, records in batch.items():
        assert by_session(records) == by_session(training[device_id])  # the window changes no tuple
        device_events = [e for e in events if e.device_id == device_id]
        streamed, extractor = run(device_events, DEVICE_EXTRACTOR_CONFIG)
        assert streamed == records  # in order: identical, order included
        shuffled = shuffle_within_window(device_events, WINDOW, seed=int(device_id[-6:]))
        newest = defaultdict(int)
        for event in shuffled:
            late_deliveries += event.timestamp_ms < newest[event.session_id]
            newest[event.session_id] = max(newest[event.session_id], event.timestamp_ms)
        streamed, extractor = run(shuffled, DEVICE_EXTRACTOR_CONFIG)
        assert extractor.too_late == 0
        assert by_session(streamed) == by_session(records)
        assert extract_population(shuffled, DEVICE_EXTRACTOR_CONFIG)[device_id] == records
    assert late_deliveries > 20  # the shuffle really reorders


def test_cues_do_not_change_tuples():
    events = population_events(n_devices=8, seed=5)
    summaries: list[VisitSummary] = []
    for device_id, records in extract_population(events).items():
        extractor = TupleExtractor(on_visit=summaries.append)
        out = [m for e in events if e.device_id == device_id for m in extractor.push(e)] + extractor.flush()
        assert out == records
    assert summaries and all(s.max_scroll is None or 0.5 <= s.max_scroll <= 1.0 for s in summaries)
    assert sum(len(s.activities) for s in summaries) == sum(map(len, extract_population(events).values()))


def test_micro_intent_cues():
    summaries: list[VisitSummary] = []
    extractor = TupleExtractor(on_visit=summaries.append)
    events = [
        ev(0, "hover", "H1", value=300),  # hovered before any visit
        ev(1, "page_enter", "A", page_source="search"),
        ev(2, "scroll", "A", value=0.3),
        ev(3, "scroll", "A", value=0.8),
        ev(4, "scroll", "A", value=0.5),
        ev(5, "hover", "B", value=200),  # hovered on A's page, entered later
        ev(6, "hover", "H2", value=200),  # never entered
        ev(7, "hover", "A", value=200),  # own page: not a hover-only cue
        ev(10, "page_leave", "A"),
        ev(11, "page_enter", "B", page_source="home"),
        ev(15, "page_enter", "A", page_source="cart"),  # back to A: revisit; closes B without a leave
        ev(16, "cart", "A"),
    ]
    for event in events:
        extractor.push(event)
    extractor.flush()
    assert [(s.item_id, s.closed_by, s.revisit) for s in summaries] == [
        ("A", "leave", False),
        ("B", "enter", False),
        ("A", "flush", True),
    ]
    first = summaries[0]
    assert first.max_scroll == 0.8 and first.hovered_only == ("H1", "B", "H2") and first.dwell_seconds == 9.0
    assert first.activities == ("SearchList2Product",) and first.enter_ms == 1000 and first.end_ms == 10000
    assert summaries[1].max_scroll is None and summaries[1].hovered_only == ()
    assert summaries[2].activities == ("Cart2Product", "Cart")


def random_dense_events(rng: random.Random, n_sessions: int = 3, n_events: int = 120) -> list[RawEvent]:
    """Valid events 0-400 ms apart (same-ms ties included), many kinds, a few items, several sessions."""
    events = []
    for s in range(n_sessions):
        t = 1_000_000 + s * 50_000
        for _ in range(n_events):
            t += rng.choice([0, 0, 50, 150, 400])
            item = rng.choice("ABCD")
            kind = rng.choice(
                [
                    "page_enter",
                    "module_view",
                    "cart",
                    "order",
                    "hover",
                    "scroll",
                    "page_leave",
                    "visibility_hidden",
                    "visibility_visible",
                ]
            )
            fields = {}
            if kind == "page_enter":
                fields["page_source"] = rng.choice(["home", "search", "sale"])
            elif kind == "module_view":
                fields["module"] = rng.choice(["comments", "bottom"])
            elif kind == "scroll":
                fields["value"] = rng.random()
            elif kind == "hover":
                fields["value"] = 100.0
            events.append(RawEvent("dev", f"s{s}", t, EventType(kind), item, **fields))
    return events


def test_dense_shuffles_within_window_give_the_same_tuples_and_cues():
    for seed in range(8):
        rng = random.Random(seed)
        events = random_dense_events(rng)
        expected_cues: list[VisitSummary] = []
        reference = TupleExtractor(on_visit=expected_cues.append)
        expected = [m for e in events for m in reference.push(e)] + reference.flush()
        shuffled = shuffle_within_window(events, WINDOW, seed=seed)
        assert shuffled != events
        cues: list[VisitSummary] = []
        extractor = TupleExtractor(DEVICE_EXTRACTOR_CONFIG, on_visit=cues.append)
        out = [m for e in shuffled for m in extractor.push(e)] + extractor.flush()
        assert extractor.too_late == 0
        assert by_session(out) == by_session(expected)
        assert sorted(cues, key=lambda c: (c.session_id, c.enter_ms)) == sorted(
            expected_cues, key=lambda c: (c.session_id, c.enter_ms)
        )
        assert by_session(extract_population(shuffled, DEVICE_EXTRACTOR_CONFIG)["dev"]) == by_session(
            expected
        )


def test_action_events_are_in_visit_activities_under_their_own_names():
    events = [
        ev(0, "action", action="ViewRoom"),  # opens a visit of A (no page_enter: an app's own entry)
        ev(4, "action", action="Photos"),
        ev(5, "action", action="Photos"),  # a repeat within the visit is one micro behavior
        ev(9, "cart"),  # the built-in events mix with an app's own
        ev(12, "action", item="B", action="ViewRoom"),  # another item: A's visit closes ("switch")
        ev(20, "action", item="B", action="Book"),
        ev(30, "page_leave", item="B"),
    ]
    out, _ = run(events)
    assert [(m.item_id, m.activity, m.dwell_seconds) for m in out] == [
        ("A", "ViewRoom", 12.0),
        ("A", "Photos", 12.0),
        ("A", "Cart", 12.0),
        ("B", "ViewRoom", 18.0),
        ("B", "Book", 18.0),
    ]
    # The batch path (what training reads) gives the same records.
    assert extract_population(events)["dev"] == out
