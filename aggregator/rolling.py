"""Rolling the per-topic files over: by size and UTC time, on request, and after a crash.

A mixin of ``Aggregator`` (aggregator/daemon.py). A rotation is journaled twice (the intent,
with every topic's committed position, before the rename; its end after), so a crash at any
point is finished at start by ``recover_rotations``; compression runs in its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.journal import Journal
from aggregator.writer import CompressionCancelled, RollingFileSink, compress_file

log = logging.getLogger("fleetlog.aggregator")


class Rolling:
    """Expects the attributes ``Aggregator.__init__`` sets."""

    cfg: AggregatorConfig
    clock: Callable[[], float]
    sink: RollingFileSink
    journal: Journal
    pending: dict[str, int]
    pending_bytes: int
    _compressor: concurrent.futures.ThreadPoolExecutor
    _compressions: set[asyncio.Future[Any]]
    _compress_cancel: threading.Event

    def owe_ack(self, agent: str, stream: str, end: int) -> None:
        raise NotImplementedError

    def rotate_due(self, force: set[str | None] | None = None) -> list[str]:
        cfg = self.cfg
        force = force or set()
        rotated = []
        # Forced rotations also reach topics not written to since the start or a reopen.
        for topic in (set(self.sink.topics_on_disk()) if None in force else force) - {None}:
            if topic not in self.sink.files:
                self.sink.open_existing(topic)  # type: ignore[arg-type]
        for topic in list(self.sink.files):
            if topic in force or None in force or self.sink.due(
                    topic, cfg.rotate_max_bytes, cfg.rotate_interval_s):
                if self.sink.files[topic].size == 0:
                    continue
                rotated.append(self.rotate(topic))
        return rotated

    def rotate(self, topic: str) -> str:
        """Roll one topic over. Only called right after a commit, so the file holds nothing
        uncommitted except what arrived meanwhile, which is committed first here."""
        tf = self.sink.files[topic]
        # Batches accepted since the commit (any topic) go into this record: make them all durable.
        self.sink.sync_files([tf, *(f for f in self.sink.dirty_files() if f is not tf)])
        name = self.sink.rotate_name(topic)
        pending, self.pending = self.pending, {}
        self.pending_bytes = 0
        self.journal.append(self.sink.positions(), pending,
                            rotations={topic: {"name": name, "size": tf.size}})
        for key, end in pending.items():
            agent, _, stream = key.partition("\x1f")
            self.owe_ack(agent, stream, end)
        self.sink.rename_active(topic, name)
        self.journal.append({topic: 0}, {}, rotations={topic: None})
        log.info("rotated %s to %s", topic, name)
        self._compress_later(os.path.join(self.cfg.output_dir, topic, name))
        self.apply_retention(topic)
        return name

    def recover_rotations(self, rotations: dict[str, Any]) -> None:
        """Finish a rotation a crash interrupted (the journal holds its intent)."""
        for topic, info in list(rotations.items()):
            name, size = info["name"], info["size"]
            directory = os.path.join(self.cfg.output_dir, topic)
            active = os.path.join(directory, f"{topic}.log")
            target = os.path.join(directory, name)
            if not os.path.exists(target) and os.path.exists(active):
                os.truncate(active, size)
                os.rename(active, target)
            elif os.path.exists(active):
                os.truncate(active, 0)  # written after the rename, never committed
            if os.path.exists(target) and os.path.getsize(target) > size:
                os.truncate(target, size)
            self.journal.append({topic: 0}, {}, rotations={topic: None})
            log.warning("finished the rotation of %s to %s that a crash interrupted", topic, name)

    def _compress_later(self, path: str) -> None:
        if self.cfg.compress != "gzip" or path.endswith(".gz"):
            return
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(loop.run_in_executor(
            self._compressor, compress_file, path, self._compress_cancel))
        self._compressions.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._compressions.discard(t)
            if t.cancelled() or isinstance(t.exception(), CompressionCancelled):
                return  # stopping: the next start compresses it again
            if t.exception() is not None:
                log.warning("compressing %s failed (it stays uncompressed): %s", path, t.exception())

        task.add_done_callback(done)

    def apply_retention(self, topic: str) -> None:
        cfg = self.cfg
        names = self.sink.rotated_files(topic)
        directory = os.path.join(cfg.output_dir, topic)
        doomed = set(names[: max(0, len(names) - cfg.retain_files)]) if cfg.retain_files else set()
        if cfg.retain_days:
            horizon = self.clock() - cfg.retain_days * 86400
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    if os.path.getmtime(os.path.join(directory, name)) < horizon:
                        doomed.add(name)
        for name in sorted(doomed):
            # Both forms: a compression in progress, seeing its original gone, removes its result.
            for form in {name, name.removesuffix(".gz")}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, form))
                    log.info("retention removed %s/%s", topic, form)
