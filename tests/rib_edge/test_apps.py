"""Any app's own behaviors, end to end through the CLI: a hotel kiosk with seven action types trains,
packages, records, recommends, simulates and benchmarks under the same activity names; raw events that
`data extract` turns into tuples are a dataset every command reads."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_client.schema import RawEvent
from rib_edge.cli import main
from tests.app_logs import HOTEL_ACTIVITIES, write_hotel_log

SPLIT = ["--test-fraction", "0.3"]


def run(*args: object):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def hotel(tmp_path_factory):
    """The hotel log, a RIB trained on it (7 activities), and that model as a signed package."""
    base = tmp_path_factory.mktemp("hotel")
    log, mapping = write_hotel_log(base)
    data = ["--dataset", log, "--mapping", mapping, *SPLIT]
    result = run("train", *data, "--epochs", 2, "--item-dim", 8, "--hidden-dim", 8, "--out", base / "run")
    assert result.exit_code == 0, result.output
    assert run("edge", "keygen", "--out", base / "keys").exit_code == 0
    args = ["--checkpoint", base / "run" / "rib.pt", "--key", base / "keys" / "edge_signing_key.pem"]
    result = run("edge", "package", *data, *args, "--out", base / "pkg", "--model-version", 1)
    assert result.exit_code == 0, result.output
    return {
        "base": base,
        "log": log,
        "mapping": mapping,
        "checkpoint": base / "run" / "rib.pt",
        "package": base / "pkg",
        "public": base / "keys" / "edge_signing_key.pub.pem",
    }


def test_the_package_ships_the_apps_own_vocabulary_and_the_kiosk_serves_it(hotel, tmp_path):
    """The kiosk's local server (what `edge serve` runs) takes the app's action events, stores their tuples
    and recommends from them with the hotel model."""
    import urllib.request

    from edge_client.client import EdgeClient
    from edge_client.server import serve

    vocab = json.loads((hotel["package"] / "vocab.json").read_text())
    assert vocab["activities"]["names"] == list(HOTEL_ACTIVITIES)
    client = EdgeClient(tmp_path / "store", hotel["package"], hotel["public"], device_id="kiosk")
    server = serve(client, port=0)

    def call(method: str, path: str, payload=None):
        body = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            server.url + path, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        t = 1_700_300_000_000
        events = []
        visits = (
            ("room-3", ["ViewRoom", "Photos"]),
            ("room-4", ["ViewRoom", "Reviews", "Map"]),
            ("room-5", ["ViewRoom"]),
        )
        for room, actions in visits:
            for action in actions:
                events.append(
                    {
                        "session_id": "s1",
                        "timestamp_ms": t,
                        "event_type": "action",
                        "item_id": room,
                        "action": action,
                    }
                )
                t += 20_000
        # The kiosk's JD page entry is not this model's activity: refused, with the names it knows.
        events.append(
            {
                "session_id": "s1",
                "timestamp_ms": t,
                "event_type": "action",
                "item_id": "room-6",
                "action": "Home2Product",
            }
        )
        answer = call("POST", "/events", events)
        assert [r["ok"] for r in answer["results"]] == [True] * 6 + [False]
        assert (
            answer["results"][-1]["reason"] == "unknown_action"
            and "ViewRoom" in answer["results"][-1]["message"]
        )
        recs = call("GET", "/recommendations?k=5")
    finally:
        server.stop()
    explanation = recs["recommendations"][0]["explanation"]
    assert [(t["item_id"], t["activity"]) for t in explanation] == [
        ("room-3", "ViewRoom"),
        ("room-3", "Photos"),
        ("room-4", "ViewRoom"),
        ("room-4", "Reviews"),
        ("room-4", "Map"),
        ("room-5", "ViewRoom"),
    ]
    # Every tuple reaches the model: none is skipped as an unknown activity.
    assert recs["recommendations"][0]["source"] == "model" and all(t["used"] for t in explanation)
    assert "unknown_activity" not in client.recommender.stats
    client.close()


def test_edge_recommend_groups_sessions_by_device(hotel, tmp_path):
    """Two devices both have a session "s5": only the device with the latest one is used, and every event
    is counted once."""

    def action(device, ts, room, name):
        return RawEvent(device, "s5", ts, "action", room, action=name).to_json()

    lines = [action("old-kiosk", 1_000 + k * 10_000, f"room-{k}", "ViewRoom") for k in range(6)]
    lines += [action("new-kiosk", 900_000 + k * 10_000, f"room-{10 + k}", "ViewRoom") for k in range(2)]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    common = ["--package", hotel["package"], "--public-key", hotel["public"], "--events", events, "--json"]
    result = run("edge", "recommend", *common)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["device_id"] == "new-kiosk" and answer["session_id"] == "s5"
    assert answer["session_tuples"] == 2  # not 8: the old kiosk's "s5" is another session
    assert answer["events"]["read"] == answer["events"]["kept"] == 8  # read once, not twice
    answer = json.loads(run("edge", "recommend", *common, "--device", "old-kiosk").output)
    assert answer["device_id"] == "old-kiosk" and answer["session_tuples"] == 6
    result = run("edge", "recommend", *common, "--device", "nobody")
    assert result.exit_code == 2 and "no micro behaviors of device 'nobody'" in result.output
    events.write_bytes(b"\xff\xfe garbage\n{not json\n")
    result = run("edge", "recommend", *common)
    assert result.exit_code == 2 and "no valid events (read 2, kept 0" in result.output


def test_eval_refuses_a_dataset_with_other_vocabularies(hotel, tmp_path):
    data = ["--dataset", hotel["log"], "--mapping", hotel["mapping"]]
    result = run("eval", *data, *SPLIT, "--checkpoint", hotel["checkpoint"])
    assert result.exit_code == 0, result.output
    assert "recall@20" in result.output and "small test set" in result.output  # a few dozen examples
    # The same log with two activities collapsed: the model's activity indices would mean other things.
    collapsed = tmp_path / "collapsed.toml"
    collapsed.write_text(hotel["mapping"].read_text().replace('map = "Map"', 'map = "Photos"'))
    result = run(
        "eval", "--dataset", hotel["log"], "--mapping", collapsed, *SPLIT, "--checkpoint", hotel["checkpoint"]
    )
    assert result.exit_code == 2
    assert "trained on other vocabularies" in result.output and "activities" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # Another test split trains on other sessions: other items or dwell edges, refused too.
    result = run("eval", *data, "--test-fraction", "0.6", "--checkpoint", hotel["checkpoint"])
    assert result.exit_code == 2 and "trained on other vocabularies" in result.output


def test_extracted_events_are_a_dataset_for_prepare_train_and_bench(tmp_path):
    events, tuples = tmp_path / "events.jsonl", tmp_path / "tuples.csv"
    assert run("data", "synth", "--devices", 40, "--out", events).exit_code == 0
    result = run("data", "extract", events, "--out", tuples)
    assert result.exit_code == 0, result.output
    assert tuples.read_text().startswith("session_id,user_id,timestamp,item_id,action,dwell_seconds\n")
    result = run("data", "prepare", tuples, "--min-item-support", 2)
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert counts["train"]["examples"] > 100 and counts["test"]["examples"] > 0
    result = run(
        "train",
        "--dataset",
        tuples,
        "--epochs",
        1,
        "--item-dim",
        8,
        "--hidden-dim",
        8,
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "bench"
    result = run("bench", "baselines", "--dataset", tuples, "--models", "POP,SR", "--out", out, *SPLIT)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "baselines.json").read_text())
    assert {row["model"] for row in payload["rows"]} == {"POP", "SR"}
    assert payload["protocol"]["test_fraction"] == 0.3 and payload["data_options"] == {"test_fraction": 0.3}
    # The extractor's activity names are the vocabulary, in the device's own words.
    from model.data.open import open_dataset

    split = open_dataset(str(tuples))
    assert set(split.vocab.activities.names) <= {
        "Home2Product", "ShopList2Product", "Sale2Product", "Cart2Product", "SearchList2Product",
        "Detail_comments", "Detail_specification", "Detail_bottom", "Cart", "Order",
    }  # fmt: skip
    assert split.vocab.activities.conversions == {"Cart", "Order"}
    # The protocol reads the timestamps as written: the extracted tuples keep their millisecond times.
    assert split.info["notes"].startswith("Generic interactions file; timestamps read as iso")


def test_small_test_sets_are_flagged_in_the_bench_json(hotel, tmp_path):
    out = tmp_path / "b"
    data = ["--dataset", hotel["log"], "--mapping", hotel["mapping"]]
    result = run("bench", "baselines", *data, "--models", "POP", "--out", out)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "baselines.json").read_text())
    assert payload["small_test"] is True
    assert any("test examples (< 1,000)" in reason for reason in payload["small_test_reasons"])
    assert "warning: small test set" in result.output


@pytest.mark.slow
def test_a_seven_action_log_simulates_without_collapsing(hotel, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "sim"
    data = ["--dataset", hotel["log"], "--mapping", hotel["mapping"], *SPLIT]
    result = run("simulate", "--preset", "smoke", *data, "--devices", 12, "--rounds", 1, "--out", out)
    assert result.exit_code == 0, result.output
    population = json.loads((out / "population" / "population.json").read_text())
    assert population["source_details"]["mapping"]["activities"] == list(HOTEL_ACTIVITIES)
    assert population["source_details"]["protocol"]["test_fraction"] == 0.3
    from simulations.population import open_population

    pop = open_population(out / "population")
    assert pop.split().vocab.activities.names == HOTEL_ACTIVITIES
    stored = {r.activity for i in pop.ok_indices() for r in pop.records(int(i))}
    assert len(stored) >= 6 and stored <= set(HOTEL_ACTIVITIES)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["participants"] > 0


@pytest.mark.slow
def test_a_seven_action_log_runs_through_bench_fl(hotel, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "fl"
    data = ["--dataset", hotel["log"], "--mapping", hotel["mapping"], *SPLIT]
    args = ["--rounds", 1, "--epsilons", "", "--devices", 12, "--item-dim", 8, "--hidden-dim", 8]
    result = run("bench", "fl", *data, *args, "--out", out)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "fl.json").read_text())
    assert payload["data"]["activities"] == list(HOTEL_ACTIVITIES)
    assert payload["data"]["protocol"]["test_fraction"] == 0.3
    assert [row["setting"] for row in payload["rows"]] == ["centralized", "fedavg"]
    assert payload["small_test"] is True and "warning: small test set" in result.output


def test_edge_serve_on_a_busy_port_names_the_flag(hotel, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--store", tmp_path / "store", "--package", hotel["package"], "--public-key", hotel["public"]]
        result = run("edge", "serve", *args, "--port", port)
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: port {port} on 127.0.0.1 is busy; choose another with --port"
