"""Batch extraction (the training loaders' path) == streaming extraction (the device's path), byte for byte.

``extract_population`` sorts each device's events by (session, timestamp), stably, and feeds whole sessions
to ``TupleExtractor._apply``; a device pushes events one at a time through the same ``_apply``. These
properties pin that the two drivers agree on generated event streams - duplicates, missing leaves,
hidden/visible pairs, items missing where the schema allows it, same-millisecond ties, out-of-order input,
session timeouts and dwell caps, several devices and sessions: the same records in the same order (their
reprs too, so a float dwell never turns into an int), and the same read/kept/skip counts and messages.
"""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, ExtractorConfig, TupleExtractor, extract_population
from edge_client.schema import MODULES, PAGE_SOURCES, EventType, MicroBehavior, RawEvent, SkipReport
from model.data.synthetic import SyntheticConfig, generate_population

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Steps between events: ties, sub-window jitter, beyond the 2 s window, past a 60 s session gap; and back.
STEPS_MS = [0, 0, 1, 50, 400, 1_500, 2_500, 10_000, 61_000, -1, -300, -1_500, -2_500, -9_000]
NO_ITEM_OK = {
    EventType.PAGE_LEAVE,
    EventType.SCROLL,
    EventType.VISIBILITY_HIDDEN,
    EventType.VISIBILITY_VISIBLE,
}


@st.composite
def event_streams(draw, max_events: int = 80) -> list[RawEvent]:
    """Schema-valid events of 2 devices x 3 sessions x 3 items, in log order (not time order)."""
    t = 1_700_000_000_000
    events: list[RawEvent] = []
    for _ in range(draw(st.integers(0, max_events))):
        if (
            events and draw(st.integers(0, 7)) == 0
        ):  # a duplicate (an equal copy, as parsing a line twice gives)
            original = events[-1] if draw(st.booleans()) else draw(st.sampled_from(events))
            events.append(dataclasses.replace(original))
            continue
        t += draw(st.sampled_from(STEPS_MS))
        kind = draw(st.sampled_from(list(EventType)))
        item = draw(st.sampled_from(["A", "B", "C"]))
        if kind in NO_ITEM_OK and draw(st.integers(0, 3)) == 0:
            item = None
        fields: dict[str, object] = {}
        if kind is EventType.PAGE_ENTER:
            fields["page_source"] = draw(st.sampled_from(PAGE_SOURCES))
        elif kind is EventType.MODULE_VIEW:
            fields["module"] = draw(st.sampled_from(MODULES))
        elif kind is EventType.SCROLL and draw(st.booleans()):
            fields["value"] = draw(st.sampled_from([0.0, 0.25, 0.8, 1.0]))
        elif kind is EventType.HOVER:
            fields["value"] = 120.0
        device = draw(st.sampled_from(["dev-b", "dev-a"]))
        session = draw(st.sampled_from(["s1", "s2", "s10"]))
        events.append(RawEvent(device, session, t, kind, item, **fields))
    return events


CONFIGS = st.builds(
    ExtractorConfig,
    session_gap_s=st.sampled_from([1.0, 60.0, 1800.0]),
    max_dwell_s=st.sampled_from([0.5, 3, 30.0, 1800.0]),  # an int cap too: records keep what min() returns
    reorder_window_ms=st.sampled_from([0, 0, 300, 2_000]),
)


def report_state(report: SkipReport) -> tuple:
    return report.read, report.kept, dict(report.skipped), list(report.examples)


def streamed_population(events: list[RawEvent], config: ExtractorConfig) -> tuple[dict, SkipReport, int]:
    """The device's way: per device, every event through ``push`` in (session, timestamp) order, then flush."""
    report = SkipReport()
    out: dict[str, list[MicroBehavior]] = {}
    too_late = 0
    for device_id in sorted({e.device_id for e in events}):
        device_events = sorted(
            (e for e in events if e.device_id == device_id), key=lambda e: (e.session_id, e.timestamp_ms)
        )
        extractor = TupleExtractor(config, report)
        records = [m for event in device_events for m in extractor.push(event)] + extractor.flush()
        out[device_id] = records
        too_late += extractor.too_late
    return out, report, too_late


def assert_identical(batch: dict, streamed: dict) -> None:
    assert list(batch) == list(streamed)
    assert batch == streamed
    for device_id, records in batch.items():
        assert [repr(r) for r in records] == [repr(r) for r in streamed[device_id]]
        assert all(type(r) is MicroBehavior for r in records)


@SETTINGS
@given(events=event_streams(), config=CONFIGS)
def test_batch_equals_pushing_the_sorted_events_one_at_a_time(events, config):
    report = SkipReport()
    batch = extract_population(events, config, report)
    streamed, streamed_report, too_late = streamed_population(events, config)
    assert_identical(batch, streamed)
    assert report_state(report) == report_state(streamed_report)
    assert too_late == 0  # sorted input is never late
    assert report.read == len(events) == report.kept + report.n_skipped


