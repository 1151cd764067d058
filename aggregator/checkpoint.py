"""Server checkpoints: everything needed to continue a federated run at the next round with the same result.

One self-contained ``.npz`` per round (``round-00005.npz``): the global weights, the server optimiser's state
(FedAdam's moments), the DP accountant's state, the per-round history and a fingerprint of the settings
that must not change across a resume. It is written as temp file + fsync + rename + directory fsync, so a
kill at any point leaves either the previous round's file or the new one, never half of one. A SHA-256 over
the arrays and header is stored inside and checked on load; a file that fails the check is skipped (logged)
and the previous round's checkpoint is used. No pickles: arrays and one JSON header.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
_NAME_RE = re.compile(r"^round-(\d{5,})\.npz$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from (e.g. written by a run with other settings)."""


@dataclass
class ServerState:
    """The server's state after ``round`` (0 = the initial model)."""

    round: int
    weights: list[np.ndarray]
    fingerprint: str = ""
    optimizer: dict[str, list[np.ndarray]] = field(default_factory=dict)
    accountant: dict[str, object] | None = None
    history: list[dict[str, object]] = field(default_factory=list)
    releases: list[dict[str, object]] = field(default_factory=list)


def _digest(header: dict[str, object], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class CheckpointStore:
    """Round checkpoints in one directory; keeps the newest ``keep`` files."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = max(1, int(keep))

    def path_for(self, server_round: int) -> Path:
        """The file of one round."""
        return self.directory / f"round-{int(server_round):05d}.npz"

    def save(self, state: ServerState) -> Path:
        """Atomically write ``state`` and prune old rounds."""
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"w/{i:04d}": np.asarray(w) for i, w in enumerate(state.weights)}
        for key, values in state.optimizer.items():
            arrays.update({f"opt/{key}/{i:04d}": np.asarray(v) for i, v in enumerate(values)})
        header = {
            "format": FORMAT,
            "round": int(state.round),
            "fingerprint": state.fingerprint,
            "n_weights": len(state.weights),
            "optimizer": {key: len(values) for key, values in state.optimizer.items()},
            "accountant": state.accountant,
            "history": state.history,
            "releases": state.releases,
        }
        header["sha256"] = _digest(header, arrays)
        buffer = io.BytesIO()
        np.savez(buffer, header=np.array(json.dumps(header)), **arrays)
        path = self.path_for(state.round)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(buffer.getvalue())
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.rounds()[: -self.keep]:
            self.path_for(old).unlink(missing_ok=True)
        return path

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_NAME_RE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, server_round: int) -> ServerState:
        """Read and verify one round's checkpoint (``CheckpointError`` when it does not verify)."""
        path = self.path_for(server_round)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            header = json.loads(str(arrays.pop("header")))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err
        stored = header.pop("sha256", None)
        if header.get("format") != FORMAT or stored != _digest(header, arrays):
            raise CheckpointError(f"{path}: checksum or format mismatch (damaged or edited)")
        weights = [arrays[f"w/{i:04d}"] for i in range(int(header["n_weights"]))]
        optimizer = {
            key: [arrays[f"opt/{key}/{i:04d}"] for i in range(n)] for key, n in header["optimizer"].items()
        }
        return ServerState(
            round=int(header["round"]),
            weights=weights,
            fingerprint=str(header["fingerprint"]),
            optimizer=optimizer,
            accountant=header.get("accountant"),
            history=list(header.get("history", [])),
            releases=list(header.get("releases", [])),
        )

    def latest(self, fingerprint: str | None = None) -> ServerState | None:
        """The newest checkpoint that verifies (damaged ones are skipped, with a warning), or None."""
        for server_round in reversed(self.rounds()):
            try:
                state = self.load(server_round)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                continue
            if fingerprint is not None and state.fingerprint != fingerprint:
                raise CheckpointError(
                    f"{self.directory} holds a run with other settings (fingerprint {state.fingerprint[:12]} != "
                    f"{fingerprint[:12]}); use another checkpoint-dir or remove it"
                )
            return state
        return None
