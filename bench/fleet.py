"""Fleet simulator (issues 8.3, 18.5): one real aggregator, a thousand simulated agents.

``--agents`` (1,000) agents live in ``--procs`` (2) processes. Each has its own identity (its
control DEALER's identity is ``sim-0042/<agent id>``, as a real agent's), its own stream (one
simulated file), and speaks the real protocol (``fleetlog.wire``): ``hello`` with its streams, a
``heartbeat`` every second, batches PUSHed to the aggregator's pull endpoint (each one starting
exactly where the previous one of its stream ended, byte offsets from ``base`` 0), ``ack``
events settle batches, ``resync`` events rewind the stream to the offset the aggregator expects,
and batches go again when nothing is acknowledged for 3 s, as ``agent/daemon.py`` does. Each
agent writes ``--rate`` (100) lines/s for ``--duration-s`` (30) seconds, into one of
``--topics`` (10) topics. With ``--files N`` each agent follows N files (N streams, dealt over the
topics in turn, all on the agent's two sockets, one read cycle for all of them: the batches of
one topic go as one wire version 3 message): many topics without as many connections (10,000
topics from 1,000 agents).

Read cycles as a real agent's: at the default ``latency_budget_ms`` (40) the first line written
after a read cycle wakes the agent, which reads 40 ms later, so under steady writes of R lines/s
(all of an agent's files together) it reads ``floor(0.04 R) + 1`` lines every
``(floor(0.04 R) + 1) / R`` seconds: 5 lines every 50 ms at 100 lines/s, one line every 50 ms
at 20 lines/s. That is ``--batch-ms``'s default (0: this model, from ``--latency-budget-ms``);
``--batch-ms N`` ships every N ms instead. Each cycle sends one data message per topic (one for
one file) and, once a second, a heartbeat.

The simulators must cost little next to the aggregator they measure (on a 2-core machine they
share its CPU): every batch's frames are made before the load with ``fleetlog.wire`` (the same
encoder as the agent, so the bytes are exactly an agent's; a batch sent again, with its new
``seq``, is encoded then), the lines (``<time> sim app[N]: INFO aN-K ...``, 130 bytes) before
that. One thread per process runs a timer loop over its agents, plain NOBLOCK sends, and one
epoll on the control sockets' ZMQ_FDs (only sockets with something to read are looked at; a
socket is also read after each send on it, which can take its notification).

Reported: lines/s written by the aggregator in the steady part of the run (from its status),
ack latency (a batch's first send to the ack that covers it), the aggregator's RSS and CPU, the
simulators' CPU and the whole machine's (from /proc/stat: other users count too), and how long
``aggregatorctl status --json`` takes to answer during the load (a fresh process each time, as an
operator runs it; and the bare request on an open socket). The run is flagged INVALID when the
aggregator could not have had the CPU it wanted: simulators + aggregator above 85% of the cores,
the whole machine above 95% busy, the simulators more than 0.5 s behind their schedule (they then
stop at the end of the load: what they did not reach is not written), or less than 95% of the
offered lines written. At the end every line is checked: each agent's lines exactly once and in
order (exit status 1 if not, or if some were still unacknowledged after ``--settle-s``; an
INVALID run that passes the check exits 0).

    python -m bench.fleet [--agents 1000] [--procs 2] [--rate 100] [--duration-s 30]
                          [--batch-ms 0] [--topics 10] [--files 1] [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import math
import os
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from typing import Any

import orjson
import zmq

from agent.config import AgentConfig
from agent.transport import PUSH_SNDHWM
from bench.backlog import aggregator_argv
from bench.procs import ControlClient, Proc, Sampler, free_port, wait_for
from fleetlog import __version__, wire

ID_RE = re.compile(rb" a(\d+)-(\d+) ")
_FILLER = "request handled user=4711 session=9f2c cache=hit upstream=api-03 rows=12 shard=7 took="
_GOLDEN = (math.sqrt(5) - 1) / 2  # spreads agents' read cycles evenly over the period, all processes together
# The agent's defaults (its config is a slotted dataclass: the defaults live in its fields).
AGENT_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
HEARTBEAT_S = AGENT_DEFAULTS["heartbeat_interval_ms"] / 1000
ACK_TIMEOUT_S = AGENT_DEFAULTS["ack_timeout_ms"] / 1000
NO_ERRORS = {"cut_lines": 0, "discarded_bytes": 0, "oversized_batches": 0}


def cycle_s(lines_per_s: float, latency_budget_ms: int) -> float:
    """Seconds between a real agent's read cycles under steady writes of ``lines_per_s`` (all its
    files): the first line after a cycle starts the budget, so ``floor(budget * rate) + 1`` lines
    come per cycle. No writes: the budget."""
    budget_s = latency_budget_ms / 1000
    if lines_per_s <= 0:
        return budget_s
    return (math.floor(round(budget_s * lines_per_s, 9)) + 1) / lines_per_s


# ---- one simulated file (stream) ----------------------------------------------------------------

class Stream:
    """One simulated file: every batch its agent will read, made (and encoded) up front.

    Batch ``b`` covers bytes ``ends[b-1]`` (0 for the first) to ``ends[b]`` and lines up to
    ``upto[b]``; it is read at the agent's cycle ``cycles[b]``; ``bodies[b]`` is its data message's
    body for its first send with ``seq`` ``b + 1`` (the agent's seq counts sends: after any
    resend, batches are encoded as they go)."""

    __slots__ = (
        "acked",
        "acked_n",
        "bodies",
        "cycles",
        "ends",
        "file",
        "index",
        "last_progress",
        "made",
        "path",
        "rewind_seq",
        "sent_at",
        "seq",
        "shipped",
        "stream",
        "topic",
        "upto",
    )

    def __init__(self, index: int, topic: str, agent: str, rate: float, period_s: float,
                 n_cycles: int, stamp0: float) -> None:
        self.index = index
        self.topic = topic.encode()
        self.stream = uuid.uuid4().hex
        self.path = f"/var/log/sim/{agent}-{index}.log"
        self.file = f"sim:{index}"
        self.ends, self.upto, self.cycles = array("q"), array("q"), array("q")
        self.bodies: list[bytes] = []
        k = offset = 0
        per_cycle = rate * period_s
        for c in range(n_cycles):
            upto = math.floor(round(per_cycle * (c + 1), 6))
            if upto <= k:
                continue  # nothing written in this file during the cycle
            stamp = f"{stamp0 + c * period_s:.6f}"
            text = "".join([f"{stamp} sim app[{index}]: INFO a{index}-{n} {_FILLER}{n % 997}ms\n"
                            for n in range(k, upto)])
            end = offset + len(text)  # ASCII: characters are bytes
            body = wire.batch_frames(self.topic, agent, self.stream, 0, self.path, self.file,
                                     len(self.bodies) + 1, offset, end, text)[1]
            # A copy of its exact size: orjson's own result keeps its 4 KiB buffer (a 5,000-agent
            # run held 7 GB per simulator).
            self.bodies.append(memoryview(body).tobytes())
            self.ends.append(end)
            self.upto.append(upto)
            self.cycles.append(c)
            k, offset = upto, end
        self.sent_at = array("d", bytes(8 * len(self.bodies)))  # first send of each batch; 0: never
        self.made = 0           # batches read by the agent so far
        self.acked_n = 0        # batches acknowledged (all of them, from the first)
        self.acked = 0          # the acknowledged offset
        self.shipped = 0        # batches on the wire (from the first); shipped - acked_n in flight
        self.seq = 0
        self.rewind_seq = 0
        self.last_progress = 0.0

    def lines(self, n: int) -> int:
        """Lines in the first ``n`` batches."""
        return self.upto[n - 1] if n else 0

    def offset(self, n: int) -> int:
        return self.ends[n - 1] if n else 0

    def message(self, agent: str, max_lines: int, max_bytes: int) -> tuple[bytes, int]:
        """The body of the next batch to send (one read from the ship position: several batches
        in one after a rewind or a full send queue, at most ``max_lines`` and about
        ``max_bytes``, as the agent's batch limits) and the batch after the last it covers."""
        b0, b1 = self.shipped, self.made
        if self.seq == b0:
            return self.bodies[b0], b0 + 1  # in order, never resent: made up front
        b1 = min(b1, bisect.bisect_right(self.upto, self.lines(b0) + max_lines, b0 + 1, b1),
                 bisect.bisect_right(self.ends, self.offset(b0) + max_bytes, b0 + 1, b1))
        b1 = max(b1, b0 + 1)
        text = "".join(orjson.loads(self.bodies[b])["text"] for b in range(b0, b1))
        frames = wire.batch_frames(self.topic, agent, self.stream, 0, self.path, self.file,
                                   self.seq + 1, self.offset(b0), self.offset(b1), text)
        return frames[1], b1

    def sent(self, upto: int, now: float) -> None:
        if self.shipped == self.acked_n:
            self.last_progress = now  # nothing was in flight: the ack timeout starts now
        sent_at = self.sent_at
        for b in range(self.shipped, upto):
            if not sent_at[b]:
                sent_at[b] = now
        self.shipped = upto
        self.seq += 1

    def on_ack(self, end: Any, now: float, latencies: list[float]) -> None:
        if type(end) is not int or end <= self.acked:
            return
        self.acked = end
        self.last_progress = now
        n, ends, sent_at = self.acked_n, self.ends, self.sent_at
        while n < len(ends) and ends[n] <= end:
            if sent_at[n]:
                latencies.append(now - sent_at[n])
            n += 1
        self.acked_n = n
        if self.shipped < n:
            self.shipped = n

    def on_resync(self, offset: Any, seq: Any, stats: dict[str, int]) -> None:
        if type(offset) is not int or (seq is not None and (type(seq) is not int or seq < self.rewind_seq)):
            return  # stale: sent before our last rewind (None: the aggregator asks on its own)
        b = 0 if offset == 0 else bisect.bisect_left(self.ends, offset) + 1
        if b > len(self.ends) or self.offset(b) != offset or b < self.acked_n:
            stats["resync_unknown_offset"] += 1
            return
        stats["resyncs"] += 1
        self.shipped = min(self.shipped, b)
        self.rewind_seq = self.seq + 1

    def check_ack_timeout(self, now: float, stats: dict[str, int]) -> None:
        if self.shipped > self.acked_n and now - self.last_progress >= ACK_TIMEOUT_S:
            stats["ack_timeouts"] += 1
            self.shipped = self.acked_n
            self.rewind_seq = self.seq + 1
            self.last_progress = now


# ---- one simulated agent ------------------------------------------------------------------------

class SimAgent:
    __slots__ = (
        "agent_id",
        "by_stream",
        "dealer",
        "hello_at",
        "hellos",
        "instance",
        "last_heartbeat",
        "listed_files",
        "name",
        "phase",
        "push",
        "streams",
        "window",
        "wire_v3",
    )

    def __init__(self, name: str, streams: list[Stream], phase: float) -> None:
        self.name = name
        self.agent_id = uuid.uuid4().hex
        self.streams = streams
        self.by_stream = {s.stream: s for s in streams}
        self.dealer: Any = None
        self.push: Any = None
        self.phase = phase            # its read cycles are at t0 + phase + c * period
        self.instance = ""
        self.hellos: set[int] = set()  # hellos sent since the last one answered
        self.hello_at = 0.0
        self.last_heartbeat = 0.0
        self.wire_v3 = False
        self.listed_files = False
        # The bytes it may have shipped unacknowledged: its max_inflight_bytes, or the aggregator's
        # smaller share (in hello and heartbeat replies and in acks), as agent/daemon.py's on_window.
        self.window: int = AGENT_DEFAULTS["max_inflight_bytes"]

    def on_window(self, window: Any) -> None:
        if type(window) is int and window >= wire.MIN_WINDOW:
            self.window = min(window, AGENT_DEFAULTS["max_inflight_bytes"])

    def inflight(self) -> int:
        return sum(s.offset(s.shipped) - s.acked for s in self.streams if s.shipped > s.acked_n)


# ---- one simulator process ----------------------------------------------------------------------

class Simulator:
    """``count`` agents from number ``first`` on, all driven from one thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        files = args.files
        self.period = (args.batch_ms / 1000 if args.batch_ms > 0
                       else cycle_s(args.rate * files, args.latency_budget_ms))
        self.max_lines = AGENT_DEFAULTS["batch_max_lines"]
        self.max_bytes = AGENT_DEFAULTS["batch_max_bytes"]
        stamp0 = time.time()
        self.agents: list[SimAgent] = []
        for i in range(args.first, args.first + args.count):
            phase = (i * _GOLDEN) % 1.0 * self.period
            n_cycles = max(0, math.floor((args.duration_s - phase) / self.period) + 1)
            name = f"sim-{i:04d}"
            streams = [Stream(i * files + j, f"fleet{(i * files + j) % args.topics}", name, args.rate,
                              self.period, n_cycles, stamp0) for j in range(files)]
            self.agents.append(SimAgent(name, streams, phase))
        self.agents.sort(key=lambda a: a.phase)
        self.by_fd: dict[int, SimAgent] = {}
        self.by_hello: dict[int, SimAgent] = {}
        self.epoll = select.epoll()
        self.stats = dict.fromkeys((
            "messages", "batches", "hwm_waits", "window_waits", "resyncs", "resync_unknown_offset",
            "ack_timeouts", "acks", "hellos", "heartbeats", "bad_control", "refused", "restarts_seen",
            "stopping"), 0)
        self.latencies: list[float] = []
        self.req_ids = iter(range(1, 1 << 62))
        self.ctx: zmq.Context[Any] = zmq.Context()

    def connect(self) -> None:
        self.ctx.set(zmq.MAX_SOCKETS, 2 * len(self.agents) + 64)
        beat = AGENT_DEFAULTS["heartbeat_interval_ms"]
        for a in self.agents:
            # The agent's socket options (agent/transport.py), its ZMTP heartbeats included: each
            # connection is pinged from both ends every beat, part of what an agent costs.
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, f"{a.name}/{a.agent_id}".encode())
            dealer.setsockopt(zmq.SNDHWM, 100)
            dealer.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, PUSH_SNDHWM)
            for sock in (dealer, push):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues while disconnected
                sock.setsockopt(zmq.RECONNECT_IVL, 100)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
                sock.setsockopt(zmq.HEARTBEAT_IVL, beat)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * beat)
                sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * beat)
                sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
            dealer.connect(self.args.control)
            push.connect(self.args.pull)
            fd = dealer.getsockopt(zmq.FD)
            self.epoll.register(fd, select.EPOLLIN)
            self.by_fd[fd] = a
            a.dealer, a.push = dealer, push

    def close(self) -> None:
        self.epoll.close()
        for a in self.agents:
            for sock in (a.dealer, a.push):
                if sock is not None and not sock.closed:
                    sock.close(linger=0)
        self.ctx.term()

    # -- control plane

    def request(self, a: SimAgent, command: str, args: dict[str, Any], now: float) -> int | None:
        """Send one request; its id, or None when the socket would block (not connected)."""
        req_id = next(self.req_ids)
        try:
            a.dealer.send(wire.encode_request(req_id, command, args), flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.read(a, now)  # a send may have taken the socket's notification of a reply waiting
        return req_id

    def hello(self, a: SimAgent, now: float) -> None:
        a.hello_at = now
        req_id = self.request(a, "hello", {
            "agent": a.name, "agent_id": a.agent_id, "mode": "push", "version": __version__,
            "started_at": 0, "streams": [s.stream for s in a.streams], "lag_bytes": self.lag_bytes(a),
            "lag_s": 0.0, "max_inflight_bytes": AGENT_DEFAULTS["max_inflight_bytes"], "problems": [],
            "heartbeat_interval_ms": int(HEARTBEAT_S * 1000), "aggregators": 1}, now)
        if req_id is not None:
            self.by_hello[req_id] = a
            a.hellos.add(req_id)
            self.stats["hellos"] += 1

    def lag_bytes(self, a: SimAgent) -> int:
        return sum(s.offset(s.made) - s.acked for s in a.streams)

    def heartbeat(self, a: SimAgent, now: float) -> None:
        a.last_heartbeat = now
        if not a.instance:
            if now - a.hello_at >= HEARTBEAT_S:
                self.hello(a, now)  # no answer yet: ask again, once a beat
            return
        args = {"agent": a.name, "agent_id": a.agent_id, "mode": "push", "lag_bytes": self.lag_bytes(a),
                "lag_s": 0.0, "files": len(a.streams), "errors": NO_ERRORS, "problems": []}
        if not a.listed_files:
            args["file_list"] = [s.path for s in a.streams]  # as the agent: once per aggregator
        if self.request(a, "heartbeat", args, now) is not None:
            a.listed_files = True
            self.stats["heartbeats"] += 1

    def wait(self, timeout_s: float) -> None:
        """Up to ``timeout_s`` for control messages; read those that came."""
        events = self.epoll.poll(timeout_s)
        if events:
            now = time.monotonic()  # after the poll: an ack is timed when it is read
            for fd, _ in events:
                self.read(self.by_fd[fd], now)

    def read(self, a: SimAgent, now: float) -> None:
        sock = a.dealer
        while True:
            try:
                body = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = orjson.loads(body)
            except orjson.JSONDecodeError:
                msg = None
            if type(msg) is not dict:
                self.stats["bad_control"] += 1
                continue
            event = msg.get("event")
            if event == "ack":
                self.stats["acks"] += 1
                if "window" in msg:
                    a.on_window(msg["window"])
                streams = msg.get("streams")
                if type(streams) is dict:
                    for stream, end in streams.items():
                        if (s := a.by_stream.get(stream)) is not None:
                            s.on_ack(end, now, self.latencies)
            elif event == "resync":
                if (s := a.by_stream.get(msg.get("stream"))) is not None:  # type: ignore[arg-type]
                    s.on_resync(msg.get("offset"), msg.get("seq"), self.stats)
            elif event is not None:
                self.stats["stopping" if event == wire.EVENT_STOPPING else "bad_control"] += 1
            elif not msg.get("ok"):
                self.stats["refused"] += 1
            else:
                self.reply(a, msg, now)

    def reply(self, a: SimAgent, msg: dict[str, Any], now: float) -> None:
        # The agent's state machine (agent/transport.py): a reply to any hello in flight is
        # the answer; another instance named in any other reply asks for one hello, not one a reply.
        result = msg.get("result")
        result = result if type(result) is dict else {}
        instance = result.get("instance", "")
        if "window" in result:
            a.on_window(result["window"])
        hello = self.by_hello.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if hello is a and msg.get("id") in a.hellos:
            a.hellos.clear()
            if instance != a.instance:
                if a.instance:
                    for st in a.streams:  # the aggregator restarted: ship everything unacknowledged again
                        st.shipped = st.acked_n
                    self.stats["restarts_seen"] += 1
                a.instance = instance
                a.listed_files = False
            if "window" not in result:
                a.window = AGENT_DEFAULTS["max_inflight_bytes"]  # an aggregator that sets no window
            versions = result.get("wire")
            a.wire_v3 = type(versions) is list and 3 in versions
            committed = result.get("committed")
            if type(committed) is dict:
                for stream, end in committed.items():
                    if (s := a.by_stream.get(stream)) is not None:
                        s.on_ack(end, now, self.latencies)
            return
        if (instance and a.instance and instance != a.instance
                and (not a.hellos or now - a.hello_at >= HEARTBEAT_S)):
            self.hello(a, now)

    # -- data

    def ship(self, a: SimAgent, now: float) -> None:
        """One read cycle's messages: each stream's next batch, one message per topic."""
        streams = a.streams
        if len(streams) == 1:
            s = streams[0]
            if s.shipped < s.made:
                if s.shipped > s.acked_n and s.offset(s.shipped) - s.acked >= a.window:
                    self.stats["window_waits"] += 1
                    return  # as the agent: no more reading until acks make room
                body, upto = s.message(a.name, self.max_lines, self.max_bytes)
                if self.send(a, s.topic, body):
                    s.sent(upto, now)
                    self.stats["batches"] += 1
            return
        if a.inflight() >= a.window:
            self.stats["window_waits"] += 1
            return
        by_topic: dict[bytes, list[tuple[Stream, bytes, int]]] = {}
        for s in streams:
            if s.shipped < s.made:
                body, upto = s.message(a.name, self.max_lines, self.max_bytes)
                by_topic.setdefault(s.topic, []).append((s, body, upto))
        for topic, group in by_topic.items():
            if len(group) > 1 and a.wire_v3:
                frames = wire.multi_frames(topic, [body for _, body, _ in group])
                if not self.send(a, topic, frames[1]):
                    return
            else:
                for i, (_, body, _) in enumerate(group):
                    if not self.send(a, topic, body):
                        group = group[:i]
                        break
            for s, _, upto in group:
                s.sent(upto, now)
            self.stats["batches"] += len(group)

    def send(self, a: SimAgent, topic: bytes, body: bytes) -> bool:
        try:
            a.push.send(topic, zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.Again:
            self.stats["hwm_waits"] += 1
            return False  # the aggregator is not taking them: like the agent, wait (try at the next cycle)
        a.push.send(body, zmq.NOBLOCK)  # the rest of a message started never blocks
        self.stats["messages"] += 1
        return True

    def cycle(self, a: SimAgent, c: int, now: float) -> None:
        """Agent ``a``'s read cycle number ``c``: what its files got since, then the timers."""
        for s in a.streams:
            cycles, made = s.cycles, s.made
            while made < len(cycles) and cycles[made] <= c:
                made += 1
            s.made = made
        self.ship(a, now)
        for s in a.streams:
            s.check_ack_timeout(now, self.stats)
        if now - a.last_heartbeat >= HEARTBEAT_S:
            self.heartbeat(a, now)

    # -- phases

    def say_hello(self, timeout_s: float) -> bool:
        """Every agent's first hello answered, within a deadline. Before the load only (not
        measured): at most 200 hellos a tenth of a second, and an agent not answered asks again
        after 1, 2, 4, 8 s (a real agent asks once a beat: 5,000 at once, against an aggregator
        that takes longer than a beat to answer them, never got through on a busy machine)."""
        deadline = time.monotonic() + timeout_s
        tries: dict[SimAgent, int] = {}
        while any(not a.instance for a in self.agents):
            now = time.monotonic()
            if now > deadline:
                return False
            sent = 0
            for a in self.agents:
                if sent >= 200:
                    break
                if not a.instance and now - a.hello_at >= min(8.0, HEARTBEAT_S * 2 ** tries.get(a, 0) / 2):
                    self.hello(a, now)
                    tries[a] = tries.get(a, 0) + 1
                    sent += 1
            self.wait(0.1)
        return True

    def idle(self, until: Any) -> None:
        """Heartbeats only, until ``until()`` is true."""
        while not until():
            now = time.monotonic()
            for a in self.agents:
                if now - a.last_heartbeat >= HEARTBEAT_S:
                    self.heartbeat(a, now)
            self.wait(0.05)

    def load(self, t0: float) -> float:
        """Agent a's read cycle c at t0 + a.phase + c * period, in order of time; agents due
        within the same millisecond go together, then the control sockets are read. Ends at
        the end of the load even when behind (the cycles not reached are not written: a
        simulator that cannot keep up offers less). Returns how late the latest cycle ran (s)."""
        agents, period = self.agents, self.period
        n = len(agents)
        t_end = t0 + self.args.duration_s
        k = c = done = 0
        late = 0.0
        while n:
            a = agents[k]
            due = t0 + a.phase + c * period
            if due > t_end:
                return late
            now = time.monotonic()
            if due > now + 0.001:
                self.wait(due - now)
                continue
            late = max(late, now - due)
            if now > t_end + 1.0:
                return late
            self.cycle(a, c, now)
            k += 1
            if k == n:
                k, c = 0, c + 1
            done += 1
            if done % 64 == 0:
                self.wait(0)  # behind: read acks at least every 64 agents
        return late

    def unacked(self) -> int:
        return sum(s.lines(s.made) - s.lines(s.acked_n) for a in self.agents for s in a.streams)

    def settle(self, timeout_s: float) -> None:
        """Everything read shipped and acknowledged, within a deadline (timers as in the load)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(s.acked_n < s.made for a in self.agents for s in a.streams):
            now = time.monotonic()
            for a in self.agents:
                self.ship(a, now)
                for s in a.streams:
                    s.check_ack_timeout(now, self.stats)
                if now - a.last_heartbeat >= HEARTBEAT_S:
                    self.heartbeat(a, now)
            self.wait(0.05)


def simulate(args: argparse.Namespace) -> int:
    t_setup = time.monotonic()
    sim = Simulator(args)
    setup_s = time.monotonic() - t_setup
    try:
        sim.connect()
        if not sim.say_hello(240):
            missing = sum(1 for a in sim.agents if not a.instance)
            print(f"sim {args.first}: {missing} agents got no hello reply", file=sys.stderr)
            return 1
        with open(args.ready, "wb"):
            pass
        sim.idle(lambda: os.path.exists(args.go))
        with open(args.go, "rb") as fh:
            t0 = float(fh.read())
        sim.idle(lambda: time.monotonic() >= t0 - 0.05)
        cpu0 = os.times()
        late_s = sim.load(t0)
        t_load_end = time.monotonic()
        cpu1 = os.times()
        sim.settle(args.settle_s)
        t_settled = time.monotonic()
        streams = [s for a in sim.agents for s in a.streams]
        result = {
            "first": args.first, "count": args.count, "t0": t0, "t_load_end": t_load_end,
            "t_settled": t_settled, "lines": {f"sim-{s.index:04d}": s.lines(s.made) for s in streams},
            "unacked_agents": sum(1 for a in sim.agents if any(s.acked_n < s.made for s in a.streams)),
            "unacked_lines": sim.unacked(), "latencies_s": sim.latencies, "stats": sim.stats,
            "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), "load_s": t_load_end - t0,
            "period_s": sim.period, "setup_s": setup_s,
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "late_s": late_s,
        }
        with open(args.result, "wb") as fh:
            fh.write(orjson.dumps(result))
        return 0
    finally:
        sim.close()


# ---- the benchmark ------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ctl_status(control: str) -> float | None:
    """Seconds ``aggregatorctl status --json`` takes, as a fresh process; None if it failed."""
    # ``-m`` rather than the installed script: the same code as the aggregator under test (the
    # current directory's), and the same interpreter start-up as the script.
    argv = [sys.executable, "-m", "aggregator.ctl", "--control", control, "status", "--json"]
    t = time.monotonic()
    out = subprocess.run(argv, capture_output=True,
                         timeout=30, check=False)
    took = time.monotonic() - t
    if out.returncode != 0:
        return None
    orjson.loads(out.stdout)
    return took


def verify(topic_dirs: list[str], expected: dict[int, int]) -> dict[str, int]:
    """Every agent's lines exactly once and in order, across all topics."""
    seen = {a: bytearray(n) for a, n in expected.items()}
    last = dict.fromkeys(expected, -1)
    v = {"lines": 0, "duplicated": 0, "out_of_order": 0, "foreign": 0, "missing": 0}
    for d in topic_dirs:
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as fh:
                for line in fh:
                    v["lines"] += 1
                    m = ID_RE.search(line)
                    a, n = (int(m[1]), int(m[2])) if m is not None else (-1, -1)
                    mark = seen.get(a)
                    if mark is None or n >= len(mark):
                        v["foreign"] += 1
                    elif mark[n]:
                        v["duplicated"] += 1
                    else:
                        mark[n] = 1
                        if n < last[a]:
                            v["out_of_order"] += 1
                        last[a] = n
    v["missing"] = sum(mark.count(0) for mark in seen.values())
    return v


def cpu_per_m_lines(written: list[tuple[float, int]], t0: float, t1: float, cpu_s: float) -> float | None:
    """The aggregator's CPU seconds per million lines it wrote between ``t0`` and ``t1`` (from
    the status samples nearest inside): what holds up when it had to share the CPU."""
    inside = [n for t, n in written if t0 <= t <= t1]
    if len(inside) < 2 or inside[-1] <= inside[0]:
        return None
    return 1e6 * cpu_s / (inside[-1] - inside[0])


def machine_busy_s() -> float:
    """CPU seconds all the machine's CPUs have been busy (not idle, not waiting for I/O), from
    /proc/stat: the simulators', the aggregator's and everybody else's."""
    with open("/proc/stat", "rb") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def raise_nofile(need: int) -> int:
    """Raise this process's descriptor limit (its children's too: the aggregator and the
    simulators inherit it) to at least ``need`` if it can (the hard limit, or beyond it as
    root); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, need) if hard == resource.RLIM_INFINITY else max(soft, min(hard, need))
    if need > hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            pass
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Above these the aggregator was not alone with the CPU it needed: its figures are not its own.
MAX_BUSY_SHARE = 0.85       # simulators + aggregator, of all CPUs
MAX_MACHINE_SHARE = 0.95    # everything on the machine (other users too), of all CPUs
MIN_WRITTEN_SHARE = 0.95    # lines written in the steady part, of the offered rate
MAX_LATE_S = 0.5            # how late a simulated read cycle may run


def invalid_reasons(r: dict[str, Any]) -> list[str]:
    """Why the run does not measure the aggregator (empty: it does)."""
    cpus = r["cpus"] or 1
    out = []
    both = r["sim_cpu_per_s"] + r["aggregator_cpu_per_s"]
    if both > MAX_BUSY_SHARE * cpus:
        out.append(f"simulators + aggregator used {both:.2f} of {cpus} cores (more than "
                   f"{MAX_BUSY_SHARE:.0%})")
    if r["machine_busy_cores"] > MAX_MACHINE_SHARE * cpus:
        out.append(f"the machine was {r['machine_busy_cores'] / cpus:.0%} busy (other processes: "
                   f"{r['machine_busy_cores'] - both:.2f} cores)")
    if r["sim_late_s"] > MAX_LATE_S:
        out.append(f"the simulators ran up to {r['sim_late_s']:.1f}s behind their schedule (they did not"
                   " offer the rate)")
    if not r["steady_lines_per_s"] >= MIN_WRITTEN_SHARE * r["offered_lines_per_s"]:
        out.append(f"{r['steady_lines_per_s']:,.0f} lines/s written, less than "
                   f"{MIN_WRITTEN_SHARE:.0%} of the offered {r['offered_lines_per_s']:,}")
    return out


def run(args: argparse.Namespace, d: str) -> dict[str, Any]:
    ports = {k: free_port() for k in ("pull", "xsub", "xpub", "control")}
    control = control_endpoint = f"tcp://127.0.0.1:{ports['control']}"
    aggregator = Proc("aggregator", aggregator_argv(d, ports, control=control), d)
    restarted_at: float | None = None
    sims: list[Proc] = []
    ctx: zmq.Context[Any] = zmq.Context()
    client = ControlClient(ctx, control)
    sampler: Sampler | None = None
    per = -(-args.agents // args.procs)
    go = os.path.join(d, "go")
    try:
        aggregator.start()
        wait_for("aggregator status", lambda: client.call("status", 0.5), 30, [aggregator])
        for i, first in enumerate(range(0, args.agents, per)):
            count = min(per, args.agents - first)
            sims.append(Proc(f"sim{i}", [
                sys.executable, "-m", "bench.fleet", "sim", "--first", str(first), "--count", str(count),
                "--pull", f"tcp://127.0.0.1:{ports['pull']}", "--control", control,
                "--rate", str(args.rate), "--batch-ms", str(args.batch_ms),
                "--latency-budget-ms", str(args.latency_budget_ms), "--duration-s", str(args.duration_s),
                "--topics", str(args.topics), "--files", str(args.files), "--settle-s", str(args.settle_s),
                "--ready", os.path.join(d, f"ready{i}"), "--go", go,
                "--result", os.path.join(d, f"result{i}.json")], d).start())
        wait_for("every simulated agent's hello", lambda: all(
            os.path.exists(os.path.join(d, f"ready{i}")) for i in range(len(sims))), 300, [aggregator, *sims])
        sampler = Sampler(aggregator.rss_kb, 0.5).start()
        t0 = time.monotonic() + 0.2
        with open(go + ".tmp", "w") as fh:
            fh.write(repr(t0))
        os.rename(go + ".tmp", go)
        time.sleep(max(0.0, t0 - time.monotonic()))
        cpu0, sims_cpu0, machine0 = aggregator.cpu_s(), [p.cpu_s() for p in sims], machine_busy_s()
        written: list[tuple[float, int]] = []
        ctl_s: list[float] = []
        raw_s: list[float] = []
        stalls_ms: list[float] = []
        ctl_failed = 0
        # (seconds into the load, which aggregator process, its CPU seconds, control messages
        # and hellos it has received): the health timeline around a restart.
        timeline: list[tuple[float, int, float, int, int]] = []
        restart_at = t0 + args.restart_at_s if args.restart_at_s else None
        status_bytes = 0
        generation, cpu_before_restart = 0, 0.0
        next_ctl = t0
        while time.monotonic() < t0 + args.duration_s:
            t = time.monotonic()
            if restart_at is not None and t >= restart_at:
                restart_at = None
                cpu_before_restart = aggregator.cpu_s() - cpu0
                aggregator.stop(timeout_s=30)
                aggregator = Proc("aggregator", aggregator.argv, d).start()
                generation, cpu0 = generation + 1, 0.0
                restarted_at = time.monotonic() - t0
                wait_for("the restarted aggregator", lambda: client.call("status", 0.5), 30, [aggregator])
            size = sample(client, aggregator, generation, t0, written, raw_s, timeline, stalls_ms)
            status_bytes = size or status_bytes
            if time.monotonic() >= next_ctl:
                next_ctl = time.monotonic() + args.status_every_s
                took = ctl_status(control_endpoint)
                if took is None:
                    ctl_failed += 1
                else:
                    ctl_s.append(took)
            time.sleep(max(0.0, args.sample_every_s - (time.monotonic() - t)))
        t_load_end = time.monotonic()
        cpu1, sims_cpu1, machine1 = aggregator.cpu_s(), [p.cpu_s() for p in sims], machine_busy_s()
        for p in sims:
            if p.wait(args.settle_s + 120) is None:
                raise TimeoutError(f"{p.name} did not finish")
            if p.popen is not None and p.popen.returncode != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.tail()}")
        final = client.call("status", 10) or {}
        sampler.stop()
        rss = [v for _, v in sampler.samples]
        hwm = aggregator.peak_rss_kb()
        code = aggregator.stop()
    finally:
        if sampler is not None:
            sampler.stop()
        for p in sims:
            p.stop(timeout_s=5)
        aggregator.stop(timeout_s=10)
        client.close()
        ctx.term()
    results = []
    for i in range(len(sims)):
        with open(os.path.join(d, f"result{i}.json"), "rb") as fh:
            results.append(orjson.loads(fh.read()))
    expected = {int(name[4:]): n for r in results for name, n in r["lines"].items()}
    out = os.path.join(d, "out")
    v = verify([os.path.join(out, t) for t in sorted(os.listdir(out))], expected)
    # The steady rate before any restart: a restarted aggregator counts its lines from zero.
    until = t0 + restarted_at if restarted_at is not None else float("inf")
    warm = [(t, n) for t, n in written if t0 + args.warmup_s <= t < until]
    steady = (warm[-1][1] - warm[0][1]) / (warm[-1][0] - warm[0][0]) if len(warm) >= 2 else float("nan")
    lat = [x for r in results for x in r["latencies_s"]]
    stats: dict[str, int] = {}
    for r in results:
        for k, x in r["stats"].items():
            stats[k] = stats.get(k, 0) + x
    totals = final.get("totals", {})
    r = {
        "agents": args.agents, "procs": len(sims), "rate": args.rate, "duration_s": args.duration_s,
        "files": args.files, "topics": min(args.topics, args.agents * args.files),
        "offered_lines_per_s": args.agents * args.files * args.rate, "generated": sum(expected.values()),
        "topic_files_open": final.get("open_files"), "topic_files_open_max": final.get("open_files_max"),
        "steady_lines_per_s": steady, "written_samples": written,
        "ack_latency_ms": {"n": len(lat), "p50": 1000 * _pct(lat, 0.5), "p90": 1000 * _pct(lat, 0.9),
                           "p99": 1000 * _pct(lat, 0.99), "max": 1000 * max(lat, default=float("nan"))},
        "aggregator_rss_kb": {"first": rss[0] if rss else 0, "peak": max(rss, default=0),
                              "last": rss[-1] if rss else 0, "hwm": hwm},
        "aggregator_rss_timeline_kb": [(round(t - t0, 1), x) for t, x in sampler.samples],
        "aggregator_cpu_per_s": (cpu_before_restart + cpu1 - cpu0) / (t_load_end - t0),
        "aggregator_cpu_s_per_m_lines": cpu_per_m_lines(written, t0, t_load_end, cpu1 - cpu0)
        if restarted_at is None else None,
        "restart": restart_health(timeline, restarted_at, args.warmup_s),
        "sim_cpu_per_s": sum(b - a for a, b in zip(sims_cpu0, sims_cpu1, strict=True)) / (t_load_end - t0),
        "machine_busy_cores": (machine1 - machine0) / (t_load_end - t0), "cpus": os.cpu_count(),
        "sim_period_ms": 1000 * results[0]["period_s"], "sim_setup_s": max(r["setup_s"] for r in results),
        "sim_peak_rss_kb": sum(r["peak_rss_kb"] for r in results),
        "sim_late_s": max(r["late_s"] for r in results),
        "ctl_status_s": ctl_s, "ctl_failed": ctl_failed, "raw_status_s": raw_s,
        # The aggregator's loop lateness (status: the longest timer delay in the last 10-20 s),
        # sampled after the warm-up.
        "loop_stall_ms": [x for (t, _), x in zip(written, stalls_ms, strict=True) if t >= t0 + args.warmup_s],
        "status_reply_bytes": status_bytes,
        "settle_s": max(r["t_settled"] - r["t_load_end"] for r in results),
        "unacked_lines": sum(r["unacked_lines"] for r in results), "stats": stats,
        "aggregator_totals": {k: totals.get(k) for k in (
            "lines_written", "batches", "commits", "duplicates_dropped", "resyncs", "malformed_dropped")},
        "agents_in_status": len(final.get("agents", [])), "exit_code": code, "verify": v,
    }
    r["invalid"] = invalid_reasons(r)
    return r


def sample(client: ControlClient, aggregator: Proc, generation: int, t0: float,
           written: list[tuple[float, int]], raw_s: list[float],
           timeline: list[tuple[float, int, float, int, int]], stalls_ms: list[float]) -> int | None:
    """One status request on the open socket: lines written, its latency, the health timeline,
    the loop's lateness (its longest in the last 10-20 s). Returns the reply's size in bytes
    (None: no reply)."""
    t = time.monotonic()
    s = client.call("status", 10)
    if s is None:
        return None
    now = time.monotonic()
    raw_s.append(now - t)
    written.append((now, s["totals"]["lines_written"]))
    stalls_ms.append(float(s.get("loop", {}).get("stall_recent_ms", 0.0)))
    control = s.get("control", {})
    timeline.append((now - t0, generation, aggregator.cpu_s(), control.get("messages_received", 0),
                     control.get("commands", {}).get("hello", 0)))
    return len(orjson.dumps(s))


def restart_health(timeline: list[tuple[float, int, float, int, int]], restarted_at: float | None,
                   warmup_s: float) -> dict[str, Any] | None:
    """The aggregator's CPU (cores) and control messages/s (hellos/s apart) per sampling interval,
    their steady level before the restart (medians after the warm-up), and how long after the
    restart until every later interval is back within 1.5x that level (plus a small floor)."""
    if restarted_at is None:
        return None
    rates = []
    for (t0, g0, c0, m0, h0), (t1, g1, c1, m1, h1) in itertools.pairwise(timeline):
        if g0 == g1 and t1 > t0:
            dt = t1 - t0
            rates.append((t1, (c1 - c0) / dt, (m1 - m0) / dt, (h1 - h0) / dt))
    before = [r for r in rates if warmup_s <= r[0] < restarted_at]
    after = [r for r in rates if r[0] > restarted_at]
    if not before or not after:
        return {"restarted_at_s": restarted_at, "recovered_after_s": None}
    cpu = statistics.median(r[1] for r in before)
    msgs = statistics.median(r[2] for r in before)
    hellos = statistics.median(r[3] for r in before)

    def steady(r: tuple[float, float, float, float]) -> bool:
        return r[1] <= 1.5 * cpu + 0.05 and r[2] <= 1.5 * msgs + 20 and r[3] <= 1.5 * hellos + 5

    recovered = None
    for i, r in enumerate(after):
        if all(steady(x) for x in after[i:]):
            recovered = r[0] - restarted_at
            break
    return {"restarted_at_s": round(restarted_at, 1), "recovered_after_s": recovered,
            "steady_cpu_cores": cpu, "steady_control_per_s": msgs, "steady_hellos_per_s": hellos,
            "peak_after_cpu_cores": max(r[1] for r in after),
            "peak_after_control_per_s": max(r[2] for r in after),
            "peak_after_hellos_per_s": max(r[3] for r in after),
            "last_cpu_cores": after[-1][1], "last_control_per_s": after[-1][2],
            "timeline": [(round(t, 1), round(c, 3), round(m), round(h)) for t, c, m, h in rates]}


def report(r: dict[str, Any]) -> str:
    lat, rss, v = r["ack_latency_ms"], r["aggregator_rss_kb"], r["verify"]
    ok = v["missing"] == v["duplicated"] == v["out_of_order"] == v["foreign"] == 0 and r["unacked_lines"] == 0
    med = statistics.median
    rows = [
        f"fleet: {r['agents']} agents in {r['procs']} processes, {r.get('files', 1)} files each into"
        f" {r.get('topics', '?')} topics, {r['rate']} lines/s per file (offered"
        f" {r['offered_lines_per_s']:,} lines/s) for {r['duration_s']:g}s; {os.cpu_count()} CPUs",
        f"  {'topic files open / kept open at most':34} {r.get('topic_files_open')} /"
        f" {r.get('topic_files_open_max')}",
        f"  {'lines/s written (steady)':34} {r['steady_lines_per_s']:>12,.0f}   "
        f"({100 * r['steady_lines_per_s'] / r['offered_lines_per_s']:.0f}% of offered)",
        f"  {'ack latency ms p50 / p90 / p99 / max':34} {lat['p50']:>6.1f} / {lat['p90']:.1f} / "
        f"{lat['p99']:.1f} / {lat['max']:.1f}  ({lat['n']:,} batches)",
        f"  {'aggregator RSS MiB first / peak':34} {rss['first'] / 1024:>6.0f} / {rss['peak'] / 1024:.0f}"
        f"  (VmHWM {rss['hwm'] / 1024:.0f})",
        f"  {'aggregator CPU (cores busy)':34} {r['aggregator_cpu_per_s']:>8.2f}   (simulators "
        f"{r['sim_cpu_per_s']:.2f}, the whole machine {r['machine_busy_cores']:.2f} of {r['cpus']})",
        f"  {'aggregator CPU s per M lines':34} " + (
            f"{per_m:>8.2f}   (at the offered rate: {per_m * r['offered_lines_per_s'] / 1e6:.2f} cores)"
            if (per_m := r.get("aggregator_cpu_s_per_m_lines")) is not None else "       -"),
        f"  {'simulated read cycle ms':34} {r['sim_period_ms']:>8.1f}   (batches made and encoded up front"
        f" in {r['sim_setup_s']:.1f}s; simulators' peak RSS {r['sim_peak_rss_kb'] / 1024:.0f} MiB in all;"
        f" latest cycle {1000 * r['sim_late_s']:.0f} ms late)",
    ]
    if r["ctl_status_s"]:
        rows.append(f"  {'aggregatorctl status --json s':34} {med(r['ctl_status_s']):>8.3f}   median of "
                    f"{len(r['ctl_status_s'])} (min {min(r['ctl_status_s']):.3f}, max "
                    f"{max(r['ctl_status_s']):.3f}), failed {r['ctl_failed']}; reply "
                    f"{r['status_reply_bytes'] / 1024:.0f} KiB")
    else:
        rows.append(f"  aggregatorctl status --json: never answered ({r['ctl_failed']} tries)")
    if r["raw_status_s"]:
        rows.append(f"  {'status request on an open socket s':34} {med(r['raw_status_s']):>8.3f}   "
                    f"median (max {max(r['raw_status_s']):.3f})")
    if r.get("loop_stall_ms"):
        stalls = r["loop_stall_ms"]
        rows.append(f"  {'aggregator loop lateness ms':34} {med(stalls):>8.1f}   median of its 10-20 s maxima"
                    f" after the warm-up (max {max(stalls):.1f})")
    rows.append(f"  settle after the load: {r['settle_s']:.1f}s, lines never acknowledged "
                f"{r['unacked_lines']}")
    rows.append("  aggregator: " + ", ".join(f"{k} {x}" for k, x in r["aggregator_totals"].items())
                + f", agents listed {r['agents_in_status']}")
    rows.append("  simulators: " + ", ".join(f"{k} {x}" for k, x in r["stats"].items()))
    rs = r.get("restart")
    if rs is not None and rs.get("steady_cpu_cores") is not None:
        back = rs["recovered_after_s"]
        rows.append(
            f"  restart at {rs['restarted_at_s']}s: steady CPU {rs['steady_cpu_cores']:.2f} cores, "
            f"{rs['steady_control_per_s']:.0f} control msgs/s, {rs['steady_hellos_per_s']:.0f} hellos/s; "
            f"peak after {rs['peak_after_cpu_cores']:.2f} cores, "
            f"{rs['peak_after_control_per_s']:.0f} msgs/s, "
            f"{rs['peak_after_hellos_per_s']:.0f} hellos/s; back to steady after "
            + (f"{back:.1f}s" if back is not None else "NEVER"))
    rows.append(f"  check: {'ok' if ok else 'FAILED'} ({r['generated']:,} lines generated; " +
                ", ".join(f"{k} {x}" for k, x in v.items()) + ")")
    reasons = r["invalid"]
    rows.append("  measurement: " + ("valid (the aggregator had the CPU it wanted)" if not reasons else
                                     "INVALID: " + "; ".join(reasons)))
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="role")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--procs", type=int, default=2,
                   help="simulator processes (one per core: more only add context switches)")
    p.add_argument("--rate", type=int, default=100, help="lines/s per agent (per file with --files)")
    p.add_argument("--duration-s", type=float, default=30)
    p.add_argument("--batch-ms", type=int, default=0,
                   help="each agent ships what it has this often (0: as a real agent at --latency-budget-ms)")
    p.add_argument("--latency-budget-ms", type=int, default=AGENT_DEFAULTS["latency_budget_ms"],
                   help="the agents' latency_budget_ms (their read cycles, unless --batch-ms)")
    p.add_argument("--topics", type=int, default=10)
    p.add_argument("--files", type=int, default=1, help="files (streams) per agent, dealt over the topics")
    p.add_argument("--warmup-s", type=float, default=5, help="not counted in the steady rate")
    p.add_argument("--status-every-s", type=float, default=2, help="how often to time aggregatorctl status")
    p.add_argument("--sample-every-s", type=float, default=0.5,
                   help="how often to sample the aggregator's status, CPU and control messages")
    p.add_argument("--restart-at-s", type=float, default=0,
                   help="SIGTERM the aggregator this far into the load and start it again (0: never)")
    p.add_argument("--settle-s", type=float, default=30, help="after the load, time to get every ack")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    s = sub.add_parser("sim", help="(internal) one simulator process")
    s.add_argument("--first", type=int, required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--pull", required=True)
    s.add_argument("--control", required=True)
    s.add_argument("--rate", type=int, default=100)
    s.add_argument("--batch-ms", type=int, default=0)
    s.add_argument("--latency-budget-ms", type=int, default=AGENT_DEFAULTS["latency_budget_ms"])
    s.add_argument("--duration-s", type=float, default=30)
    s.add_argument("--topics", type=int, default=10)
    s.add_argument("--files", type=int, default=1)
    s.add_argument("--settle-s", type=float, default=30)
    s.add_argument("--ready", required=True)
    s.add_argument("--go", required=True)
    s.add_argument("--result", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "sim":
        return simulate(args)
    if args.duration_s <= args.warmup_s:
        print(f"fleet: --duration-s {args.duration_s:g} leaves nothing after --warmup-s {args.warmup_s:g}"
              " (not counted in the steady rate): give a longer duration or a shorter warm-up",
              file=sys.stderr)
        return 2
    # Each agent: two connections on each side (and ZeroMQ's own descriptors), the topic files.
    limit = raise_nofile(4 * args.agents + args.topics + 1024)
    if limit < 2 * args.agents + 256:
        print(f"fleet: the descriptor limit is {limit}, too low for {args.agents} agents", file=sys.stderr)
        return 1
    d = tempfile.mkdtemp(prefix="flf", dir="/tmp")
    try:
        r = run(args, d)
    except (RuntimeError, TimeoutError) as exc:
        print(f"fleet: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"fleet: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    print(report(r))
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(r, option=orjson.OPT_INDENT_2))
    v = r["verify"]
    return 0 if v["missing"] == v["duplicated"] == v["out_of_order"] == v["foreign"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
