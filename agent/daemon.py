"""The agent daemon: discovery, reading, shipping, acknowledgements, checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from agent import batch, metrics
from agent.config import AgentConfig, Config, SourceConfig, load_config
from agent.offsets import Checkpoint, CheckpointStore
from agent.status import StatusServer
from agent.tail import FP_LEN, Chunk, Tailer, fingerprint, line_start_before, new_stream_id
from agent.transport import Transport
from agent.watch import Watcher, expand
from fleetlog.runtime import SystemdNotifier, supervise
from fleetlog.tomlconf import ConfigError

log = logging.getLogger("fleetlog.agent")


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cfg = config.agent
        self.store = CheckpointStore(self.cfg.state_dir)
        self.notifier = SystemdNotifier()
        self.ctx: zmq.asyncio.Context | None = None
        self.transport: Transport | None = None
        self.status_server: StatusServer | None = None
        self.watcher: Watcher | None = None
        self.tailers: dict[str, Tailer] = {}            # stream -> tailer
        self.by_inode: dict[tuple[int, int], Tailer] = {}
        self.by_path: dict[str, Tailer] = {}
        # Copies of followed files (copytruncate's app.log.1, a `cp`): identity -> stream copied.
        self.shadows: dict[tuple[int, int], Checkpoint] = {}
        self.unacked: set[Tailer] = set()
        # Bytes shipped and not acknowledged: kept up to date on shipping, recounted whenever
        # acks, resyncs or rewinds move offsets (a sum per batch would cost O(files)).
        self.inflight = 0
        # The file that last had a name, while a new file there has not been found yet.
        self.predecessors: dict[str, Tailer] = {}
        self.ready: deque[Tailer] = deque()
        self.queued: set[Tailer] = set()
        self.wake = asyncio.Event()
        self.acked_event = asyncio.Event()
        self.scan_soon = asyncio.Event()
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.last_ack_progress = time.monotonic()
        self.checkpoints_dirty = True
        # Streams whose identity is not on disk yet: saved before their first batch ships, so a
        # crash can never make the agent ship the same bytes again under a new stream id.
        self.unsaved_streams = False
        self.pending_checkpoints: dict[tuple[int, int], Checkpoint] = {}
        self.first_run = False
        self.lines_shipped = 0
        self.batches_shipped = 0
        self.resends = 0
        self._warned: set[str] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self.metrics: metrics.MetricsServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def startup(self) -> None:
        cps = self.store.load()
        self.first_run = not self.store.existed
        for cp in cps.values():
            self.pending_checkpoints[(cp.dev, cp.ino)] = cp
        self.ctx = zmq.asyncio.Context()
        self.transport = Transport(self.ctx, self.cfg, self.on_event, self.on_hello,
                                   self.hello_args, self.heartbeat_args)
        self.transport.connect()
        self.status_server = StatusServer(self, self.ctx, self.cfg.status_endpoint)
        self.status_server.bind()
        self.metrics = metrics.serve(self)
        self.scan()
        self.resume_rotated_while_down()
        self.watcher = Watcher(self.config.sources, self.on_change, self.cfg.watch_debounce_ms,
                               self.cfg.force_polling, self.cfg.watch_step_ms)
        self.watcher.refresh()
        self._tasks = [
            asyncio.create_task(self.read_loop(), name="read"),
            asyncio.create_task(self.transport.receive_loop(), name="control"),
            asyncio.create_task(self.transport.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.scan_loop(), name="scan"),
            asyncio.create_task(self.checkpoint_loop(), name="checkpoint"),
            asyncio.create_task(self.status_server.serve(), name="status"),
            asyncio.create_task(self.notifier.watchdog(), name="watchdog"),
        ]
        supervise(self._tasks, self.request_stop)
        self.started.set()
        self.notifier.notify("READY=1", f"STATUS=following {len(self.tailers)} files")
        log.info("agent %s ready: %d files from %d sources, %s to %s", self.cfg.name, len(self.tailers),
                 len(self.config.sources), self.cfg.mode, self.cfg.data)

    async def serve(self) -> None:
        await self.startup()
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self.stopping.set()

    def reload(self) -> None:
        """SIGHUP: load, validate, diff, apply. New or changed [[sources]] take effect now (files
        no glob matches any more are finished and let go); [agent] settings need a restart.
        A bad file is reported and the running config stays."""
        if self.config.source.startswith("<"):
            log.info("reload: running on built-in defaults and --set options; nothing to reload")
            return
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return
        if new.agent != self.cfg:
            changed = [f for f in AgentConfig.__dataclass_fields__
                       if getattr(new.agent, f) != getattr(self.cfg, f)]
            log.warning("reload: [agent] %s change only at restart; keeping the running values",
                        ", ".join(changed))
        self.config = Config(agent=self.cfg, sources=new.sources, source=new.source)
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = Watcher(self.config.sources, self.on_change, self.cfg.watch_debounce_ms,
                                   self.cfg.force_polling, self.cfg.watch_step_ms)
            self.watcher.refresh()
        self.scan_soon.set()
        log.info("reloaded %s: %d sources", new.source, len(new.sources))

    async def shutdown(self) -> None:
        """Stop reading, give the aggregator a moment to acknowledge what is in flight, save."""
        self.notifier.notify("STOPPING=1")
        log.info("agent stopping")
        for task in self._tasks:
            if task.get_name() in ("read", "scan"):
                task.cancel()
        if self.watcher is not None:
            self.watcher.stop()
        deadline = time.monotonic() + min(self.cfg.shutdown_timeout_s, self.cfg.ack_timeout_ms / 1000 + 1)
        while self.unacked and time.monotonic() < deadline:
            self.acked_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.acked_event.wait(), timeout=deadline - time.monotonic())
        if self.unacked:
            log.info("%d bytes shipped but not acknowledged; they are shipped again at restart",
                     self.inflight_bytes())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.save_checkpoints()
        for t in self.tailers.values():
            t.close()
        if self.status_server is not None:
            self.status_server.close()
        if self.transport is not None:
            self.transport.close()
        if self.ctx is not None:
            self.ctx.term()
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()
        log.info("agent stopped")

    # -- discovery -----------------------------------------------------------------------------

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
            if fingerprint(t.fd, t.fp_len)[0] != t.fp:
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
        for t in self.tailers.values():
            if t.partial_since is not None or t.multiline_since is not None:
                self.enqueue(t)

    # -- reading and shipping -------------------------------------------------------------------

    def enqueue(self, t: Tailer) -> None:
        if t not in self.queued:
            self.queued.add(t)
            self.ready.append(t)
            self.wake.set()

    def inflight_bytes(self) -> int:
        return sum(t.ship_pos - t.acked for t in self.unacked)

    async def read_loop(self) -> None:
        cfg = self.cfg
        delay = cfg.batch_max_delay_ms / 1000
        timers_every = 0.1
        last_timers = 0.0
        while True:
            now = time.monotonic()
            if now - last_timers > timers_every:
                last_timers = now
                self.rearm_timers()
                self.check_ack_timeout(now)
            if self.unacked and self.inflight >= cfg.max_inflight_bytes:
                self.acked_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.acked_event.wait(), timeout=timers_every)
                continue
            if not self.ready:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=timers_every)
                continue
            t = self.ready.popleft()
            if t.next_read > now:
                self.ready.append(t)
                if all(x.next_read > now for x in self.ready):
                    await asyncio.sleep(min(x.next_read for x in self.ready) - now)
                continue
            self.queued.discard(t)
            if t.fd is None and not t.open():
                continue
            if t.predecessor is not None and self.predecessor_first(t):
                continue
            try:
                chunk = t.read(cfg.batch_max_bytes, cfg.batch_max_lines, now,
                               final=t.rotated_at is not None and t.successor_waiting)
            except OSError as exc:
                log.warning("reading %s failed: %s", t.path, exc)
                continue
            if chunk is None:
                continue
            await self.ship(t, chunk, now, delay)

    async def ship(self, t: Tailer, chunk: Chunk, now: float, delay: float) -> None:
        cfg = self.cfg
        if self.unsaved_streams:
            self.save_checkpoints()
        frames = batch.frames_for(cfg.name, t, chunk)
        t.seq += 1
        self.inflight += max(0, chunk.end - max(t.ship_pos, t.acked))
        t.ship_pos = chunk.end
        if chunk.end > t.acked:
            if not self.unacked:
                self.last_ack_progress = now
            self.unacked.add(t)
        self.lines_shipped += len(chunk.lines)
        self.batches_shipped += 1
        read_full = chunk.end - chunk.start >= cfg.batch_max_bytes // 2 or \
            len(chunk.lines) >= cfg.batch_max_lines
        t.next_read = batch.next_read_at(now, delay, read_full)
        if read_full:
            self.enqueue(t)
        elif Tailer.open_files > cfg.max_open_files and t.rotated_at is None:
            t.close()  # read to its end: reopened by name when it changes
        assert self.transport is not None
        await self.transport.send(frames)

    def predecessor_first(self, t: Tailer) -> bool:
        """Read a rotated file to its end before the file that took its name, so a topic keeps
        the order the application wrote in. True if ``t`` has to wait (it is queued again)."""
        p = t.predecessor
        assert p is not None
        if self.tailers.get(p.stream) is not p or p.fd is None:
            t.predecessor = None
            return False
        try:
            unread = os.fstat(p.fd).st_size > p.ship_pos
        except OSError:
            unread = False
        if not unread:
            if p not in self.unacked:
                p.successor_waiting = False
                return False
            # Also wait for its acknowledgement: a resync may still send it back a few batches.
            t.next_read = time.monotonic() + 0.01
            self.enqueue(t)
            return True
        p.successor_waiting = True
        self.enqueue(p)
        self.enqueue(t)
        return True

    def check_ack_timeout(self, now: float) -> None:
        """Nothing acknowledged for ack_timeout_ms while batches are out: ship them again."""
        if not self.unacked or now - self.last_ack_progress < self.cfg.ack_timeout_ms / 1000:
            return
        assert self.transport is not None
        if not self.transport.aggregator_alive(3 * self.cfg.heartbeat_interval_ms / 1000):
            return  # nobody to resend to: ship again once it answers (a restart also rewinds)
        self.resends += 1
        log.info("no acknowledgement for %.1fs; shipping %d bytes again",
                 now - self.last_ack_progress, self.inflight_bytes())
        for t in list(self.unacked):
            t.rewind(t.acked)
            self.enqueue(t)
        self.unacked.clear()
        self.inflight = 0
        self.last_ack_progress = now

    # -- acknowledgements -----------------------------------------------------------------------

    def on_event(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "ack":
            streams = msg.get("streams")
            if isinstance(streams, dict):
                for stream, end in streams.items():
                    self.ack(stream, end)
        elif event == "resync":
            self.resync(msg.get("stream"), msg.get("offset"), msg.get("seq"))
        self.inflight = self.inflight_bytes()

    def ack(self, stream: str, end: Any) -> None:
        t = self.tailers.get(stream)
        if t is None or type(end) is not int or end <= t.acked:
            return
        t.acked = end
        if t.ship_pos < end:
            t.ship_pos = end
        if t.ship_pos == t.acked:
            self.unacked.discard(t)
        self.last_ack_progress = time.monotonic()
        self.checkpoints_dirty = True
        self.acked_event.set()

    def resync(self, stream: Any, offset: Any, seq: Any) -> None:
        """The aggregator expects this stream to continue at ``offset``."""
        t = self.tailers.get(stream) if isinstance(stream, str) else None
        if t is None or type(offset) is not int or type(seq) is not int or seq < t.rewind_seq:
            return  # unknown or stale (sent before our last rewind)
        if offset < t.acked:
            # The aggregator lost what it had acknowledged (its state_dir was lost): start the
            # stream again from what we know is durable, rather than shipping it all twice.
            log.warning("aggregator asks for %s from %d but acknowledged %d before; rebasing",
                        t.path, offset, t.acked)
            t.base = t.acked
            offset = t.acked
            self.unsaved_streams = True
        self.resends += 1
        t.rewind(offset)
        if t.ship_pos > t.acked:
            self.unacked.add(t)
        else:
            self.unacked.discard(t)
        self.enqueue(t)

    def on_hello(self, result: dict[str, Any], restarted: bool) -> None:
        committed = result.get("committed")
        if isinstance(committed, dict):
            for stream, end in committed.items():
                self.ack(stream, end)
        if restarted:
            log.info("aggregator restarted: shipping everything not acknowledged again")
            for t in list(self.unacked):
                t.rewind(t.acked)
                self.enqueue(t)
            self.unacked.clear()
        self.inflight = self.inflight_bytes()
        log.info("connected to aggregator %s", result.get("instance"))

    def hello_args(self) -> dict[str, Any]:
        return {"agent": self.cfg.name, "mode": self.cfg.mode, "streams": list(self.tailers)}

    def heartbeat_args(self) -> dict[str, Any]:
        return {"agent": self.cfg.name, "mode": self.cfg.mode, "lag_bytes": self.lag_bytes(),
                "files": len(self.tailers)}

    def lag_bytes(self) -> int:
        return sum(t.lag_bytes for t in self.tailers.values())

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoints(self) -> list[Checkpoint]:
        now = time.time()
        out = [Checkpoint(t.stream, t.source.topic, t.path, t.dev, t.ino, t.fp, t.fp_len, t.base,
                          t.acked, t.seq, now) for t in self.tailers.values()]
        return out + list(self.shadows.values())

    def save_checkpoints(self) -> None:
        try:
            self.store.save(self.checkpoints())
            self.checkpoints_dirty = False
            self.unsaved_streams = False
        except OSError as exc:
            log.error("cannot save checkpoints to %s: %s", self.store.path, exc)

    async def checkpoint_loop(self) -> None:
        # Saved on the loop thread on purpose: a save from another thread could land after a
        # newer one and bring back a list without a stream that already shipped.
        while True:
            await asyncio.sleep(self.cfg.checkpoint_interval_ms / 1000)
            if self.checkpoints_dirty:
                self.save_checkpoints()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        files = []
        for t in sorted(self.tailers.values(), key=lambda t: t.path):
            if t.fd is not None:
                with contextlib.suppress(OSError):
                    t.size = os.fstat(t.fd).st_size
            files.append({"path": t.path, "topic": t.source.topic, "stream": t.stream,
                          "identity": t.identity, "offset": t.acked, "shipped": t.ship_pos,
                          "size": t.size, "lag_bytes": t.lag_bytes, "open": t.fd is not None,
                          "rotated": t.rotated_at is not None, "cut_lines": t.cut_lines,
                          "discarded_bytes": t.discarded_bytes})
        transport = self.transport
        return {
            "agent": self.cfg.name, "mode": self.cfg.mode, "data": self.cfg.data,
            "aggregator": transport.instance if transport else None,
            "files": files, "lag_bytes": sum(f["lag_bytes"] for f in files),
            "inflight_bytes": self.inflight_bytes(), "lines_shipped": self.lines_shipped,
            "batches_shipped": self.batches_shipped, "resends": self.resends,
            "open_files": sum(1 for t in self.tailers.values() if t.fd is not None),
            "copies_ignored": len(self.shadows),
        }
