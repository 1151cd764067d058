"""The fuzzing harness shared by the ``test_fuzz_*`` modules and ``experiments/security.py fuzz``.

Each fuzzed surface is a ``FuzzSurface``: a hypothesis strategy, a ``setup`` that builds what the property
needs (a store, a running server, a package...) and a ``check(ctx, example)`` that raises AssertionError
when the code under test breaks its contract: an exception type outside the documented ones, an error
without a clear message, or a case that needs too much memory. The test modules run ``check`` under the
hypothesis profile named by ``RIB_EDGE_FUZZ_PROFILE`` (``fuzz-ci``, the default: a few dozen cases per
surface so the suite stays fast on 2 cores; ``fuzz-dev``; ``fuzz-full``: 10,000), and the benchmark calls the
very same ``check`` functions, counting cases and crashes and measuring peak RSS.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE_ENV = "RIB_EDGE_FUZZ_PROFILE"
PROFILES = {"fuzz-ci": 30, "fuzz-dev": 300, "fuzz-full": 10_000}
for _name, _examples in PROFILES.items():
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,  # a case may touch the disk or a socket; timing is not the property
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def profile_name() -> str:
    """The fuzz profile chosen by ``RIB_EDGE_FUZZ_PROFILE`` (``fuzz-ci`` when unset)."""
    name = os.environ.get(PROFILE_ENV, "fuzz-ci")
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}; choose one of {sorted(PROFILES)}")
    return name


def fuzz_settings() -> settings:
    """Settings for a fuzz test: the selected profile (example count), no deadline."""
    return settings(settings.get_profile(profile_name()))


@dataclass(frozen=True)
class FuzzSurface:
    """One attack surface: examples, the context they run against, and the property every example must keep."""

    name: str
    description: str
    strategy: st.SearchStrategy
    setup: Callable[[Path], AbstractContextManager[Any]]
    check: Callable[[Any, Any], str]  # returns a short outcome label (a reason code, "accepted"...) to tally


def context_fixture(
    setup: Callable[[Path], AbstractContextManager[Any]], label: str, needs: str | None = None
):
    """A module-scoped pytest fixture that yields ``setup(<fresh temp dir>)`` (after the ``needs`` fixture)."""

    @pytest.fixture(scope="module")
    def fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
        if needs is not None:  # e.g. the session's trained world, so it is built (and cached) once
            request.getfixturevalue(needs)
        with setup(tmp_path_factory.mktemp(label)) as ctx:
            yield ctx

    return fixture


def assert_clear_error(err: BaseException, reasons: Iterable[str] | None = None) -> None:
    """A documented error must say what went wrong: a known reason code and a non-empty message."""
    message = str(err)
    reason = getattr(err, "reason", None)
    if reasons is not None:
        allowed = set(reasons)
        assert reason in allowed, f"undocumented reason {reason!r} ({type(err).__name__}: {message[:300]})"
    body = message.split(": ", 1)[1] if reason is not None and message.startswith(f"{reason}: ") else message
    assert len(body.strip()) >= 8, f"{type(err).__name__} without a useful message: {message!r}"
    assert len(message) <= 4096, f"{type(err).__name__} message of {len(message)} characters"


# The largest traced peak run_bounded has seen in this process (``experiments/security.py fuzz`` reports it per surface).
MAX_TRACED_PEAK = [0]
# RIB_EDGE_FUZZ_TRACE=0 turns the per-case memory bound off: a leak check measures RSS without tracemalloc.
TRACE_MEMORY = os.environ.get("RIB_EDGE_FUZZ_TRACE", "1") != "0"


def run_bounded(
    fn: Callable[[], Any], limit_bytes: int, expected: tuple[type[BaseException], ...]
) -> tuple[Any, BaseException | None]:
    """Run ``fn`` under tracemalloc: (result, None) or (None, documented error); fails past ``limit_bytes``.

    Any exception outside ``expected`` propagates: that is a crash of the surface.
    """
    # The peak above what was traced before (when an outer caller already traces). Starting and stopping
    # tracemalloc per case leaves ~20 KB of RSS residue per case: an artifact, not a leak of ``fn``.
    if not TRACE_MEMORY:
        try:
            return fn(), None
        except expected as err:
            return None, err
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except expected as err:
        error = err
    finally:
        _, peak = tracemalloc.get_traced_memory()
        peak -= before
        if started:
            tracemalloc.stop()
    MAX_TRACED_PEAK[0] = max(MAX_TRACED_PEAK[0], peak)
    assert peak <= limit_bytes, f"peak traced memory {peak:,} bytes > bound {limit_bytes:,}"
    return result, error


def mutate_bytes(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (kind, position, chunk) edits: 0 overwrite, 1 insert, 2 delete len(chunk)+1 bytes, 3 truncate."""
    out = bytearray(data)
    for kind, pos, chunk in edits:
        pos = pos % (len(out) + 1)
        if kind == 0:
            out[pos : pos + len(chunk)] = chunk
        elif kind == 1:
            out[pos:pos] = chunk
        elif kind == 2:
            del out[pos : pos + len(chunk) + 1]
        else:
            del out[pos:]
    return bytes(out)


EDITS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    min_size=1,
    max_size=6,
)
# JSON-like values, the shapes decoded JSON can take (finite floats only: NaN is not JSON).
JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=24,
)
