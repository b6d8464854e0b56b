"""Checkpoints: for each followed file incarnation (stream), the offset the aggregator has
acknowledged as durable. Only acks move them, so a restart resumes exactly where the shipped
data ends; the aggregator drops anything resent twice.

One JSON file, ``<state_dir>/checkpoints.json``, replaced atomically (write, fsync, rename, fsync
the directory), so a crash leaves either the old or the new version, never a torn one.

The same file holds the ``[[journal]]`` sources' checkpoints under ``"journal"`` (one object per
source: its cursor and its streams' offsets, see agent/journal_source.py); older agents ignore
the key.

File names are bytes to the kernel and need not be UTF-8. JSON holds text, so ``path`` (and
``real_path``) hold the name as text (``\\xNN`` for each byte that is not UTF-8) and, only for
such a name, ``path_base64`` (``real_path_base64``) holds its exact bytes, which win on load.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from dataclasses import dataclass, fields
from typing import Any

import orjson

from agent.tail import name_base64, name_from_base64, shown
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
    # The mark: a hash of the mark_len bytes just before offset mark_end (at most acked), as
    # shipped. A file is only taken to be this stream again if it still has them.
    mark_end: int = 0
    mark_len: int = 0
    mark_fp: str = ""
    size: int = 0          # the file's size when last seen (what a loss of it would cost)
    real_path: str = ""    # where ``path`` led, if it is a symlink
    # No source matches the file any more (the config changed): where it was left, kept while
    # the file is there, so a source that matches it again resumes it there.
    unfollowed: bool = False


class CheckpointStore:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self.existed = False
        # The journal sources' checkpoints as last loaded or saved (plain objects).
        self.journal: list[dict[str, Any]] = []
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first save

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
                for key in ("path", "real_path"):
                    raw = item.pop(f"{key}_base64", None)
                    if raw is not None:
                        item[key] = name_from_base64(raw)
                cp = Checkpoint(**item)
            except (TypeError, ValueError, AttributeError) as exc:
                log.warning("skipping a malformed checkpoint entry: %s", exc)
                continue
            out[cp.stream] = cp
        return out

    def save(self, checkpoints: list[Checkpoint], journal: list[dict[str, Any]] | None = None) -> None:
        """Save now: returns once the file is durable (after any save still being written).
        Raises OSError from the disk, TypeError/ValueError from the encoding."""
        self.save_soon(checkpoints, journal).result()

    def save_soon(self, checkpoints: list[Checkpoint],
                  journal: list[dict[str, Any]] | None = None) -> concurrent.futures.Future[None]:
        """Take the checkpoints now, write them in the store's thread: the write's two fsyncs
        block nobody (on the event loop they stopped reading and shipping for as long as the
        disk took, once a second). One thread, so saves land in the order they were taken: a
        later one never overwritten by an earlier. The future raises OSError from the disk;
        the encoding's TypeError/ValueError are raised here."""
        doc: dict[str, Any] = {"version": FORMAT_VERSION, "files": [_entry(c) for c in checkpoints]}
        if journal:
            doc["journal"] = journal
        data = orjson.dumps(doc)
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoints")
        done = self._writer.submit(write_atomic, self.path, data)
        self.existed = True
        return done

    def close(self) -> None:
        """Wait for the save being written, then stop the store's thread."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None


# Every field is a plain value: read one by one, not through dataclasses.asdict, whose recursive
# copy was two thirds of a save (a save a second on a busy node).
_FIELDS = tuple(f.name for f in fields(Checkpoint))


def _entry(cp: Checkpoint) -> dict[str, Any]:
    entry = {name: getattr(cp, name) for name in _FIELDS}
    if not cp.unfollowed:
        del entry["unfollowed"]  # only where set: an older agent reads the others as ever
    for key in ("path", "real_path"):
        name = entry[key]
        raw = name_base64(name)
        if raw is not None:
            entry[key] = shown(name)
            entry[f"{key}_base64"] = raw
    return entry
