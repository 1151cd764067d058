"""Fuzzing the loopback HTTP server with raw requests: random methods, paths, headers and bodies.

Every request is written byte for byte to a socket (no client library tidying it up) and the write side is
then shut, so a short body can never leave the server waiting. Property: the server answers every request
with JSON (or the static file asked for) and a 2xx/4xx status (a JSON 501 only for a method it does not
know, 505 only for HTTP/2 and later), never a 500 (a handler crash) and never silence; the serving thread stays alive.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edge_client.client import EdgeClient
from edge_client.server import EdgeServer, serve
from tests.edge_client.test_fuzz_events import EVENT_OBJECTS, valid_events
from tests.edge_client.worlds import DEVICE, shared_world
from tests.fuzzing import JSON, FuzzSurface, context_fixture, fuzz_settings

KNOWN_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
STATIC_PATHS = ("/tracker.js", "/", "/index.html")
_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_URL_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII without space


@dataclass(frozen=True)
class Request:
    """One raw HTTP request."""

    method: str
    path: str
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def to_bytes(self) -> bytes:
        """The request as sent on the wire."""
        head = f"{self.method} {self.path} {self.version}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in self.headers
        )
        return head.encode("latin-1") + b"\r\n" + self.body


_bodies = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    EVENT_OBJECTS.map(lambda v: json.dumps(v).encode()),
    st.lists(valid_events(None) | EVENT_OBJECTS, max_size=8).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)
_paths = st.one_of(
    st.sampled_from(
        [
            "/events",
            "/events",
            "/events",
            "/health",
            "/recommendations?k=5",
            "/recommendations?k=x",
            "/recommendations?k=100&k=0",
            *STATIC_PATHS,
            "/a.html",
            "/../etc/passwd",
            "//events",
            "*",
            "http://127.0.0.1/events",
            "/events?%00=%ff",
            "/%2e%2e/store.key",
        ]
    ),
    st.text(_URL_CHARS, max_size=60).map(lambda s: "/" + s),
    st.binary(max_size=30).map(lambda b: "/" + "".join(f"%{x:02x}" for x in b)),
    st.integers(2000, 70_000).map(lambda n: "/" + "a" * n),
)
_header_names = st.sampled_from(
    [
        "Host",
        "Content-Length",
        "Content-Type",
        "Transfer-Encoding",
        "Connection",
        "Expect",
        "Origin",
        "Cookie",
        "X-Forwarded-For",
    ]
) | st.text(_TOKEN, min_size=1, max_size=20)
_header_values = st.sampled_from(
    [
        "127.0.0.1",
        "localhost:8000",
        "[::1]:80",
        "evil.example",
        "",
        "-1",
        "0",
        "10",
        "99999999999999999999",
        "chunked",
        "100-continue",
        "close",
        "application/json",
        "null",
        "http://127.0.0.1:1",
        "https://evil.example",
        "http://[::1",
        "http://[::1]:9",
    ]
) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Mostly well-formed POST /events with odd bodies; often odd methods, paths, versions and headers."""
    if draw(st.integers(0, 9)):
        method = draw(st.sampled_from(["POST"] * 8 + ["GET"] * 4 + list(KNOWN_METHODS)))
    else:
        method = draw(st.text(_TOKEN, min_size=1, max_size=10))
    path = draw(st.just("/events") if method == "POST" and draw(st.integers(0, 2)) else _paths)
    version = draw(st.sampled_from(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.x", "HTTP/11.1"]))
    body = draw(_bodies) if method == "POST" or draw(st.booleans()) else b""
    headers = list(draw(st.lists(st.tuples(_header_names, _header_values), max_size=6)))
    if draw(st.integers(0, 3)):  # usually an honest length (a short one is a short body: the server sees EOF)
        headers.append(
            ("Content-Length", str(draw(st.integers(0, len(body))) if draw(st.booleans()) else len(body)))
        )
    if draw(st.booleans()):
        headers.insert(0, ("Host", draw(st.sampled_from(["127.0.0.1", "localhost", "[::1]:1"]))))
    return Request(method, path, version, tuple(headers), body)


def send(server: EdgeServer, request: Request, timeout: float = 15.0) -> http.client.HTTPResponse:
    """Send raw bytes, shut the write side, and parse the answer (body read in full)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.to_bytes())
        with contextlib.suppress(OSError):  # the server may already have answered and closed
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method=request.method)
        response.begin()
        response.body = response.read()  # type: ignore[attr-defined]
        return response


@contextlib.contextmanager
def server_context(tmp: Path) -> Iterator[EdgeServer]:
    """A server (generous rate limit, kiosk pages) over a client on the tiny trained package."""
    world = shared_world(tmp / "world")
    client = EdgeClient(tmp / "store", world["package"], world["public"], device_id=DEVICE)
    pages = Path(__file__).resolve().parents[2] / "examples" / "kiosk"
    server = serve(client, rate_per_s=1e6, burst=10**6, pages_dir=pages)
    try:
        yield server
    finally:
        server.stop()
        client.close()


def check_request(server: EdgeServer, request: Request) -> str:
    """A JSON 2xx/4xx (or the static file) for every request; 501 only for unknown methods; never a 500."""
    response = send(server, request)
    status, body = response.status, response.body  # type: ignore[attr-defined]
    content_type = response.getheader("Content-Type", "")
    known = request.method in KNOWN_METHODS
    # The only 5xx are protocol answers: 501 for a method the server does not know, 505 for HTTP/2+.
    protocol_5xx = (status == 501 and not known) or (
        status == 505 and request.version not in ("HTTP/1.1", "HTTP/1.0")
    )
    assert status < 500 or protocol_5xx, (
        f"{status} for {request.method} {request.path[:80]!r}: {body[:200]!r}"
    )
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    if content_type == "application/json":
        if request.method != "HEAD":  # a HEAD answer has headers only
            payload = json.loads(body)
            assert isinstance(payload, dict)
            if status >= 400:
                assert payload["error"] and isinstance(payload["message"], str)
            elif "results" in payload:
                assert len(payload["results"]) == payload["accepted"] + payload["rejected"]
    else:  # only a static file may be something other than JSON
        assert status == 200 and request.method == "GET", (
            f"{status} {content_type!r} for {request.path[:80]!r}"
        )
    assert server.thread is not None and server.thread.is_alive()
    return str(status)


SURFACES = (
    FuzzSurface(
        "http_server",
        "raw HTTP requests: random methods, paths, versions, headers and bodies to the loopback server",
        requests(),
        server_context,
        check_request,
    ),
)


fuzz_server = context_fixture(server_context, "fuzz-server", needs="world")


@fuzz_settings()
@given(request=requests())
def test_fuzz_raw_requests(fuzz_server, request):
    check_request(fuzz_server, request)


def test_stdlib_refusals_are_json_too(fuzz_server):
    """The stdlib's own refusals (bad version, overlong request line, unknown method) come back as JSON."""
    for request, status in (
        (Request("GET", "/health", "HTTP/2.0", (), b""), 505),
        (Request("GET", "/health", "HTTP/x", (), b""), 400),
        (Request("GET", "/" + "a" * 70_000, "HTTP/1.1", (), b""), 414),
        (Request("BREW", "/events", "HTTP/1.1", (), b""), 501),
        (Request("GET", "/health", "HTTP/1.1", tuple(("X-A", "b") for _ in range(120)), b""), 431),
    ):
        response = send(fuzz_server, request)
        assert response.status == status and response.getheader("Content-Type") == "application/json"
        assert json.loads(response.body)["error"]  # type: ignore[attr-defined]
