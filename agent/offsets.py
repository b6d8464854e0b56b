"""Checkpoints: for each followed file incarnation (stream), the offset the aggregator has
acknowledged as durable. Only acks move them, so a restart resumes exactly where the shipped
data ends; the aggregator drops anything resent twice.

One JSON file, ``<state_dir>/checkpoints.json``, replaced atomically (write, fsync, rename, fsync
the directory), so a crash leaves either the old or the new version, never a torn one.

The same file holds the ``[[journal]]`` sources' checkpoints under ``"journal"`` (one object per
source: its cursor and its streams' offsets, see agent/journal_source.py); older agents ignore
the key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from fleetlog.durable import write_atomic

log = logging.getLogger("fleetlog.agent.offsets")

FORMAT_VERSION = 1
FILENAME = "checkpoints.json"


@dataclass(slots=True)
class Checkpoint:
    stream: str
    topic: str
    path: str
    dev: int
    ino: int
    fp: str           # hash of the file's first fp_len bytes
    fp_len: int
    base: int         # the offset the stream started at
    acked: int        # end of what the aggregator has made durable
    seq: int          # next batch sequence number
    updated: float = 0.0
    # A copy of another stream's file (not shipped; finishes that stream if it gets truncated).
    shadow: bool = False


class CheckpointStore:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self.existed = False
        # The journal sources' checkpoints as last loaded or saved (plain objects).
        self.journal: list[dict[str, Any]] = []

    def load(self) -> dict[str, Checkpoint]:
        os.makedirs(self.state_dir, exist_ok=True)
        try:
            with open(self.path, "rb") as fh:
                doc = orjson.loads(fh.read())
        except FileNotFoundError:
            return {}
        except (orjson.JSONDecodeError, OSError) as exc:
            # Only ever replaced by rename, so this is outside damage; shipping everything
            # again (the aggregator drops what it has) beats silently skipping files.
            log.error("checkpoints %s unreadable (%s): files will be read from their start",
                      self.path, exc)
            return {}
        self.existed = True
        journal = doc.get("journal", [])
        self.journal = [j for j in journal if isinstance(j, dict)] if isinstance(journal, list) else []
        out: dict[str, Checkpoint] = {}
        for item in doc.get("files", []):
            try:
                cp = Checkpoint(**item)
            except TypeError as exc:
                log.warning("skipping a malformed checkpoint entry: %s", exc)
                continue
            out[cp.stream] = cp
        return out

    def save(self, checkpoints: list[Checkpoint], journal: list[dict[str, Any]] | None = None) -> None:
        doc: dict[str, Any] = {"version": FORMAT_VERSION, "files": [asdict(c) for c in checkpoints]}
        if journal:
            doc["journal"] = journal
        write_atomic(self.path, orjson.dumps(doc))
        self.existed = True
