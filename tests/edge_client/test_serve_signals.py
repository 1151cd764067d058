"""``rib-edge edge serve`` in a real subprocess: SIGTERM (and Ctrl-C) stop it cleanly and the open page is stored."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from edge_client.store import TupleStore
from tests.edge_client.worlds import DEVICE

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000


def start_serve(world, store: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """Start ``python -m rib_edge.cli edge serve`` on an ephemeral loopback port; (process, base URL, output lines)."""
    cmd = [
        sys.executable,
        "-m",
        "rib_edge.cli",
        "edge",
        "serve",
        "--store",
        str(store),
        "--package",
        str(world["package"]),
        "--public-key",
        str(world["public"]),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        DEVICE,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite
    watchdog.daemon = True
    watchdog.start()
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"serving (http://\S+)", line)
        if match:
            watchdog.cancel()
            return proc, match.group(1), lines
    watchdog.cancel()
    proc.wait(timeout=10)
    pytest.fail(f"serve exited {proc.returncode} before serving:\n{''.join(lines)}")


def post(url: str, payload: object) -> dict:
    req = urllib.request.Request(
        url + "/events",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_on_signal_and_stores_the_open_page(world, tmp_path, signum):
    store = tmp_path / "store"
    proc, url, lines = start_serve(world, store)
    try:
        events = [
            {
                "session_id": "kiosk-1",
                "timestamp_ms": T0,
                "event_type": "page_enter",
                "item_id": "item-9",
                "page_source": "search",
            },
            {
                "session_id": "kiosk-1",
                "timestamp_ms": T0 + 2000,
                "event_type": "module_view",
                "item_id": "item-9",
                "module": "specification",
            },
            {
                "session_id": "kiosk-1",
                "timestamp_ms": T0 + 7000,
                "event_type": "scroll",
                "item_id": "item-9",
                "value": 0.8,
            },
        ]
        body = post(url, events)
        assert body["accepted"] == 3 and body["rejected"] == 0
        assert TupleStore(store).read() == []  # the page is still open: nothing stored yet
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + out
    assert proc.returncode == 0, output
    assert f"stopped ({signal.Signals(signum).name})" in output and "Traceback" not in output
    records = TupleStore(store).read()
    assert [(r.session_id, r.item_id, r.activity) for r in records] == [
        ("kiosk-1", "item-9", "SearchList2Product"),
        ("kiosk-1", "item-9", "Detail_specification"),
    ]
    assert all(
        r.dwell_seconds == pytest.approx(7.0) for r in records
    )  # the dwell so far: enter -> last event
