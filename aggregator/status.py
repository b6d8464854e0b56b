"""Status: counters, rates, liveness, the loop's stalls, and the status document."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aggregator.files import key_topic
from aggregator.stages import Stages
from fleetlog.runtime import release_free_memory

if TYPE_CHECKING:
    from aggregator.agents import AgentInfo
from fleetlog import __version__

log = logging.getLogger("fleetlog.aggregator")


@dataclass
class TopicStats:
    lines: int = 0
    bytes: int = 0
    rate: float = 0.0
    _last_lines: int = 0


@dataclass
class Totals:
    lines_written: int = 0
    bytes_written: int = 0
    batches: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    resyncs: int = 0
    commits: int = 0
    # Commits before commit_interval_ms was up: commit_max_bytes reached, an agent's window half
    # uncommitted, a batch sent again before its commit, a stream or a hold waiting.
    early_commits: int = 0
    write_errors: int = 0
    rotations: int = 0
    retention_removed: int = 0   # rotated files removed by retention
    # Streams continued at the agent's acknowledged offset, past what our state knew.
    rebased_streams: int = 0
    # Batches refused for want of a file descriptor (taken at a later try).
    descriptor_waits: int = 0
    malformed: dict[str, int] = field(default_factory=dict)


class StatusReport(Stages):
    """What `aggregatorctl status` and the metrics show."""

    async def ticker(self) -> None:
        """Once a second: rates, agent liveness; every 10 s a systemd STATUS=; every minute retention."""
        ticks = 0
        wall, mono = self.clock(), time.monotonic()
        loop = asyncio.get_running_loop()
        trimming: asyncio.Future[None] | None = None
        saving: asyncio.Future[None] | None = None
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            wall, mono = self.check_clock(wall, mono)
            if self.commit_idle and self.rotation_due():
                self.commit_wake.set()
            self.poke_commit()
            # A safety net under the receive loops: ZMQ_FD signals only a change, so were one
            # lost (another call on the socket takes its events) a look each second finds the
            # messages; it costs one empty receive, in a wake-up the loop has anyway.
            for readable in self.readable.values():
                readable.set()
            if ticks % 10 == 0:
                self.notifier.notify("STATUS=" + self.status_line())
                if saving is None or saving.done():  # one at a time: a slow disk must not pile them up
                    saving = self.save_registry_later()
                # Messages waiting in ZeroMQ's queues hold its receive buffers: 8 KiB each for
                # an agent's 700-byte message of a 50 ms read cycle (one message a read). A
                # loop that falls behind a fleet for a second queues 20,000 of them; glibc then
                # keeps the freed pages and the RSS stays at its peak (one pause of 1 s with 500
                # agents: 52 -> 152 MiB, 55 MiB after a trim). In a thread: 15 ms with 100 MiB
                # to give back, under 1 ms with nothing.
                if trimming is None or trimming.done():
                    trimming = loop.run_in_executor(None, release_free_memory)
            if ticks % 3600 == 0:
                self.forget_old_streams()
            if ticks % 60 == 0 and self.stream_sink is None:
                self._retain_later(None)
            now = time.monotonic()
            counted: list[TopicStats | AgentInfo] = [*self.topics.values(), *self.agents.values()]
            for stats in counted:
                delta = stats.lines - stats._last_lines
                stats._last_lines = stats.lines
                stats.rate = 0.7 * stats.rate + 0.3 * delta
            for agent in self.agents.values():
                agent.connected = (agent.heard and not agent.stopped
                                   and now - agent.last_seen < self.cfg.agent_timeout_s)
                if not agent.connected:
                    agent.window = 0  # granted again at its next hello
            self.catching_up = sum(1 for a in self.agents.values() if a.catching_up)
            self.granted = sum(a.window for a in self.agents.values())
            self.share_window()

    def check_clock(self, wall: float, mono: float) -> tuple[float, float]:
        """Say so when the wall clock was stepped (NTP after a bad start, an operator, a VM
        resumed): time-based rotation and rotated names follow the new time (README, Output)."""
        now_wall, now_mono = self.clock(), time.monotonic()
        step = (now_wall - wall) - (now_mono - mono)
        if abs(step) >= 5.0:
            log.warning("the wall clock was stepped %s by %.0f s: files roll over at the next period"
                        " of the new time, and rotated names never sort before older ones",
                        "forward" if step > 0 else "back", abs(step))
        return now_wall, now_mono

    async def loop_probe(self, interval_s: float = 1.0) -> None:
        """Measure the event loop's stalls: how much later than asked a timer fires. This one
        fires once a second; while batches flow, the commit loop's timer (every
        ``commit_interval_ms``) is measured too (``note_stall``), so a busy loop is sampled
        often and an idle one wakes only here."""
        while True:
            asked = time.monotonic()
            await asyncio.sleep(interval_s)
            self.note_stall(time.monotonic() - asked - interval_s)

    def note_stall(self, late_s: float) -> None:
        """A timer fired ``late_s`` seconds late: the longest in this 10 s window and since start."""
        now = time.monotonic()
        if now >= self._stall_window_end:
            self.loop_stall_windows = [0.0, self.loop_stall_windows[0]]
            self._stall_window_end = now + 10
        if late_s > self.loop_stall_windows[0]:
            self.loop_stall_windows[0] = late_s
            self.loop_stall_max_s = max(self.loop_stall_max_s, late_s)

    def status_line(self) -> str:
        connected = sum(1 for a in self.agents.values() if a.connected)
        rate = sum(s.rate for s in self.topics.values())
        line = (f"{connected} agents connected, {rate:.0f} lines/s, {self.totals.lines_written} lines "
                f"written to {len(self.topics)} topics")
        return f"{line}; OUTPUT NOT WRITABLE: {self.disk_error}" if self.disk_error else line

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        # Active file bytes per topic: a topic split by agent has one active file per agent.
        file_bytes: dict[str, int] = {}
        for key, tf in self.sink.files.items():
            topic = key_topic(key)
            file_bytes[topic] = file_bytes.get(topic, 0) + tf.size
        try:
            usage = shutil.disk_usage(self.cfg.output_dir)
            disk = {"output_free_bytes": usage.free, "output_total_bytes": usage.total,
                    "output_used_bytes": usage.used}
        except OSError:
            disk = {}
        t = self.totals
        js = self.stream_sink.status() if self.stream_sink is not None else None
        # Duplicates the JetStream sink found in the stream (resent after a crash, or taken by
        # another aggregator) are dropped as surely as those acceptance drops: one total.
        in_stream = js["already_in_lines"] if js is not None else 0
        return {
            "instance": self.instance,
            "version": __version__,
            "uptime_s": round(now - self.started, 1),
            "endpoints": {"pull": self.cfg.pull, "xsub": self.cfg.xsub, "xpub": self.cfg.xpub,
                          "control": list(self.cfg.control)},
            "output_dir": self.cfg.output_dir if self.stream_sink is None else None,
            "sink": self.cfg.sink,
            "jetstream": js,
            "commit_interval_ms": self.cfg.commit_interval_ms,
            "commit_max_bytes": self.cfg.commit_max_bytes,
            "disk": disk,
            "journal_bytes": _size_or_none(self.journal.journal_path),
            "disk_error": self.disk_error,
            "expected_missing": sorted(n for n in self.cfg.expected_agents
                                       if n not in self.agents or not self.agents[n].connected),
            "state_error": self.state_error.error if self.state_error else None,
            "held_topics": [
                {"name": topic, "error": hold.error, "held_s": round(now - hold.since, 1),
                 "refused_batches": hold.refused_batches, "retrying": hold.retrying}
                for topic, hold in sorted(self.sink.held.items())
            ],
            "open_files": len(self.sink.open_files), "open_files_max": self.sink.max_open,
            "agents": [
                {"name": a.name, "address": a.address, "mode": a.mode, "connected": a.connected,
                 "stopped": a.stopped, "version": a.version or None, "aggregators": a.aggregators,
                 "uptime_s": round(time.time() - a.started_at, 1) if a.started_at and a.connected else None,
                 "last_seen_s": round(now - a.last_seen, 1) if a.last_seen else None,
                 "lines": a.lines, "bytes": a.bytes, "lines_per_s": round(a.rate, 1),
                 "lag_bytes": a.lag_bytes, "lag_s": a.lag_s, "window_bytes": a.window or None,
                 "files": a.files, "file_list": a.file_list, "errors": a.errors,
                 "agent_id": a.agent_id or None, "problems": a.problems + self.agent_warnings(a),
                 "journal_lag_entries": a.journal_lag_entries, "journal_lag_s": a.journal_lag_s}
                for a in sorted(self.agents.values(), key=lambda a: a.name)
            ],
            "topics": [
                {"name": name, "lines": s.lines, "bytes": s.bytes, "lines_per_s": round(s.rate, 1),
                 "file_bytes": file_bytes.get(name)}
                for name, s in sorted(self.topics.items())
            ],
            "totals": {
                "lines_written": t.lines_written, "bytes_written": t.bytes_written,
                "batches": t.batches, "duplicates_dropped": t.duplicates_dropped + in_stream,
                "already_in_stream": in_stream,
                "malformed_dropped": t.malformed_dropped, "resyncs": t.resyncs,
                "commits": t.commits, "early_commits": t.early_commits,
                "write_errors": t.write_errors, "streams": len(self.accepted),
                "rotations": t.rotations, "retention_removed": t.retention_removed,
                "rebased_streams": t.rebased_streams, "descriptor_waits": t.descriptor_waits,
                "pending_bytes": self.pending_bytes, "compressions_running": len(self._compressions),
            },
            "malformed": dict(t.malformed),
            "refusals": self.guard.refusals.status(),
            "control": {"messages_received": self.control.messages_received if self.control else 0,
                        "commands": dict(self.control.commands) if self.control else {}},
            "subscriptions": len(self.subscriptions),
            "loop": {"stall_max_ms": round(1000 * self.loop_stall_max_s, 1),
                     "stall_recent_ms": round(1000 * max(self.loop_stall_windows), 1)},
            "flow": {"window_budget_bytes": self.cfg.window_budget_bytes, "agent_window_bytes": self.window,
                     "agents_catching_up": self.catching_up, "granted_bytes": self.granted},
        }


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
