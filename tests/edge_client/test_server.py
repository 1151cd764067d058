"""The local HTTP server: real requests to 127.0.0.1 on an ephemeral port."""

from __future__ import annotations

import http.client
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_client.client import EdgeClient
from edge_client.server import MAX_BODY_BYTES, STATIC_DIR, serve
from tests.edge_client.worlds import DEVICE

REPO = Path(__file__).resolve().parents[2]


def start(world, store: Path, **kwargs):
    client = EdgeClient(store, world["package"], world["public"], device_id=DEVICE)
    server = serve(client, **kwargs)
    return client, server


@pytest.fixture(scope="module")
def running(world, tmp_path_factory):
    client, server = start(
        world,
        tmp_path_factory.mktemp("server-store") / "store",
        rate_per_s=10_000,
        burst=10_000,
        pages_dir=REPO / "examples" / "kiosk",
    )
    yield client, server
    server.stop()
    client.close()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """(status, headers, decoded JSON or raw bytes)."""
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, err.headers, err.read()
    if head.get("Content-Type", "").startswith("application/json"):
        return status, head, json.loads(raw)
    return status, head, raw


def post_json(server, payload) -> tuple[int, object]:
    status, _, body = request(
        server, "POST", "/events", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    return status, body


def test_events_and_recommendations(running, world):
    client, server = running
    events = [e.to_dict() for e in world["events"]]
    for e in events:
        del e["device_id"]  # the tracker does not know it; the client fills it in
    status, body = post_json(server, events[:50])
    assert status == 200 and body["accepted"] == 50 and body["rejected"] == 0
    status, body = post_json(server, events[50])  # a single object
    assert status == 200 and body["accepted"] == 1
    status, body = post_json(server, events[51:])
    assert status == 200 and body["accepted"] == len(events) - 51
    status, _, body = request(server, "GET", "/recommendations?k=5")
    assert status == 200 and body["model_version"] == 1
    recs = body["recommendations"]
    assert len(recs) == 5 and all(r["source"] == "model" and r["explanation"] for r in recs)
    assert [r["item_id"] for r in recs] == [r.item_id for r in client.recommend(k=5)]
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body["ok"] and body["stats"]["recorded"] >= len(events)


def test_per_event_reasons(running):
    _, server = running
    status, body = post_json(
        server, [{"event_type": "teleport", "session_id": "s", "timestamp_ms": 1}, 7, {"x": 1}]
    )
    assert status == 200 and body["accepted"] == 0
    assert [r["reason"] for r in body["results"]] == ["unknown_event_type", "bad_type", "unknown_field"]


def test_static_and_pages(running):
    _, server = running
    status, head, body = request(server, "GET", "/tracker.js")
    assert status == 200 and head["Content-Type"].startswith("application/javascript")
    assert body == (STATIC_DIR / "tracker.js").read_bytes()
    status, head, body = request(server, "GET", "/")
    assert status == 200 and b"/tracker.js" in body and head["Content-Type"].startswith("text/html")
    assert request(server, "GET", "/../pyproject.toml")[0] == 404
    assert request(server, "GET", "/missing.html")[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/events", b"{not json", 400, "bad_json"),
        ("POST", "/events", b"\xff\xfe", 400, "bad_json"),
        ("POST", "/events", b"[" * 5000 + b"]" * 5000, 400, "bad_json"),
        ("POST", "/events", b"42", 400, "bad_type"),
        ("POST", "/events", b"[" + b"1," * 1500 + b"1]", 413, "too_many_events"),
        ("POST", "/events", b"[" + b" " * (MAX_BODY_BYTES + 10) + b"]", 413, "too_large"),
        ("POST", "/nope", b"{}", 404, "not_found"),
        ("GET", "/nope", None, 404, "not_found"),
        ("GET", "/recommendations?k=0", None, 400, "bad_k"),
        ("GET", "/recommendations?k=abc", None, 400, "bad_k"),
        ("GET", "/recommendations?k=101", None, 400, "bad_k"),
        ("PUT", "/events", b"{}", 405, "method_not_allowed"),
    ],
)
def test_error_paths(running, method, path, body, status, error):
    _, server = running
    got, head, payload = request(server, method, path, body)
    assert got == status and head["Content-Type"] == "application/json" and payload["error"] == error


def test_host_header_and_missing_length(running):
    _, server = running
    status, _, body = request(server, "GET", "/health", headers={"Host": "evil.example:80"})
    assert status == 403 and body["error"] == "bad_host"
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/events")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411 and json.loads(response.read())["error"] == "bad_length"
    conn.close()


def test_cross_site_pages_cannot_post(running):
    """A page of another site open in the device's browser must not plant events (its Origin gives it away)."""
    _, server = running
    event = json.dumps({"session_id": "x", "timestamp_ms": 1, "event_type": "cart", "item_id": "1"}).encode()
    for origin in ("https://evil.example", "null", "http://[::1", "http://127.0.0.1.evil.example"):
        status, _, body = request(
            server, "POST", "/events", event, {"Origin": origin, "Content-Type": "text/plain"}
        )
        assert status == 403 and body["error"] == "bad_origin", origin
    status, _, body = request(
        server, "POST", "/events", event, {"Origin": server.url}
    )  # the kiosk page itself
    assert status == 200 and len(body["results"]) == 1


def test_rate_limit(world, tmp_path):
    client, server = start(world, tmp_path / "store", rate_per_s=0.5, burst=3)
    try:
        statuses = [request(server, "GET", "/health")[0] for _ in range(6)]
        assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
        status, head, body = request(server, "GET", "/health")
        assert status == 429 and body["error"] == "rate_limited" and head["Retry-After"] == "1"
    finally:
        server.stop()
        client.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "::"])
def test_refuses_non_loopback_bind(world, tmp_path, host):
    client = EdgeClient(tmp_path / "store", world["package"], world["public"], device_id=DEVICE)
    with pytest.raises(ValueError, match="non-loopback"):
        serve(client, host=host)
    client.close()


def test_cli_serve_refuses_remote(world, tmp_path):
    from click.testing import CliRunner

    from rib_edge.cli_edge import edge_group

    args = [
        "serve",
        "--store",
        str(tmp_path / "store"),
        "--package",
        str(world["package"]),
        "--public-key",
        str(world["public"]),
        "--host",
        "0.0.0.0",
        "--port",
        "0",
    ]
    result = CliRunner().invoke(edge_group, args)
    assert result.exit_code == 2 and "non-loopback" in result.output and "--allow-remote" in result.output


def test_stop_releases_port(world, tmp_path):
    client, server = start(world, tmp_path / "store")
    port = server.server_address[1]
    server.stop()
    client.close()
    again = EdgeClient(tmp_path / "store2", world["package"], world["public"], device_id=DEVICE)
    second = serve(again, port=port)
    try:
        assert request(second, "GET", "/health")[0] == 200
    finally:
        second.stop()
        again.close()
    shutil.rmtree(tmp_path / "store2", ignore_errors=True)