@SETTINGS
@given(events=event_streams(), seed=st.integers(0, 2**16))
def test_device_with_a_window_on_jittered_input_builds_the_training_tuples(events, seed):
    """Input delivered out of order within the reorder window: same tuples per session, same counts."""
    training_config = ExtractorConfig(session_gap_s=60.0)
    device_config = ExtractorConfig(
        session_gap_s=60.0, reorder_window_ms=DEVICE_EXTRACTOR_CONFIG.reorder_window_ms
    )
    rng = random.Random(seed)
    for device_id in {e.device_id for e in events}:
        device_events = [e for e in events if e.device_id == device_id]
        training_report = SkipReport()
        training = extract_population(device_events, training_config, training_report)[device_id]
        delay: dict[tuple[str, int], float] = {}
        for event in device_events:  # one delay < window per (session, ms): same-ms events keep their order
            delay.setdefault((event.session_id, event.timestamp_ms), rng.random() * 1999)
        ordered = sorted(device_events, key=lambda e: (e.session_id, e.timestamp_ms))
        jittered = sorted(ordered, key=lambda e: e.timestamp_ms + delay[(e.session_id, e.timestamp_ms)])
        report = SkipReport()
        extractor = TupleExtractor(device_config, report)
        out = [m for event in jittered for m in extractor.push(event)] + extractor.flush()
        assert extractor.too_late == 0
        by_session = sorted(out, key=lambda m: m.session_id)  # sessions interleave differently; stable
        assert by_session == sorted(training, key=lambda m: m.session_id)
        assert (report.read, report.kept, report.skipped) == (
            training_report.read,
            training_report.kept,
            training_report.skipped,
        )


@SETTINGS
@given(events=event_streams(), config=CONFIGS, window_ms=st.sampled_from([300, 10**9]))
def test_many_events_per_call_give_the_same_tuples_and_cues(events, config, window_ms):
    """Cues never change tuples; and ``_apply`` fed many events per call (held events released together, as
    in the batch path) gives the same tuples and cues as one event per call, per session."""
    held = dataclasses.replace(config, reorder_window_ms=window_ms)  # 1e9: everything held until flush
    for device_id, records in extract_population(events, config).items():
        device_events = sorted(
            (e for e in events if e.device_id == device_id), key=lambda e: (e.session_id, e.timestamp_ms)
        )
        runs = []
        for run_config in (config, held):
            summaries: list = []
            extractor = TupleExtractor(run_config, on_visit=summaries.append)
            out = [m for event in device_events for m in extractor.push(event)] + extractor.flush()
            runs.append(
                (sorted(out, key=lambda m: m.session_id), sorted(summaries, key=lambda s: s.session_id))
            )
        assert runs[0] == runs[1]
        assert runs[0][0] == sorted(records, key=lambda m: m.session_id)
        assert sum(len(s.activities) for s in runs[0][1]) == len(records)


def test_batch_equals_streaming_on_a_synthetic_population_in_any_input_order():
    events = list(generate_population(SyntheticConfig(n_devices=30), seed=11))
    shuffled = events[:]
    random.Random(0).shuffle(shuffled)
    streamed, streamed_report, _ = streamed_population(events, ExtractorConfig())
    for log in (events, shuffled, events[::-1]):
        report = SkipReport()
        assert_identical(extract_population(log, report=report), streamed)
        assert report_state(report) == report_state(streamed_report)


def test_records_are_the_objects_the_constructor_builds():
    """Batch records (built by tuple.__new__) are ordinary MicroBehavior records: equal, hash, print, immutable."""
    events = list(generate_population(SyntheticConfig(n_devices=3), seed=1))
    records = [r for recs in extract_population(events).values() for r in recs]
    assert records
    for record in records:
        rebuilt = MicroBehavior(
            record.session_id, record.timestamp_ms, record.item_id, record.activity, record.dwell_seconds
        )
        assert type(record) is MicroBehavior  # a plain tuple would compare equal: check the type itself
        assert record == rebuilt and hash(record) == hash(rebuilt) and repr(record) == repr(rebuilt)
        with pytest.raises(AttributeError):
            record.activity = "Order"  # immutable


@pytest.mark.parametrize("enabled", [True, False])
def test_batch_path_restores_the_garbage_collector(enabled):
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        extract_population(list(generate_population(SyntheticConfig(n_devices=2), seed=0)))
        assert gc.isenabled() is enabled

        def broken():
            yield from generate_population(SyntheticConfig(n_devices=1), seed=0)
            raise RuntimeError("log reader failed")

        with pytest.raises(RuntimeError):
            extract_population(broken())
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
