"""A tiny local HTTP front for ``EdgeClient`` so a kiosk web page can record events and show recommendations.

``serve(client, host="127.0.0.1", port=0)`` starts a ``ThreadingHTTPServer`` in a daemon thread and
returns it (``server.url``, ``server.stop()``). Stdlib only. Endpoints:

- ``POST /events``: one JSON event object or a JSON array of them (``device_id`` may be left out: the
  client fills in its own). Body at most ``MAX_BODY_BYTES`` (64 KiB, else 413), at most
  ``MAX_BATCH_EVENTS`` events (else 413); JSON that does not parse is 400 ``{"error": "bad_json"}``.
  Otherwise 200 with one result per event (``{"ok", "stored", "reason"?, "message"?}``).
- ``GET /recommendations?k=10``: the current session's top ``k`` (1..100) with scores and explanations.
- ``GET /tracker.js``: the dependency-free tracker (``edge_client/static/tracker.js``).
- ``GET /health``: liveness, model version and counters.
- ``GET /`` and ``GET /NAME.html|.css|.js``: files of ``pages_dir`` when one is given (the kiosk page),
  so the page and ``/events`` share one origin.

Safety: binds loopback unless ``allow_remote=True`` (ValueError otherwise); on a loopback bind, requests
whose ``Host`` header is not a loopback name (403 ``bad_host``, against DNS rebinding) or that carry the
``Origin`` of a non-loopback page (403 ``bad_origin``, against cross-site posts) are refused; a global token
bucket (``rate_per_s``, ``burst``) answers 429 when exceeded; every error is a JSON 4xx (also the stdlib's
own refusals of a malformed request; an unknown method is a JSON 501) and a handler failure is a JSON 500,
never a crashed process. Answers carry ``Cache-Control: no-store`` and
``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edge_client.client import EdgeClient
from edge_client.runtime import format_recommendations

MAX_BODY_BYTES = 64 * 1024
MAX_BATCH_EVENTS = 1000
MAX_K = 100
DEFAULT_RATE_PER_S = 200.0
DEFAULT_BURST = 400
DRAIN_LIMIT_BYTES = 1024 * 1024  # read (and discard) at most this much of a refused body
STATIC_DIR = Path(__file__).resolve().parent / "static"
_PAGE_RE = re.compile(r"^/([A-Za-z0-9_-]{1,64}\.(html|css|js))$")
_CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "application/javascript; charset=utf-8",
}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _origin_host(origin: str) -> str:
    """The host name of an ``Origin`` header ("" when it has none or does not parse, e.g. ``null``)."""
    try:
        return urlsplit(origin.strip()).hostname or ""
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return ""


class TokenBucket:
    """Thread-safe token bucket: ``take()`` is False when the rate is exceeded."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class EdgeServer(ThreadingHTTPServer):
    """The HTTP server; holds the client, the limiter and the optional pages directory."""

    daemon_threads = True

    def __init__(
        self, address, client: EdgeClient, limiter: TokenBucket, pages_dir: Path | None, check_host: bool
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.pages_dir = pages_dir
        self.check_host = check_host
        self.tracker_js = (STATIC_DIR / "tracker.js").read_bytes()
        self.thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8765``."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and close the socket (the client stays open)."""
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: EdgeServer
    server_version = "rib-edge"
    sys_version = ""
    timeout = 10  # seconds a slow client may hold a connection

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # no request logs: they would leak browsing behavior

    # -- plumbing ------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: object, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, body, "application/json", extra)

    def _error(self, status: int, error: str, message: str = "") -> None:
        self._json(status, {"error": error, "message": message[:200]})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line or version, headers too large, unknown method) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the version did not parse: still answer with a status line
            self.request_version = "HTTP/1.0"
        try:
            error = HTTPStatus(code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            error = "error"
        self._json(code, {"error": error, "message": (message or "")[:200]}, {"Connection": "close"})

    def _guard(self) -> bool:
        """Rate limit, Host and Origin checks; answers and returns False when the request must not go on."""
        if not self.server.limiter.take():
            self._json(429, {"error": "rate_limited", "message": "too many requests"}, {"Retry-After": "1"})
            return False
        if self.server.check_host:
            host = (self.headers.get("Host") or "").strip()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and not is_loopback(name):
                self._error(403, "bad_host", "this server only answers loopback host names")
                return False
            # A web page of another site open in the device's browser may POST here (a "simple" request needs
            # no preflight) and would plant events in this device's history: its Origin gives it away.
            origin = self.headers.get("Origin")
            if origin is not None and not is_loopback(_origin_host(origin)):
                self._error(403, "bad_origin", "this server only answers pages served from a loopback origin")
                return False
        return True

    def _dispatch(self, handler) -> None:
        try:
            if self._guard():
                handler()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bad request must never take the server down
            self.close_connection = True
            try:
                self._error(500, "internal_error", type(err).__name__)
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _not_allowed(self) -> None:
        self._dispatch(lambda: self._error(405, "method_not_allowed", self.command))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed  # noqa: N815

    # -- routes --------------------------------------------------------------------------------------------

    def _get(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path == "/recommendations":
            self._recommendations(parse_qs(url.query))
        elif path == "/tracker.js":
            self._send(200, self.server.tracker_js, _CONTENT_TYPES["js"])
        elif path == "/health":
            client = self.server.client
            self._json(
                200,
                {"ok": True, "model_version": client.recommender.model_version, "stats": dict(client.stats)},
            )
        elif self.server.pages_dir is not None and (path == "/" or _PAGE_RE.match(path)):
            self._page("index.html" if path == "/" else path[1:])
        else:
            self._error(404, "not_found", path[:100])

    def _page(self, name: str) -> None:
        assert self.server.pages_dir is not None
        file = self.server.pages_dir / name
        if not file.is_file():
            self._error(404, "not_found", name)
            return
        self._send(200, file.read_bytes(), _CONTENT_TYPES[name.rsplit(".", 1)[1]])

    def _recommendations(self, query: dict[str, list[str]]) -> None:
        raw = query.get("k", ["10"])[-1]
        try:
            k = int(raw)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_K:
            self._error(400, "bad_k", f"k must be an integer in 1..{MAX_K}")
            return
        client = self.server.client
        recs = client.recommend(k=k)
        self._json(
            200,
            {
                "model_version": client.recommender.model_version,
                "recommendations": format_recommendations(recs),
            },
        )

    def _post(self) -> None:
        if urlsplit(self.path).path != "/events":
            self._error(404, "not_found", self.path[:100])
            return
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(411 if length_header is None else 400, "bad_length", "a Content-Length is required")
            return
        if length > MAX_BODY_BYTES:
            self._drain(length)
            self.close_connection = True
            self._error(413, "too_large", f"body of {length} bytes exceeds {MAX_BODY_BYTES}")
            return
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._error(400, "bad_json", "the body is not valid UTF-8 JSON")
            return
        if isinstance(payload, dict):
            events = [payload]
        elif isinstance(payload, list):
            events = payload
        else:
            self._error(400, "bad_type", "the body must be a JSON object or an array of objects")
            return
        if len(events) > MAX_BATCH_EVENTS:
            self._error(413, "too_many_events", f"at most {MAX_BATCH_EVENTS} events per request")
            return
        results = [self.server.client.record(event).to_dict() for event in events]
        accepted = sum(1 for r in results if r["ok"])
        self._json(200, {"accepted": accepted, "rejected": len(results) - accepted, "results": results})

    def _drain(self, length: int) -> None:
        """Read and discard a refused body (bounded) so the client sees the answer, not a reset."""
        left = min(length, DRAIN_LIMIT_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)


def serve(
    client: EdgeClient,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    burst: int = DEFAULT_BURST,
    pages_dir: str | Path | None = None,
) -> EdgeServer:
    """Start serving ``client`` in a daemon thread; returns the server (``url``, ``stop()``)."""
    loopback = is_loopback(host)
    if not loopback and not allow_remote:
        raise ValueError(
            f"refusing to bind non-loopback host {host!r} (pass allow_remote=True to expose the device)"
        )
    bind = host.strip("[]")
    server_cls = EdgeServer
    if ":" in bind:
        import socket

        class _V6(EdgeServer):
            address_family = socket.AF_INET6

        server_cls = _V6
    server = server_cls(
        (bind, int(port)),
        client,
        TokenBucket(rate_per_s, burst),
        Path(pages_dir) if pages_dir is not None else None,
        loopback,
    )
    server.thread = threading.Thread(target=server.serve_forever, name="rib-edge-server", daemon=True)
    server.thread.start()
    return server
