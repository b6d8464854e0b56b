"""Following files: finding them, telling them apart, and what renames, truncations, copies
and deletions mean for each followed stream.

A mixin of ``Agent`` (agent/daemon.py), kept apart because it is the part of the agent with the
most cases: the reading, shipping and acknowledgement loop lives in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque

from agent.config import AgentConfig, Config, SourceConfig
from agent.offsets import Checkpoint
from agent.tail import FP_LEN, Tailer, fingerprint, line_start_before, new_stream_id
from agent.watch import Watcher, expand

log = logging.getLogger("fleetlog.agent")


class Following:
    """File discovery and identity; expects the attributes ``Agent.__init__`` sets."""

    config: Config
    cfg: AgentConfig
    tailers: dict[str, Tailer]
    by_inode: dict[tuple[int, int], Tailer]
    by_path: dict[str, Tailer]
    shadows: dict[tuple[int, int], Checkpoint]
    predecessors: dict[str, Tailer]
    pending_checkpoints: dict[tuple[int, int], Checkpoint]
    unacked: set[Tailer]
    timed: set[Tailer]
    queued: set[Tailer]
    ready: deque[Tailer]
    inflight: int
    checkpoints_dirty: bool
    unsaved_streams: bool
    first_run: bool
    started: asyncio.Event
    scan_soon: asyncio.Event
    watcher: Watcher | None
    _warned: set[str]

    def enqueue(self, t: Tailer) -> None:
        raise NotImplementedError

    def inflight_bytes(self) -> int:
        raise NotImplementedError

    def scan(self) -> None:
        """Find new files, notice renames, truncations and files that went away."""
        now = time.monotonic()
        found: set[tuple[int, int]] = set()
        new: list[tuple[SourceConfig, str, os.stat_result]] = []
        for source in self.config.sources:
            for path, st in expand(source):
                ident = (st.st_dev, st.st_ino)
                found.add(ident)
                t = self.by_inode.get(ident)
                if t is None:
                    if ident not in self.shadows:
                        new.append((source, path, st))
                    continue
                if t.path != path:
                    self.renamed(t, path)
                self.check_size(t, st.st_size)
        for t in list(self.tailers.values()):
            if t.rotated_at is None and (t.dev, t.ino) not in found:
                self.lost_name(t, now)
            elif t.rotated_at is not None:
                self.maybe_forget(t, now)
        # New files last, so that a file that took a rotated one's name knows its predecessor.
        for source, path, st in new:
            self.discover(source, path, st)
        self.enforce_fd_limit(now)

    def renamed(self, t: Tailer, path: str) -> None:
        log.info("%s was renamed to %s; following it there", t.path, path)
        if self.by_path.get(t.path) is t:
            del self.by_path[t.path]
        self.predecessors[t.path] = t
        t.path = path
        t.rotated_at = None
        self.by_path[path] = t

    def discover(self, source: SourceConfig, path: str, st: os.stat_result) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("cannot read %s: %s", path, exc.strerror)
            return
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        fp, fp_len = fingerprint(fd)
        cp = self.pending_checkpoints.pop(ident, None)
        if cp is not None and fingerprint(fd, cp.fp_len)[0] == cp.fp:
            if cp.shadow:
                os.close(fd)
                self.shadows[ident] = cp
                return
            t = self._tailer_from(cp, source, path)
        else:
            if cp is not None:
                log.info("%s: inode reused by a new file; reading it from the start", path)
            twin = self._copy_of(fp, fp_len, ident)
            if twin is not None:
                os.close(fd)
                log.info("%s is a copy of %s (same first %d bytes); not shipping it again",
                         path, twin.path, FP_LEN)
                self.shadows[ident] = Checkpoint(twin.stream, twin.source.topic, path, ident[0], ident[1],
                                                 fp, fp_len, twin.base, twin.acked, twin.seq, shadow=True)
                self.checkpoints_dirty = True
                return
            start = 0
            if source.start_at == "end" and self.first_run and not self.started.is_set():
                start = line_start_before(fd, st.st_size)
            t = Tailer(source=source, path=path, stream=new_stream_id(), dev=ident[0], ino=ident[1],
                       fp=fp, fp_len=fp_len, base=start, acked=start)
        pred = self.predecessors.pop(path, None)
        if pred is not None and self.tailers.get(pred.stream) is pred:
            t.predecessor = pred
        t.attach(fd, st.st_size)
        if Tailer.open_files > self.cfg.max_open_files:
            t.close()  # read (and reopened by name) when its turn comes
        self.add(t)
        log.debug("following %s from %d (stream %s)", path, t.ship_pos, t.stream)

    def _tailer_from(self, cp: Checkpoint, source: SourceConfig, path: str) -> Tailer:
        return Tailer(source=source, path=path, stream=cp.stream, dev=cp.dev, ino=cp.ino, fp=cp.fp,
                      fp_len=cp.fp_len, base=cp.base, acked=cp.acked, seq=cp.seq)

    def _copy_of(self, fp: str, fp_len: int, ident: tuple[int, int]) -> Tailer | None:
        """A followed file with the same first FP_LEN bytes but another inode: this is a copy."""
        if fp_len < FP_LEN:
            return None  # too short to tell a copy from a file that merely starts alike
        for t in self.tailers.values():
            if t.fp == fp and t.fp_len == fp_len and (t.dev, t.ino) != ident:
                return t
        return None

    def add(self, t: Tailer) -> None:
        self.unsaved_streams = True
        self.tailers[t.stream] = t
        self.by_inode[(t.dev, t.ino)] = t
        self.by_path[t.path] = t
        self.checkpoints_dirty = True
        self.enqueue(t)

    def forget(self, t: Tailer) -> None:
        t.close()
        self.tailers.pop(t.stream, None)
        if self.by_inode.get((t.dev, t.ino)) is t:
            del self.by_inode[(t.dev, t.ino)]
        if self.by_path.get(t.path) is t:
            del self.by_path[t.path]
        self.unacked.discard(t)
        self.inflight = self.inflight_bytes()
        self.queued.discard(t)
        self.checkpoints_dirty = True

    def check_size(self, t: Tailer, size: int) -> None:
        if size < t.ship_pos or not self.same_head(t, size):
            self.truncated(t)
        elif size > t.ship_pos or t.partial_since is not None or t.multiline_since is not None:
            self.enqueue(t)

    def same_head(self, t: Tailer, size: int) -> bool:
        """Whether the file still starts with the bytes it started with: a file truncated and
        written again past our offset before we looked has another head. Short heads are
        extended once the file is long enough, so copies of it can be recognised."""
        if t.fd is None or t.rotated_at is not None:
            return True
        try:
            if not t.head_unchanged():
                return False
            if t.fp_len < FP_LEN and size > t.fp_len:
                t.fp, t.fp_len = fingerprint(t.fd)
                self.checkpoints_dirty = True
        except OSError:
            pass
        return True

    def truncated(self, t: Tailer) -> None:
        """copytruncate or `> file`: the content restarts at 0 as a new stream. Bytes shipped but
        not acknowledged are looked for in a copy next to it (copytruncate's app.log.1)."""
        if not t.open():
            return
        old = Checkpoint(t.stream, t.source.topic, t.path, t.dev, t.ino, t.fp, t.fp_len, t.base,
                         t.acked, t.seq)
        fp, fp_len = fingerprint(t.fd)  # type: ignore[arg-type]
        log.info("%s was truncated at %d (acked %d); reading it again from 0", t.path, t.ship_pos, t.acked)
        self.unacked.discard(t)
        self.inflight = self.inflight_bytes()
        t.restart_stream(fp, fp_len)
        self.unsaved_streams = True
        self.tailers = {s: x for s, x in self.tailers.items() if x is not t}
        self.tailers[t.stream] = t
        t.predecessor = self.promote_copy(old)
        self.checkpoints_dirty = True
        self.enqueue(t)

    def promote_copy(self, old: Checkpoint) -> Tailer | None:
        """Finish a truncated stream from its copy, if the copy holds more than was acknowledged."""
        for ident, shadow in list(self.shadows.items()):
            if shadow.stream == old.stream:
                return self._finish_from_copy(ident, shadow.path, old)
        directory = os.path.dirname(old.path)
        prefix = os.path.basename(old.path)
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name.startswith(prefix) and path != old.path:
                    with contextlib.suppress(OSError):
                        st = os.stat(path)
                        if st.st_size > old.acked and self._head_matches(path, old):
                            return self._finish_from_copy((st.st_dev, st.st_ino), path, old)
        return None

    @staticmethod
    def _head_matches(path: str, cp: Checkpoint) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return fingerprint(fd, cp.fp_len)[0] == cp.fp
        finally:
            os.close(fd)

    def _finish_from_copy(self, ident: tuple[int, int], path: str, old: Checkpoint) -> Tailer | None:
        self.shadows.pop(ident, None)
        if ident in self.by_inode:
            return None
        source = next((s for s in self.config.sources if s.topic == old.topic), self.config.sources[0])
        t = Tailer(source=source, path=path, stream=old.stream, dev=ident[0], ino=ident[1], fp=old.fp,
                   fp_len=old.fp_len, base=old.base, acked=old.acked, seq=old.seq)
        if not t.open():
            return None
        t.rotated_at = time.monotonic()
        log.info("finishing %s's lines from %d in its copy %s", old.path, old.acked, path)
        self.tailers[t.stream] = t
        self.by_inode[ident] = t
        self.unsaved_streams = True
        self.enqueue(t)
        return t

    def lost_name(self, t: Tailer, now: float) -> None:
        """No glob match leads to this file any more: it was rotated away or deleted."""
        if self.by_path.get(t.path) is t:
            del self.by_path[t.path]
        self.predecessors[t.path] = t
        if t.fd is None:
            found = self.find_in_dir(t)
            if found is None:
                log.info("%s is gone (acked %d of it)", t.path, t.acked)
                self.forget(t)
                return
            t.path = found
            t.open()
        t.rotated_at = now
        log.info("%s was rotated away; reading it to its end", t.path)
        self.enqueue(t)

    def find_in_dir(self, t: Tailer | Checkpoint) -> str | None:
        """The file's new name in its own directory (a rename that left the glob), by inode."""
        directory = os.path.dirname(t.path)
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == (t.dev, t.ino):
                        return entry.path
        return None

    def resume_rotated_while_down(self) -> None:
        """Checkpointed files that no glob matches now: rotated while the agent was down."""
        pending, self.pending_checkpoints = self.pending_checkpoints, {}
        for cp in pending.values():
            if cp.shadow:
                continue
            path = self.find_in_dir(cp)
            if path is None or not self._head_matches(path, cp):
                log.info("%s (stream %s) is gone since the last run; acked %d", cp.path, cp.stream, cp.acked)
                continue
            source = next((s for s in self.config.sources if s.topic == cp.topic), None)
            if source is None:
                continue
            t = self._tailer_from(cp, source, path)
            if t.open():
                t.rotated_at = time.monotonic()
                log.info("finishing %s, rotated while the agent was down, from %d", path, cp.acked)
                self.tailers[t.stream] = t
                self.by_inode[(t.dev, t.ino)] = t
                successor = self.by_path.get(cp.path)
                if successor is not None and successor.predecessor is None:
                    successor.predecessor = t
                self.enqueue(t)

    def maybe_forget(self, t: Tailer, now: float) -> None:
        """Let a rotated-away file go once it is read to its end, acknowledged and quiet."""
        if t.fd is not None:
            try:
                st = os.fstat(t.fd)
            except OSError:
                st = None
            if st is not None and st.st_size > t.ship_pos:
                self.enqueue(t)
                return
            if st is not None and st.st_nlink > 0 and now - t.last_data < self.cfg.rotated_keep_s:
                return
        if t.ship_pos == t.acked and t not in self.unacked:
            log.info("done with rotated %s at %d", t.path, t.acked)
            self.forget(t)

    def enforce_fd_limit(self, now: float) -> None:
        """Close files idle for idle_close_s (they reopen when they change), and the least
        recently active ones when more than max_open_files are open."""
        open_tailers = [t for t in self.tailers.values() if t.fd is not None]
        idle = [t for t in open_tailers if t.rotated_at is None and t not in self.queued
                and t not in self.unacked and t.size == t.ship_pos]
        for t in idle:
            if now - t.last_data > self.cfg.idle_close_s:
                t.close()
        open_count = sum(1 for t in self.tailers.values() if t.fd is not None)
        excess = open_count - self.cfg.max_open_files
        if excess > 0:
            for t in sorted((t for t in idle if t.fd is not None), key=lambda t: t.last_data)[:excess]:
                t.close()

    def on_change(self, paths: set[str]) -> None:
        unknown = False
        for path in paths:
            t = self.by_path.get(path)
            if t is None:
                unknown = True
                continue
            if t.fd is None and not t.open():
                unknown = True
                continue
            try:
                self.check_size(t, os.fstat(t.fd).st_size)  # type: ignore[arg-type]
            except OSError:
                continue
            self.enqueue(t)
        if unknown:
            self.scan_soon.set()

    async def scan_loop(self) -> None:
        interval = self.cfg.rescan_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.scan_soon.wait(), timeout=interval)
            self.scan_soon.clear()
            self.scan()
            self.rearm_timers()
            if self.watcher is not None:
                self.watcher.refresh()
            await asyncio.sleep(0.01)  # coalesce bursts of new-file events

    def rearm_timers(self) -> None:
        for t in list(self.timed):
            if (t.partial_since is None and t.multiline_since is None) or \
                    self.tailers.get(t.stream) is not t:
                self.timed.discard(t)
            else:
                self.enqueue(t)
