"""docs/federation.md's "Local deployment" section, run as written: every ``bash`` block of the section in one
shell, in a fresh directory (ports 9092-9095 swapped for free ones so parallel test runs do not collide).

Before the block's last line (``kill %1 %2 %3``) the test also submits a second run to the same deployment with
a server split of another vocabulary: every device must decline it, ``fl run`` must exit 1 saying why, and
nothing may be checkpointed or released for it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from aggregator.deploy import free_port  # noqa: E402
from edge_client.package import verify_package  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "federation.md"
SECTION = "## Local deployment"


def section_blocks(text: str, heading: str) -> list[str]:
    """The ``bash`` code blocks between ``heading`` and the next ``## `` heading."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def run_script(script: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """``bash -e`` in its own process group; whatever it leaves running is killed afterwards."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    process = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the documented commands took longer than {timeout_s} s:\n{output[-4000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def test_the_section_names_no_placeholder():
    text = "\n".join(section_blocks(DOC.read_text(), SECTION))
    assert not re.search(r"\b[A-Z][A-Z_]{3,}\b", text), "an unexplained placeholder in the commands"
    assert "fl demo" in text and "fl join" in text and "fl run" in text


@pytest.mark.slow
def test_the_documented_deployment_runs_as_written(tmp_path):
    demo, by_hand = section_blocks(DOC.read_text(), SECTION)
    ports = {port: str(free_port()) for port in ("9092", "9094", "9095")}
    for old, new in ports.items():
        by_hand = by_hand.replace(old, new)

    result = run_script(demo, tmp_path, timeout_s=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(r"round 2/2: 3/3 devices trained, failed: none, recall@20 0\.\d+", result.stdout)
    assert "done in" in result.stdout and "Traceback" not in result.stdout

    # A server split of another vocabulary for the extra run (the devices' packages do not match it).
    other = tmp_path / "other-split.npz"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from model.data.open import synthetic_split; from model.data.synthetic import "
            "SyntheticConfig; synthetic_split(SyntheticConfig(n_devices=30, n_items=50)).save(sys.argv[1])",
            str(other),
        ],
        check=True,
        cwd=ROOT,
    )
    lines = by_hand.rstrip("\n").split("\n")
    assert lines[-1].startswith("kill %"), "the section's block ends by stopping what it started"
    mismatch = (
        f"rib-edge fl run --superlink 127.0.0.1:{ports['9092']} --insecure -c eval-split={other} "
        "-c num-server-rounds=1 -c fraction-fit=1.0 -c min-fit-clients=2 -c min-available-clients=2 "
        "-c checkpoint-dir=mismatch/checkpoints -c release-dir=mismatch/releases "
        '-c signing-key=by-hand/keys/edge_signing_key.pem || echo "mismatch exit $?"'
    )
    result = run_script("\n".join([*lines[:-1], mismatch, lines[-1]]), tmp_path, timeout_s=600)
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert "waiting for 2 devices" in output or "round 0" in output
    assert "round 2/2: 2/2 devices trained, failed: none" in output and "finished:completed" in output
    release = tmp_path / "by-hand" / "releases" / "v000002"
    assert (
        verify_package(release, tmp_path / "by-hand" / "keys" / "edge_signing_key.pub.pem").model_version == 2
    )
    rows = [json.loads(line) for line in (tmp_path / "by-hand" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]

    assert "mismatch exit 1" in output
    assert "failed: vocab_mismatch 2" in output
    assert not (tmp_path / "mismatch" / "releases").exists()
    assert sorted(p.name for p in (tmp_path / "mismatch" / "checkpoints").iterdir()) == ["round-00000.npz"]
    # Each Flower line once (Opacus' root logging handler used to print every line a second time).
    started = [line for line in output.splitlines() if "configure_fit: strategy sampled" in line]
    assert len(started) == 3, started  # two rounds of the documented run, one of the mismatched run


@pytest.mark.slow
def test_the_documented_commands_are_what_prepare_only_prints(tmp_path, monkeypatch):
    from rib_edge.fl_demo import manual_commands, prepare

    _, by_hand = section_blocks(DOC.read_text(), SECTION)
    lines = by_hand.strip().split("\n")
    assert lines[0] == "rib-edge fl demo --devices 2 --out by-hand --prepare-only"
    monkeypatch.chdir(tmp_path)
    artifacts = prepare(Path("by-hand"), 2, echo=lambda line: None)
    assert manual_commands(artifacts, rounds=2, cwd=tmp_path) == lines[1:-1]
