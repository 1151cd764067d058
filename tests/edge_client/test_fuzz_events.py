"""Fuzzing the event API: ``RawEvent.from_dict``, ``parse_event_line`` and ``EdgeClient.record``.

Properties: the parsers return a ``RawEvent`` that survives its own JSON form, or raise ``SchemaError`` with
a documented reason and a message (nothing else, ever); ``record`` never raises into the host app and
answers ``ok`` or a documented reason (``internal_error`` means an unexpected exception was swallowed: a
crash); each case stays within a small memory bound.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edge_client.client import EdgeClient, RecordResult
from edge_client.schema import (
    _EVENT_FIELDS,
    MAX_EVENT_LINE_BYTES,
    MODULES,
    PAGE_SOURCES,
    EventType,
    RawEvent,
    SchemaError,
    parse_event_line,
)
from tests.edge_client.worlds import DEVICE, shared_world
from tests.fuzzing import (
    JSON,
    JSON_LEAF,
    FuzzSurface,
    assert_clear_error,
    context_fixture,
    fuzz_settings,
    run_bounded,
)

T0 = 1_700_000_000_000
# The schema's reason codes (edge_client.schema) and the ones EdgeClient.record adds (edge_client.client).
EVENT_REASONS = frozenset(
    {
        "bad_type",
        "unknown_field",
        "bad_version",
        "missing_field",
        "bad_value",
        "unknown_event_type",
        "too_large",
        "not_utf8",
        "bad_json",
    }
)
CLIENT_REASONS = EVENT_REASONS | {"wrong_device", "too_many_sessions", "backpressure", "too_late"}
FIELDS = _EVENT_FIELDS  # every field an event object may carry
EVENT_BOUND_BYTES = 1 << 20  # one event line is at most 4 KiB; 1 MiB is generous

_ids = st.sampled_from(["s1", "s2", "s3", "1", "2", "3", "7", "42"]) | st.text(max_size=140)
_odd = (
    JSON_LEAF
    | st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\ud800",
            "x" * 129,
            "é" * 200,
            "page_enter",
            "cart",
            "hover",
            "scroll",
            DEVICE,
            "home",
            "comments",
        ]
    )
    | st.sampled_from([-1, 0, 2**53, 2**53 + 1, 2**63, -(2**63), 10**400, 1.5, 1e308, -0.0, float(T0)])
)


@st.composite
def valid_events(draw: st.DrawFn, device: str | None = DEVICE) -> dict[str, object]:
    """A schema-valid event object (``device`` None leaves device_id out, as a browser tracker does)."""
    kind = draw(st.sampled_from(list(EventType)))
    odd_session = draw(st.integers(0, 9)) == 0
    event: dict[str, object] = {
        "session_id": draw(
            _ids.filter(lambda s: 0 < len(s) <= 128 and s.isprintable())
            if odd_session
            else st.sampled_from(["s1", "s2", "s3"])
        ),
        "timestamp_ms": draw(st.integers(T0, T0 + 5_000) | st.integers(T0, T0 + 3_600_000)),
        "event_type": kind.value,
    }
    if device is not None:
        event["device_id"] = device
    if kind in (
        EventType.PAGE_ENTER,
        EventType.MODULE_VIEW,
        EventType.CART,
        EventType.ORDER,
        EventType.HOVER,
    ) or draw(st.booleans()):
        event["item_id"] = draw(st.sampled_from([str(i) for i in range(1, 61)]))
    if kind is EventType.PAGE_ENTER:
        event["page_source"] = draw(st.sampled_from(PAGE_SOURCES))
    if kind is EventType.MODULE_VIEW:
        event["module"] = draw(st.sampled_from(MODULES))
    if kind is EventType.SCROLL:
        event["value"] = draw(st.floats(0, 1))
    if kind is EventType.HOVER:
        event["value"] = draw(st.floats(0, 1e6))
    return event


@st.composite
def mutated_events(draw: st.DrawFn, device: str | None = DEVICE) -> dict[str, object]:
    """A valid event with up to three fields dropped, replaced by odd values, or added."""
    event = draw(valid_events(device))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*FIELDS, "zzz"]) | st.text(max_size=8))
        if draw(st.integers(0, 3)) == 0:
            event.pop(key, None)
        else:
            event[key] = draw(_odd | JSON)
    return event


EVENT_OBJECTS = st.one_of(valid_events(), valid_events(None), mutated_events(), mutated_events(None), JSON)


def _encode(event: object, as_bytes: bool) -> str | bytes:
    text = json.dumps(event, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass") if as_bytes else text


EVENT_LINES = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=400),
    st.builds(_encode, EVENT_OBJECTS, st.booleans()),
    # valid JSON around invalid UTF-8, and lines at and just past the size limit
    st.builds(
        lambda e, junk: _encode(e, True)[:-1] + b',"zzz":"' + junk + b'"}',
        valid_events(),
        st.binary(min_size=1, max_size=8),
    ),
    st.builds(
        lambda e, n: _encode({**e, "item_id": "x" * n}, True),
        valid_events(),
        st.integers(MAX_EVENT_LINE_BYTES - 200, MAX_EVENT_LINE_BYTES + 50),
    ),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 3000)),
)


def _check_event(result: object, error: BaseException | None) -> str:
    if error is not None:
        assert_clear_error(error, EVENT_REASONS)
        return error.reason  # type: ignore[attr-defined]
    assert isinstance(result, RawEvent)
    # An accepted event keeps its meaning through its own JSON form (what a store or a log would hold).
    assert parse_event_line(result.to_json()) == result
    return "accepted"


def check_from_dict(_ctx: object, record: object) -> str:
    """RawEvent.from_dict: an event that round-trips, or a SchemaError with a documented reason."""
    return _check_event(*run_bounded(lambda: RawEvent.from_dict(record), EVENT_BOUND_BYTES, (SchemaError,)))


def check_parse_line(_ctx: object, line: str | bytes) -> str:
    """parse_event_line: an event that round-trips, or a SchemaError with a documented reason."""
    return _check_event(*run_bounded(lambda: parse_event_line(line), EVENT_BOUND_BYTES, (SchemaError,)))


@contextlib.contextmanager
def no_context(_tmp: Path) -> Iterator[None]:
    """The parsers need nothing set up."""
    yield None


# What a host app might hand to ``record``: objects, lines, RawEvents built without validation, other junk.
RAW_EVENT_OBJECTS = st.builds(
    RawEvent,
    device_id=st.just(DEVICE) | _odd,
    session_id=st.sampled_from(["s1", "s2"]) | _odd,
    timestamp_ms=st.integers(T0, T0 + 3_600_000) | _odd,
    event_type=st.sampled_from(list(EventType)) | _odd,
    item_id=st.none() | st.sampled_from(["1", "2", "3"]) | _odd,
    page_source=st.none() | st.sampled_from(PAGE_SOURCES) | _odd,
    module=st.none() | st.sampled_from(MODULES) | _odd,
    value=st.none() | st.floats() | _odd,
)
RECORD_INPUTS = st.one_of(
    # mostly valid events (as the tracker sends them: no device_id), so the extractor and the store are reached
    valid_events(None),
    valid_events(None),
    valid_events(None),
    valid_events(None).map(json.dumps),
    st.builds(RawEvent.from_dict, valid_events()),
    mutated_events(None),
    mutated_events(),
    EVENT_OBJECTS,
    EVENT_LINES,
    RAW_EVENT_OBJECTS,
    JSON_LEAF,
    st.sampled_from([object(), b"", bytearray(b"{}"), memoryview(b"{}"), (1, 2), {1: 2}, set()]),
)


@contextlib.contextmanager
def client_context(tmp: Path) -> Iterator[EdgeClient]:
    """An EdgeClient on the tiny trained package with a fresh encrypted store."""
    world = shared_world(tmp / "world")
    client = EdgeClient(
        tmp / "store",
        world["package"],
        world["public"],
        device_id=DEVICE,
        max_open_sessions=4,
        max_pending_events=64,
    )
    try:
        yield client
    finally:
        client.close()


def check_record(client: EdgeClient, event: object) -> str:
    """EdgeClient.record never raises and answers ok or a documented reason; recommend keeps working."""
    result, _ = run_bounded(lambda: client.record(event), 4 << 20, ())
    assert isinstance(result, RecordResult)
    if not result.ok:
        assert result.reason in CLIENT_REASONS, f"record answered {result.reason!r}: {result.message}"
        assert result.message.strip() and result.stored == 0
    recs = client.recommend(k=3)
    assert len(recs) <= 3 and all(r.item_id for r in recs)
    return "stored" if result.stored else (result.reason or "ok")


SURFACES = (
    FuzzSurface(
        "event_from_dict",
        "RawEvent.from_dict on valid, mutated and arbitrary JSON objects",
        EVENT_OBJECTS,
        no_context,
        check_from_dict,
    ),
    FuzzSurface(
        "event_line",
        "parse_event_line on random bytes/text, event JSON, invalid UTF-8, oversized lines",
        EVENT_LINES,
        no_context,
        check_parse_line,
    ),
    FuzzSurface(
        "client_record",
        "EdgeClient.record on objects, lines, unvalidated RawEvents and junk (store + model)",
        RECORD_INPUTS,
        client_context,
        check_record,
    ),
)


fuzz_client = context_fixture(client_context, "fuzz-client", needs="world")


@fuzz_settings()
@given(record=EVENT_OBJECTS)
def test_fuzz_from_dict(record):
    check_from_dict(None, record)


@fuzz_settings()
@given(line=EVENT_LINES)
def test_fuzz_parse_event_line(line):
    check_parse_line(None, line)


@fuzz_settings()
@given(event=RECORD_INPUTS)
def test_fuzz_client_record(fuzz_client, event):
    check_record(fuzz_client, event)


def test_regression_huge_integer_value_is_a_schema_error():
    """Found by fuzzing: a JSON integer beyond the float range made ``math.isfinite`` raise OverflowError."""
    event = {
        "device_id": DEVICE,
        "session_id": "s",
        "timestamp_ms": T0,
        "event_type": "hover",
        "item_id": "1",
    }
    line = json.dumps(event)[:-1] + ', "value": 1' + "0" * 400 + "}"
    for payload in ({**event, "value": 10**400}, line):
        error = run_bounded(
            lambda p=payload: parse_event_line(p) if isinstance(p, str) else RawEvent.from_dict(p),
            EVENT_BOUND_BYTES,
            (SchemaError,),
        )[1]
        assert isinstance(error, SchemaError) and error.reason == "bad_type"


def test_regression_unvalidated_raw_event_cannot_break_the_client(world, tmp_path):
    """Found by fuzzing: a RawEvent built without from_dict went into the extractor unchecked, and then
    ``recommend()`` and ``close()`` raised KeyError for good. It is now refused like any bad input."""
    with client_context(tmp_path) as client:
        bad = RawEvent(DEVICE, None, None, EventType.PAGE_ENTER, None, None, False, None)  # type: ignore[arg-type]
        result = client.record(bad)
        assert not result.ok and result.reason == "missing_field"
        good = RawEvent(DEVICE, "s", T0, EventType.PAGE_ENTER, "1", "home")
        assert client.record(good).ok
        assert client.recommend(k=3) and client.current_session()[0].item_id == "1"
