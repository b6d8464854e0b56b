"""The aggregator daemon: binds the sockets, accepts batches, commits, acknowledges."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from aggregator import metrics, proxy, registry
from aggregator.acceptance import Acceptance
from aggregator.agents import AgentInfo, AgentRegistry
from aggregator.commit import GroupCommit
from aggregator.config import Config, load_config
from aggregator.control import ControlServer
from aggregator.files import (
    Hold,
    RollingFileSink,
    SinkError,
    key_topic,
    open_files_bound,
    uncompressed_rotated,
)
from aggregator.flow import FlowControl
from aggregator.holds import Holds
from aggregator.ingest import Ingest
from aggregator.journal import DurableState, Journal
from aggregator.rolling import Rolling
from aggregator.security import Guard
from aggregator.sink import Sink
from aggregator.status import StatusReport, TopicStats, Totals
from fleetlog import curve, wire
from fleetlog.dirlock import DirectoryLock
from fleetlog.runtime import SystemdNotifier, Wakeup, raise_open_files_limit, start_zmq_threads, supervise
from fleetlog.tomlconf import ConfigError

if TYPE_CHECKING:
    from aggregator.jetstream import JetStreamSink

log = logging.getLogger("fleetlog.aggregator")


class Aggregator(Ingest, Acceptance, GroupCommit, FlowControl, AgentRegistry, Holds, StatusReport, Rolling):
    """The aggregator: its state, its lifecycle (start, stop, reload) and its stages, one mixin
    each (aggregator/stages.py says which module is which)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 overrides: list[str] | None = None) -> None:
        self.config = config
        # --set items of the command line: applied again on every reload.
        self.overrides = list(overrides or [])
        self.cfg = config.aggregator
        self.clock = clock
        self.instance = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.started_wall = clock()
        self.ctx: zmq.asyncio.Context | None = None
        self.sink = RollingFileSink(self.cfg.output_dir, clock=clock)
        # sink = "jetstream": accepted batches are published to NATS JetStream and no file is
        # written here (fleetlog-writer makes them); the journal's state is then kept in memory
        # only, as the table of what JetStream acknowledged (aggregator/commit.py).
        self.stream_sink: JetStreamSink | None = None
        if self.cfg.sink == "jetstream":
            # Imported only here: nats-py and the sink cost a files-only aggregator 4.3 MiB of RSS.
            from aggregator.jetstream import JetStreamSink
            self.stream_sink = JetStreamSink(self.cfg.jetstream, clock=clock,
                                             name=f"fleetlog-aggregator {self.instance}")
        self.out: Sink = self.sink if self.stream_sink is None else self.stream_sink
        self.locks = [DirectoryLock(self.cfg.state_dir, "aggregator.state_dir")]
        if self.stream_sink is None:
            self.locks.append(DirectoryLock(self.cfg.output_dir, "aggregator.output_dir"))
        self.journal = Journal(self.cfg.state_dir, stream_ttl_s=self.cfg.stream_ttl_s)
        self.notifier = SystemdNotifier()
        self.guard = Guard(self.cfg)
        self.agents: dict[str, AgentInfo] = {}
        self.topics: dict[str, TopicStats] = {}
        self.totals = Totals()
        # Next expected start offset of each stream (accepted, maybe not yet durable).
        self.accepted: dict[str, int] = {}
        # Accepted since the last commit: key -> end; acks owed to agents: agent -> {stream: end}.
        self.pending: dict[str, int] = {}
        self.pending_bytes = 0
        # Bytes of each agent accepted since the last commit; set when one has half its window
        # there (aggregator/ingest.py, count): the next commit is due at once.
        self.uncommitted_bytes: dict[str, int] = {}
        self.commit_soon = False
        self.owed_acks: dict[str, dict[str, int]] = {}
        # Flow control: agents catching up (lag of at least wire.MIN_WINDOW) share the window budget;
        # ``window`` is each one's share, ``granted`` the sum of the windows granted.
        self.catching_up = 0
        self.window: int | None = None
        self.granted = 0
        self.share_window()
        self.disk_error: str | None = None
        # Failed writes (see refuse()): the journal's hold stops everything, a topic's hold
        # (in sink.held) only that topic; ``refusing`` is the one test on the hot path.
        self.state_error: Hold | None = None
        self.refusing = False
        # Streams with batches refused or taken back: key -> (agent, stream, seq of the last
        # refused batch or None, topic, offset we expect); asked to resend once they can be taken.
        self.refused: dict[str, tuple[str, str, int | None, str, int]] = {}
        # The topic of each stream's accepted batches (one topic's failure takes back its streams).
        self.stream_topic: dict[str, str] = {}
        self.descriptors_short_at: float | None = None
        self._holds_unlogged = 0
        self.commit_wake = Wakeup()
        # The commit loop is asleep with nothing to do: the next accepted batch wakes it.
        self.commit_idle = False
        self.readable: dict[str, Wakeup] = {}
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._warned_peers: set[tuple[str, str]] = set()
        self._registry_error = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._compressions: set[asyncio.Future[Any]] = set()
        # Its own thread: a backlog of big files to compress never delays a commit's fsync.
        self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
        # Set at shutdown: a compression stops within one chunk (the next start redoes it).
        self._compress_cancel = threading.Event()
        # Retention passes run in a thread, one at a time (aggregator/rolling.py).
        self._retention: asyncio.Future[Any] | None = None
        self._retain_waiting: set[str] = set()
        self._retain_all = False
        self._ahead_warned: set[str] = set()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.control: ControlServer | None = None
        # Prefixes XPUB subscribers asked for: no subscriber, nothing to publish.
        self.subscriptions: set[bytes] = set()
        self.commit_lock = asyncio.Lock()
        self.commit_latency = metrics.LatencyHistogram()
        # How late the loop ran its timers (aggregator/status.py, note_stall): the longest since
        # start, and per 10 s window (this one and the last), so status shows stalls (a blocking
        # call on the loop).
        self.loop_stall_max_s = 0.0
        self.loop_stall_windows = [0.0, 0.0]
        self._stall_window_end = time.monotonic() + 10
        self.metrics: metrics.MetricsServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.cfg
        if self.stream_sink is None:
            os.makedirs(cfg.output_dir, exist_ok=True)
        os.makedirs(cfg.state_dir, exist_ok=True)
        # Before reading or repairing anything: a second aggregator on the same directories
        # would replay the journal and cut the live one's files back.
        for lock in self.locks:
            if not lock.same_directory_as(self.locks[0]) or lock is self.locks[0]:
                lock.acquire()  # (output_dir may be state_dir itself, by another path)
        self.guard.load(cfg)
        limit = raise_open_files_limit()
        self.sink.max_open = open_files_bound(limit)
        log.info("descriptor limit %d: up to %d topic files open at once", limit, self.sink.max_open)
        if self.stream_sink is None:
            leftovers = await self.recover_files()
        else:
            leftovers = []
            await self.stream_sink.start()
        self.remember(registry.load(cfg.state_dir))
        self.ctx = zmq.asyncio.Context()
        start_zmq_threads(self.ctx)
        self.guard.start(self.ctx)
        self.sockets = proxy.bind_data_sockets(self.ctx, cfg, self.guard.protect)
        self.control = ControlServer(self, self.ctx, cfg.control, self.guard)
        self.control.bind()
        self.metrics = metrics.serve(self)
        for name in leftovers:
            self._compress_later(name)
        self._tasks = [
            asyncio.create_task(self.receive_loop(self.sockets["pull"], "pull"), name="pull"),
            asyncio.create_task(self.receive_loop(self.sockets["xsub"], "xsub"), name="xsub"),
            asyncio.create_task(proxy.forward_subscriptions(
                self.sockets["xpub"], self.sockets["xsub"], self.subscriptions,
                lambda: self.readable["xsub"].set()), name="subscriptions"),
            asyncio.create_task(self.control.serve(), name="control"),
            asyncio.create_task(self.commit_loop(), name="commit"),
            asyncio.create_task(self.ticker(), name="ticker"),
            asyncio.create_task(self.loop_probe(), name="loop-probe"),
            asyncio.create_task(self.notifier.watchdog(), name="watchdog"),
        ]
        supervise(self._tasks, self.request_stop)
        self.ready.set()
        self.notifier.notify("READY=1", f"STATUS=listening; {len(self.accepted)} streams known")
        log.info("aggregator %s ready: pull %s, xsub %s, xpub %s, control %s; output %s",
                 self.instance, cfg.pull, cfg.xsub, cfg.xpub, ", ".join(cfg.control),
                 cfg.output_dir if self.stream_sink is None else
                 f"JetStream stream {cfg.jetstream.stream} on {', '.join(cfg.jetstream.servers)}")

    async def recover_files(self) -> list[str]:
        """sink = "files": recover the journal, cut the topic files back to their last commit,
        finish rotations a crash interrupted. Returns the rotated files left uncompressed."""
        cfg = self.cfg
        journal_existed = os.path.exists(self.journal.journal_path)
        state = self.journal.recover()
        # Streams idle for longer than stream_ttl_s are forgotten here and at each compaction
        # (a full state_dir only postpones it).
        self.journal.compact_quietly()
        if state.damage is None:
            self.recover_rotations(state.rotations)
            positions = dict(state.topics)
            if journal_existed:
                # A topic's first batches are written before its first commit: after a crash in
                # between no record names it, and its whole active file is uncommitted (agents
                # resend it). Without a journal (a new or lost state_dir) nothing can be known.
                for topic in self.sink.keys_on_disk():
                    positions.setdefault(topic, 0)
            self.sink.recover(positions)
        else:
            self.rebuild_journal(state)
        # Before anything is compressed: the scan removes stale temporaries, and must not take
        # one a compression started below is still writing.
        leftovers = uncompressed_rotated(cfg.output_dir)
        # A file whose period ended while we were down rolls over before it takes a new line.
        for topic in self.sink.keys_on_disk():
            if wire.valid_topic(key_topic(topic)):
                self.sink.open_existing(topic)
        await self.rotate_due()
        self.accepted = {k: int(v[0]) for k, v in state.streams.items()}
        return leftovers

    def rebuild_journal(self, state: DurableState) -> None:
        """After damage (not a crash's torn tail) the journal may have lost commits that were
        acknowledged: keep every topic file whole and record its length as committed. Lines
        after the last commit the journal still knew may then appear twice (agents resend what
        was not acknowledged); none is lost. Agents whose acknowledged offsets are past what
        the journal knows continue from there (see take_agents_base)."""
        extra = self.sink.uncommitted(state.topics)
        before = dict(state.topics)
        sizes = {topic: before.get(topic, 0) + n for topic, n in extra.items()}
        if state.rotations:
            log.error("journal damaged: not finishing the rotations it names (%s); their active"
                      " files are kept as they are", ", ".join(sorted(state.rotations)))
        self.journal.append(sizes, {}, rotations=dict.fromkeys(state.rotations) or None)
        if extra:
            listed = sorted(extra.items())
            log.error("journal damaged: output kept whole; lines past the last commit the journal"
                      " knows may appear twice in: %s%s",
                      ", ".join(f"{t}/{t}.log after byte {before.get(t, 0)} ({n} bytes)"
                                for t, n in listed[:20]),
                      f" and {len(listed) - 20} more topics" if len(listed) > 20 else "")
        log.warning("journal rebuilt from the topic files (commit %d)", self.journal.state.seq)

    async def serve(self) -> None:
        try:
            await self.startup()
        except BaseException:
            await self.release()  # what startup opened before it failed
            raise
        try:
            await self.stopping.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self.stopping.set()


    async def shutdown(self) -> None:
        """Stop taking batches, commit and acknowledge what we hold, then close, all within
        ``shutdown_timeout_s`` (systemd's stop timeout is longer, so we are never killed)."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        self.notifier.notify("STOPPING=1")
        log.info("aggregator stopping")
        receivers = [t for t in self._tasks if t.get_name() in ("pull", "xsub", "ticker", "watchdog",
                                                                "subscriptions", "loop-probe")]
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline)):
                async with self.commit_lock:
                    await self.commit()
        except (TimeoutError, SinkError) as exc:
            log.warning("final commit did not finish (%s); agents will resend what was not acknowledged",
                        exc or f"not within shutdown_timeout_s={self.cfg.shutdown_timeout_s}")
        self.tell_agents_stopping()
        self.save_registry()
        await self.release(deadline)

    async def release(self, deadline: float | None = None) -> None:
        """Cancel the tasks, let compressions finish until shortly before ``deadline`` (a
        time.monotonic() value; default: shutdown_timeout_s from now) and stop the rest between
        two chunks (the next start compresses those files again), close files and sockets."""
        if deadline is None:
            deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        margin = min(0.5, self.cfg.shutdown_timeout_s / 4)  # a chunk takes some 30 ms
        if self._compressions:
            await asyncio.wait(self._compressions, timeout=max(0.0, deadline - margin - time.monotonic()))
        self._compress_cancel.set()
        if self._compressions:
            _, pending = await asyncio.wait(self._compressions, timeout=margin)
            if pending:
                log.warning("%d compressions did not stop in time; their files are compressed again"
                            " at the next start", len(pending))
        self._compressor.shutdown(wait=False, cancel_futures=True)
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline + margin)):
                await self.close_files()
        except TimeoutError:
            log.warning("the active files could not be made durable within shutdown_timeout_s; what"
                        " was not committed is resent by the agents")
        self.sink.close()
        self.journal.close()
        if self.stream_sink is not None:
            await self.stream_sink.close()
        if self.metrics is not None:
            self.metrics.close()
        for sock in self.sockets.values():
            sock.close(linger=0)
        if self.control is not None:
            self.control.close()
        self.guard.stop()
        if self.ctx is not None:
            self.ctx.term()
        self.notifier.close()
        for lock in self.locks:
            lock.release()
        log.info("aggregator stopped")

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Load, validate, diff, apply; a bad config is reported and the running one stays."""
        source = path or (None if self.config.source.startswith("<") else self.config.source)
        try:
            new = load_config(source, self.overrides)
        except ConfigError as exc:
            log.warning("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return {"reloaded": False, "problems": exc.problems}
        # max_message_bytes too: agents size their batches by the value their hello was told,
        # and the sockets' MAXMSGSIZE is set at bind.
        fixed = ("output_dir", "state_dir", "pull", "xsub", "xpub", "control", "metrics_listen", "loop",
                 "curve_secret_key", "max_message_bytes")
        changed = [k for k in fixed if getattr(new.aggregator, k) != getattr(self.cfg, k)]
        if changed:
            log.warning("reload: %s need a restart to change; keeping the running values",
                        ", ".join(changed))
            kept = {k: getattr(self.cfg, k) for k in fixed}
            new = Config(aggregator=dataclasses.replace(new.aggregator, **kept), source=new.source)
        if new.aggregator.log_level != self.cfg.log_level:
            logging.getLogger().setLevel(new.aggregator.log_level.upper())
        try:
            self.guard.reload(new.aggregator)
        except curve.KeyError_ as exc:
            log.warning("reload refused, keeping the running config and keys: %s", exc)
            return {"reloaded": False, "problems": [str(exc)]}
        self.config, self.cfg = new, new.aggregator
        await self.reopen()
        log.info("configuration reloaded from %s", new.source)
        return {"reloaded": True, "restart_needed": changed}

    async def reopen(self) -> None:
        """Commit, then close the active files so the next write reopens them by name."""
        async with self.commit_lock:
            await self.commit()
            await self.close_files()

    async def rotate_now(self, topic: str | None) -> list[str]:
        """``aggregatorctl rotate [TOPIC]``: commit, then roll the topic (or all) over."""
        async with self.commit_lock:
            await self.commit()
            return await self.rotate_due({topic})


def _loop_deadline(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline in the running loop's time (uvloop's clock differs)."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


