"""One object a host app (or the local HTTP server) talks to: record raw UI events, get recommendations.

``EdgeClient(store_dir, package_dir, public_key, device_id=...)`` glues the device pieces together:

- ``record(event)`` takes a ``RawEvent`` (validated again: one built without ``from_dict`` never was), a
  decoded JSON object, or one JSON line (str/bytes), validates it with the schema, feeds the streaming
  extractor (``DEVICE_EXTRACTOR_CONFIG``: 2 s reorder window) and appends the micro behaviors of every
  visit that closed to the encrypted ``TupleStore``. Raw events are never persisted. It never raises into
  the host app: bad input, a full buffer or a store failure comes back as a ``RecordResult`` with a short
  reason code (the schema's codes plus ``unknown_action``, ``wrong_device``, ``too_many_sessions``,
  ``backpressure``, ``too_late``, ``store_error``, ``closed``, ``internal_error``), and every drop is
  counted in ``stats``. An ``action`` event must name an activity of the installed package.
- A JSON object without ``device_id`` gets the client's own (a browser tracker does not know it); an event
  of another device is refused (``wrong_device``).
- Memory is bounded: at most ``max_open_sessions`` sessions with extractor state (sessions idle past the
  extractor's gap, in event time, are closed first), at most ``max_pending_events`` events held in reorder
  buffers, and at most ``max_recent_records`` closed records of recent sessions kept for ``recommend``.
- ``recommend(k, exclude)`` answers for the current session: the latest session among the closed records
  (stored ones, reloaded from the store on start) plus the visits still open in the extractor, taken from
  a flushed *copy* of the extractor (the open page counts with its dwell so far; nothing is stored).
- Idle pages are committed without waiting for the next event: ``close_idle()`` closes sessions idle past
  the extractor's ``session_gap_s`` (30 min) with the very ``flush(now_ms=...)`` call the event path makes,
  and stores their tuples (it also releases held events older than the reorder window, e.g. a
  ``page_leave`` that arrived last). ``start_idle_timer(interval_s)`` (or ``idle_check_s=`` in the
  constructor) runs it from a daemon thread; ``close()`` stops the thread.
  *Clocks.* Events carry the page's clock, the device has its own; they are never compared. The client
  remembers the timestamp of the last event it took and the device's *monotonic* clock when it arrived,
  and estimates "now" in event time as that timestamp plus the monotonic time elapsed since
  (``event_time_now()``). A page clock that is hours off the device's, or a device wall clock that jumps
  (NTP, DST, a user setting it), so neither closes a page early nor keeps one open: a session closes once
  the device has seen no event of it for ``session_gap_s`` of real time, exactly when the event path would
  have closed it had an event arrived then. (Tabs with different clocks are one event timeline, as on the
  event path.) ``close_idle(now_ms)`` takes an explicit event-time ``now`` instead (e.g. a page heartbeat).
- Anti-rollback across restarts: the highest model version this device installed is kept as an
  encrypted, name-bound blob (``model-version``) in the store. At start the client reads it and loads the
  package only if it is not older (``stale_version`` otherwise; the same version loads again), and the
  ``Recommender`` reports every install (first load, ``swap``) back before the new model serves, so the
  floor only rises. An edited, swapped or foreign blob is ``StoreTamperError`` at start (fail closed).
  ``erase()`` writes the floor back into the fresh store (it is not personal data). Not covered: deleting
  the blob or rolling the whole store back to an older copy (no trusted monotonic counter; SECURITY.md P2).
- ``close()`` closes open visits, stores them and releases the store; ``erase()`` crypto-shreds the store
  and forgets all in-memory state (the client keeps working on a fresh, empty store).

All public methods take one lock, so the client may be shared by the server's threads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_client.extract import DEVICE_EXTRACTOR_CONFIG, TupleExtractor
from edge_client.package import Manifest
from edge_client.runtime import Recommendation, Recommender, latest_session
from edge_client.schema import EventType, MicroBehavior, RawEvent, SchemaError, SkipReport, parse_event_line
from edge_client.store import StoreError, StoreTamperError, TupleStore

DEFAULT_DEVICE_ID = "local"
MAX_OPEN_SESSIONS = 16
MAX_PENDING_EVENTS = 4096
MAX_RECENT_RECORDS = 1024
DEFAULT_IDLE_CHECK_S = 30.0  # how often the idle timer looks (the session gap itself is 30 min)
VERSION_BLOB = "model-version"  # the highest installed model version, in the device's store


def read_installed_version(store: TupleStore) -> int | None:
    """The highest model version recorded in ``store`` (None before the first install).

    ``StoreTamperError`` when the blob does not authenticate (edited, swapped, another store's) or does not
    hold a version record.
    """
    data = store.read_blob(VERSION_BLOB)
    if data is None:
        return None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raw = None
    version = raw.get("model_version") if isinstance(raw, dict) and set(raw) == {"model_version"} else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreTamperError(
            Path(store.directory) / f"blob-{VERSION_BLOB}.rblob", "not a model-version record"
        )
    return version


def write_installed_version(store: TupleStore, version: int) -> None:
    """Durably record ``version`` as the highest installed model version (encrypted, bound to its name)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"model versions are positive integers, got {version!r}")
    store.write_blob(VERSION_BLOB, json.dumps({"model_version": version}).encode("ascii"))


@dataclass(frozen=True)
class RecordResult:
    """Outcome of one ``record`` call: ``ok`` or a short ``reason`` code; ``stored`` records were persisted."""

    ok: bool
    reason: str | None = None
    message: str = ""
    stored: int = 0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        out: dict[str, object] = {"ok": self.ok, "stored": self.stored}
        if self.reason is not None:
            out["reason"] = self.reason
            out["message"] = self.message[:200]
        return out


class EdgeClient:
    """Records raw events into the encrypted tuple store and recommends for the current session."""

    def __init__(
        self,
        store_dir: str | Path,
        package_dir: str | Path,
        public_key: object,
        device_id: str = DEFAULT_DEVICE_ID,
        key_provider=None,
        max_open_sessions: int = MAX_OPEN_SESSIONS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        max_recent_records: int = MAX_RECENT_RECORDS,
        idle_check_s: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``idle_check_s``: start the idle timer with this interval (None: call ``close_idle`` yourself).
        ``clock``: monotonic seconds (default ``time.monotonic``; tests inject a fake one).

        Raises ``PackageError`` for a refused package (``stale_version`` when it is older than the version
        recorded in the store) and ``StoreError`` when the store (or its version record) does not verify.
        """
        if max_open_sessions < 1 or max_pending_events < 1 or max_recent_records < 1:
            raise ValueError("memory caps must be >= 1")
        if idle_check_s is not None and not idle_check_s > 0:
            raise ValueError("idle_check_s must be > 0 (or None for no timer)")
        self.device_id = str(device_id)
        self.store_dir = Path(store_dir)
        self.max_open_sessions = int(max_open_sessions)
        self.max_pending_events = int(max_pending_events)
        self._key_provider = key_provider
        self._lock = threading.Lock()
        self._clock = clock if clock is not None else time.monotonic
        self._anchor: tuple[int, float] | None = (
            None  # (timestamp of the last event taken, clock() at arrival)
        )
        self._timer: tuple[threading.Thread, threading.Event] | None = None
        self._closed = False
        self.stats: Counter = Counter()
        self._store = TupleStore(self.store_dir, key_provider=key_provider)
        try:
            self._installed_version = read_installed_version(self._store)
            self.recommender = Recommender(
                package_dir,
                public_key,
                installed_version=self._installed_version,
                allow_reinstall=True,
                on_install=self._remember_install,
            )
            self._extractor = self._new_extractor()
            self._recent: deque[MicroBehavior] = deque(maxlen=int(max_recent_records))
            self._recent.extend(latest_session(self._store.read()))
        except BaseException:
            self._store.close()
            raise
        if idle_check_s is not None:
            self.start_idle_timer(idle_check_s)

    def _new_extractor(self) -> TupleExtractor:
        return TupleExtractor(DEVICE_EXTRACTOR_CONFIG, SkipReport())

    # -- recording -----------------------------------------------------------------------------------------

    def record(self, event: RawEvent | Mapping[str, object] | str | bytes) -> RecordResult:
        """Validate and consume one raw event; never raises (see the module docstring)."""
        try:
            parsed = self._parse(event)
        except SchemaError as err:
            return self._drop(err.reason, str(err))
        except Exception as err:  # noqa: BLE001 - never raise into the host app
            return self._drop("internal_error", f"{type(err).__name__}")
        with self._lock:
            try:
                return self._record_locked(parsed)
            except Exception as err:  # noqa: BLE001
                return self._drop_locked("internal_error", f"{type(err).__name__}")

    def record_many(
        self, events: Iterable[RawEvent | Mapping[str, object] | str | bytes]
    ) -> list[RecordResult]:
        """``record`` for each event, in order."""
        return [self.record(event) for event in events]

    def _parse(self, event: object) -> RawEvent:
        if isinstance(event, RawEvent):
            # A RawEvent built directly (not by from_dict) was never validated, and one bad event in the
            # extractor would break recommend() and close() for its session: check it like any input.
            parsed = RawEvent.from_dict(
                {f.name: getattr(event, f.name) for f in dataclasses.fields(RawEvent)}
            )
        elif isinstance(event, (str, bytes, bytearray)):
            parsed = parse_event_line(bytes(event) if isinstance(event, bytearray) else event)
        elif isinstance(event, Mapping):
            if "device_id" not in event:
                event = {**event, "device_id": self.device_id}
            parsed = RawEvent.from_dict(event)
        else:
            raise SchemaError("bad_type", f"an event must be a JSON object, got {type(event).__name__}")
        for name in ("device_id", "session_id", "item_id"):
            value = getattr(parsed, name)
            if value is not None:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate from a JSON escape: the store could not hold it
                    raise SchemaError("bad_value", f"'{name}' is not valid Unicode") from None
        if parsed.device_id != self.device_id:
            raise SchemaError(
                "wrong_device", f"event of device {parsed.device_id[:40]!r}, this is {self.device_id[:40]!r}"
            )
        return parsed

    def _record_locked(self, event: RawEvent) -> RecordResult:
        if self._closed:
            return self._drop_locked("closed", "the client is closed")
        if event.event_type is EventType.ACTION:
            # An app's own action must be an activity the installed model knows; anything else would be
            # stored only to be skipped at every recommendation (a typo, or a kiosk built for another model).
            names = self.recommender.vocab.activities.names
            if event.action not in names:
                return self._drop_locked(
                    "unknown_action",
                    f"action {event.action[:40]!r} is not an activity of the installed model "
                    f"({', '.join(names[:8])}{' ...' if len(names) > 8 else ''})",
                )
        extractor = self._extractor
        records: list[MicroBehavior] = []
        if event.session_id not in extractor._sessions and extractor.open_sessions >= self.max_open_sessions:
            records += extractor.flush(now_ms=event.timestamp_ms)  # close sessions idle past the gap
            if extractor.open_sessions >= self.max_open_sessions:
                self._persist(records)
                return self._drop_locked("too_many_sessions", f"{extractor.open_sessions} sessions are open")
        if extractor.pending_events >= self.max_pending_events:
            records += extractor.flush(now_ms=event.timestamp_ms)  # a newer event moves the window on
        if extractor.pending_events >= self.max_pending_events:
            self._persist(records)
            return self._drop_locked("backpressure", f"{extractor.pending_events} events are held")
        late = extractor.too_late
        records += extractor.push(event)
        records += extractor.flush(now_ms=event.timestamp_ms)  # release held events of quiet sessions too
        if extractor.too_late > late:
            self._persist(records)
            return self._drop_locked("too_late", "the event is older than the reorder window allows")
        self._anchor = (
            event.timestamp_ms,
            self._clock(),
        )  # event time <-> device monotonic time (close_idle)
        try:
            stored = self._persist(records)
        except StoreError as err:
            return self._drop_locked("store_error", str(err))
        self.stats["recorded"] += 1
        return RecordResult(True, stored=stored)

    def _persist(self, records: list[MicroBehavior]) -> int:
        if not records:
            return 0
        try:
            stored = self._store.append(records)
        except (StoreError, ValueError) as err:  # ValueError: a record the store's encoder refuses
            self.stats["lost_records"] += len(records)
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"records refused by the store: {err}") from err
        self._recent.extend(records)
        self.stats["stored_records"] += stored
        return stored

    def _drop(self, reason: str, message: str) -> RecordResult:
        with self._lock:
            return self._drop_locked(reason, message)

    def _drop_locked(self, reason: str, message: str) -> RecordResult:
        self.stats[f"dropped_{reason}"] += 1
        return RecordResult(False, reason, message)

    # -- idle sessions -------------------------------------------------------------------------------------

    def event_time_now(self) -> int | None:
        """ "Now" on the events' clock: the last event's timestamp plus the device's monotonic time since it
        arrived (None before the first event). Never compares the device's wall clock with a page's."""
        with self._lock:
            return self._event_time_now_locked()

    def _event_time_now_locked(self) -> int | None:
        if self._anchor is None:
            return None
        timestamp_ms, arrived = self._anchor
        return timestamp_ms + int(max(0.0, self._clock() - arrived) * 1000)

    def close_idle(self, now_ms: int | None = None) -> int:
        """Close the open pages of sessions idle past the extractor's ``session_gap_s`` and store their tuples.

        ``now_ms`` is in event time (the page's clock); by default ``event_time_now()`` (see the module
        docstring). The same ``TupleExtractor.flush(now_ms=...)`` the event path calls does the work, so a page
        closes here exactly as it would have if an event had arrived at ``now_ms`` (dwell up to its last
        event, capped at ``max_dwell_s``); held events older than the reorder window are released too.
        Returns how many tuples this call stored; 0 after ``close``. A store failure raises ``StoreError``
        (the records are counted in ``stats["lost_records"]``).
        """
        with self._lock:
            if self._closed or not self._extractor.open_sessions:
                return 0
            if now_ms is None:
                now_ms = self._event_time_now_locked()
                if now_ms is None:
                    return 0
            stored = self._persist(self._extractor.flush(now_ms=int(now_ms)))
            self.stats["idle_stored_records"] += stored
            return stored

    def start_idle_timer(self, interval_s: float = DEFAULT_IDLE_CHECK_S) -> None:
        """Call ``close_idle()`` every ``interval_s`` seconds from a daemon thread until ``close()``."""
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._timer is not None:
                raise RuntimeError("the idle timer is already running")
            stop = threading.Event()
            thread = threading.Thread(
                target=self._idle_loop, args=(stop, float(interval_s)), name="rib-edge-idle", daemon=True
            )
            self._timer = (thread, stop)
            thread.start()

    def stop_idle_timer(self, timeout_s: float = 5.0) -> None:
        """Stop the idle timer (if running) and wait up to ``timeout_s`` for its thread."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is None:
            return
        thread, stop = timer
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout_s)

    def _idle_loop(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.wait(interval_s):
            try:
                self.close_idle()
            except Exception:  # noqa: BLE001 - the timer must outlive a failed write (counted)
                with self._lock:
                    self.stats["idle_errors"] += 1

    # -- model versions ------------------------------------------------------------------------------------

    @property
    def installed_version(self) -> int | None:
        """The highest model version recorded in the store (the floor a package must reach at start)."""
        return self._installed_version

    def _remember_install(self, manifest: Manifest) -> None:
        """``Recommender.on_install``: raise the recorded floor before the new model serves."""
        with self._lock:
            if self._closed:
                raise StoreError("the client is closed: cannot record a model install")
            version = manifest.model_version
            if self._installed_version is not None and version <= self._installed_version:
                return
            write_installed_version(self._store, version)
            self._installed_version = version

    def swap(self, new_package_dir: str | Path) -> Manifest:
        """``Recommender.swap`` (newer versions only); the new version is recorded in the store before it serves."""
        return self.recommender.swap(new_package_dir)

    # -- recommendations -----------------------------------------------------------------------------------

    def current_session(self) -> list[MicroBehavior]:
        """The current session's micro behaviors: closed ones plus the visits still open (not stored)."""
        with self._lock:
            return self._current_locked()

    def _current_locked(self) -> list[MicroBehavior]:
        live = copy.deepcopy(self._extractor).flush() if self._extractor.open_sessions else []
        return latest_session([*self._recent, *live])

    def recommend(
        self, k: int = 10, exclude: Iterable[str] = (), exclude_seen: bool = True
    ) -> list[Recommendation]:
        """Top ``k`` items for the current session (popularity when it has no known tuple yet)."""
        with self._lock:
            session = self._current_locked()
        return self.recommender.recommend(session, k=k, exclude=exclude, exclude_seen=exclude_seen)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the idle timer, close open visits, store their records and release the store; ``record``
        refuses afterwards."""
        self.stop_idle_timer()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._persist(self._extractor.flush())
            except StoreError:
                pass  # counted in stats["lost_records"]
            finally:
                self._extractor = self._new_extractor()
                self._store.close()

    def erase(self) -> None:
        """Crypto-shred the store and forget everything in memory; later events go to a fresh store.

        The installed model version is written back into the fresh store (it says nothing about the
        shopper), so erasing does not reopen the door to an older package.
        """
        with self._lock:
            self._store.erase()
            self._extractor = self._new_extractor()
            self._recent.clear()
            self._anchor = None
            self._store = TupleStore(self.store_dir, key_provider=self._key_provider)
            if self._installed_version is not None:
                write_installed_version(self._store, self._installed_version)

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
