"""Fleet simulator (issue 8.3): one real aggregator, a thousand simulated agents.

``--agents`` (1,000) agents live in ``--procs`` (4) processes. Each has its own identity (its
control DEALER's identity is its name, ``sim-0042``), its own stream (one simulated file), and
speaks the real protocol (``fleetlog.wire``): ``hello`` with its streams, a ``heartbeat`` every
second, batches PUSHed to the aggregator's pull endpoint (each one starting exactly where the
previous one of its stream ended, byte offsets from ``base`` 0), ``ack`` events settle batches,
``resync`` events rewind the stream to the offset the aggregator expects, and batches go again
when nothing is acknowledged for 3 s, as ``agent/daemon.py`` does. Each agent writes ``--rate``
(100) lines/s, shipped every ``--batch-ms`` (100 ms), for ``--duration-s`` (30) seconds, into one of
``--topics`` (10) topics. With ``--files N`` each agent follows N files (N streams, dealt over the
topics in turn, all on the agent's two sockets): many topics without as many connections (10,000
topics from 1,000 agents).

Reported: lines/s written by the aggregator in the steady part of the run (from its status),
ack latency (a batch's first send to the ack that covers it), the aggregator's RSS and CPU, and
how long ``aggregatorctl status --json`` takes to answer during the load (a fresh process each
time, as an operator runs it; and the bare request on an open socket). At the end every line is
checked: each agent's lines exactly once and in order.

    python -m bench.fleet [--agents 1000] [--procs 4] [--rate 100] [--duration-s 30]
                          [--batch-ms 100] [--topics 10] [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq

from bench.backlog import aggregator_argv
from bench.procs import ControlClient, Proc, Sampler, free_port, wait_for
from fleetlog import wire

ACK_TIMEOUT_S = 3.0          # agent.ack_timeout_ms's default
HEARTBEAT_S = 1.0            # agent.heartbeat_interval_ms's default
ID_RE = re.compile(rb" a(\d+)-(\d+) ")
_FILLER = "request handled user=4711 session=9f2c cache=hit upstream=api-03 rows=12 shard=7 took="


# ---- one simulated agent ------------------------------------------------------------------------

@dataclass
class Pending:
    start: int
    end: int
    lines: list[str]
    sent_at: float = 0.0       # first send, for the ack latency; 0 while never sent


@dataclass
class SimAgent:
    index: int
    name: str
    topic: str
    stream: str = field(default_factory=lambda: uuid.uuid4().hex)
    dealer: Any = None
    push: Any = None
    lines: int = 0             # generated so far
    offset: int = 0            # end of what was generated (the simulated file's size)
    seq: int = 0
    rewind_seq: int = 0
    acked: int = 0
    pending: deque[Pending] = field(default_factory=deque)
    shipped: int = 0           # how many of ``pending`` (from the left) are on the wire
    last_progress: float = 0.0
    last_heartbeat: float = 0.0
    hellos: set[int] = field(default_factory=set)  # hellos sent since the last one answered
    hello_at: float = 0.0
    instance: str = ""

    def generate(self, upto_lines: int, now_wall: float) -> None:
        """The application writes lines up to ``upto_lines`` in all: one new pending batch."""
        n = upto_lines - self.lines
        if n <= 0:
            return
        stamp = f"{now_wall:.6f}"
        lines = [f"{stamp} sim app[{self.index}]: INFO a{self.index}-{k} {_FILLER}{k % 997}ms"
                 for k in range(self.lines, upto_lines)]
        size = sum(len(x) for x in lines) + len(lines)  # ASCII: characters are bytes
        self.pending.append(Pending(self.offset, self.offset + size, lines))
        self.lines = upto_lines
        self.offset += size

    def ship(self, now: float, stats: dict[str, int]) -> None:
        while self.shipped < len(self.pending):
            p = self.pending[self.shipped]
            frames = wire.encode_batch(wire.Batch(
                topic=self.topic, agent=self.name, stream=self.stream, base=0,
                path=f"/var/log/sim/{self.name}.log", file=f"sim:{self.index}", seq=self.seq + 1,
                start=p.start, end=p.end, lines=p.lines))
            try:
                self.push.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                stats["hwm_waits"] += 1
                return  # the aggregator is not taking them: like the agent, wait (try at the next tick)
            self.seq += 1
            if not p.sent_at:
                p.sent_at = now
            if self.shipped == 0:
                self.last_progress = now  # nothing was in flight: the ack timeout starts now
            self.shipped += 1
            stats["batches"] += 1

    def on_ack(self, end: Any, now: float, latencies: list[float]) -> None:
        if type(end) is not int or end <= self.acked:
            return
        self.acked = end
        self.last_progress = now
        while self.pending and self.pending[0].end <= end:
            p = self.pending.popleft()
            if p.sent_at:
                latencies.append(now - p.sent_at)
            self.shipped = max(0, self.shipped - 1)

    def on_resync(self, offset: Any, seq: Any, stats: dict[str, int]) -> None:
        if type(offset) is not int or type(seq) is not int or seq < self.rewind_seq:
            return  # stale: sent before our last rewind
        stats["resyncs"] += 1
        for i, p in enumerate(self.pending):
            if p.start == offset:
                self.shipped = min(self.shipped, i)
                break
        else:
            stats["resync_unknown_offset"] += 1
            return
        self.rewind_seq = self.seq + 1

    def check_ack_timeout(self, now: float, stats: dict[str, int]) -> None:
        if self.shipped and now - self.last_progress >= ACK_TIMEOUT_S:
            stats["ack_timeouts"] += 1
            self.shipped = 0
            self.rewind_seq = self.seq + 1
            self.last_progress = now


# ---- one simulator process ----------------------------------------------------------------------

class Simulator:
    """``count`` agents from number ``first`` on, all driven from one thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        files = args.files
        self.agents = [SimAgent(i * files + j, f"sim-{i:04d}", f"fleet{(i * files + j) % args.topics}")
                       for i in range(args.first, args.first + args.count) for j in range(files)]
        # An agent's streams share its sockets; its first stream speaks for it in heartbeats.
        self.by_socket: dict[Any, list[SimAgent]] = {}
        self.by_stream = {a.stream: a for a in self.agents}
        self.by_hello: dict[int, SimAgent] = {}
        self.poller = zmq.Poller()
        self.stats = dict.fromkeys((
            "batches", "hwm_waits", "resyncs", "resync_unknown_offset", "ack_timeouts", "acks", "hellos",
            "heartbeats", "bad_control", "refused", "restarts_seen"), 0)
        self.latencies: list[float] = []
        self.req_ids = iter(range(1, 1 << 62))
        self.ctx: zmq.Context[Any] = zmq.Context()

    def connect(self) -> None:
        self.ctx.set(zmq.MAX_SOCKETS, 2 * len(self.agents) + 64)
        sockets: dict[str, tuple[Any, Any]] = {}
        for a in self.agents:
            if a.name not in sockets:
                dealer = self.ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.setsockopt(zmq.IDENTITY, a.name.encode())
                dealer.setsockopt(zmq.IMMEDIATE, 1)  # as the agent: nothing queues while disconnected
                dealer.connect(self.args.control)
                push = self.ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 0)
                push.setsockopt(zmq.SNDHWM, 256)
                push.connect(self.args.pull)
                self.poller.register(dealer, zmq.POLLIN)
                sockets[a.name] = (dealer, push)
                self.by_socket[dealer] = []
            a.dealer, a.push = sockets[a.name]
            self.by_socket[a.dealer].append(a)

    def close(self) -> None:
        for a in self.agents:
            for sock in (a.dealer, a.push):
                if sock is not None and not sock.closed:
                    sock.close(linger=0)
        self.ctx.term()

    def hello(self, a: SimAgent) -> None:
        req_id = next(self.req_ids)
        try:
            a.dealer.send(wire.encode_request(req_id, "hello",
                                              {"agent": a.name, "mode": "push", "streams": [a.stream]}),
                          flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # not connected: the next heartbeat reply or the retry asks again
        self.by_hello[req_id] = a
        a.hellos.add(req_id)
        a.hello_at = time.monotonic()
        self.stats["hellos"] += 1

    def heartbeat(self, a: SimAgent, now: float) -> None:
        a.last_heartbeat = now
        if not a.instance:
            if now - a.hello_at >= HEARTBEAT_S:
                self.hello(a)  # no answer yet: ask again, once a beat
            return
        try:
            a.dealer.send(wire.encode_request(next(self.req_ids), "heartbeat", {
                "agent": a.name, "mode": "push", "lag_bytes": a.offset - a.acked, "files": 1}),
                flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # the aggregator is away (restarting)
        self.stats["heartbeats"] += 1

    def drain(self, timeout_ms: int) -> None:
        events = self.poller.poll(timeout_ms)
        now = time.monotonic()  # after the poll: an ack is timed when it is read
        for sock, _ in events:
            group = self.by_socket[sock]
            while True:
                try:
                    body = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = wire.decode_control(body)
                except wire.WireError:
                    self.stats["bad_control"] += 1
                    continue
                self.handle(group, msg, now)

    def handle(self, group: list[SimAgent], msg: dict[str, Any], now: float) -> None:
        event = msg.get("event")
        if event == "ack":
            self.stats["acks"] += 1
            streams = msg.get("streams") or {}
            for stream, end in streams.items() if isinstance(streams, dict) else ():
                if (a := self.by_stream.get(stream)) is not None:
                    a.on_ack(end, now, self.latencies)
        elif event == "resync":
            if (a := self.by_stream.get(msg.get("stream"))) is not None:  # type: ignore[arg-type]
                a.on_resync(msg.get("offset"), msg.get("seq"), self.stats)
        elif not msg.get("ok"):
            self.stats["refused"] += 1
        else:
            # The agent's state machine (agent/transport.py): a reply to any hello in flight is
            # the answer; another instance named elsewhere asks for one hello, not one a reply.
            result = msg.get("result") or {}
            instance = result.get("instance", "")
            # The agent's state machine (agent/transport.py): a reply to any hello in flight is
            # the answer; another instance named elsewhere asks for one hello, not one a reply.
            hello = self.by_hello.pop(msg.get("id"), None)  # type: ignore[arg-type]
            if hello is not None and msg.get("id") in hello.hellos:
                hello.hellos.clear()
                if instance != hello.instance:
                    if hello.instance:
                        hello.shipped = 0  # the aggregator restarted: ship everything unacknowledged again
                        self.stats["restarts_seen"] += 1
                    hello.instance = instance
                hello.on_ack((result.get("committed") or {}).get(hello.stream), now, self.latencies)
                return
            for a in group:
                if (instance and a.instance and instance != a.instance
                        and (not a.hellos or now - a.hello_at >= HEARTBEAT_S)):
                    self.hello(a)

    def say_hello(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while any(not a.instance for a in self.agents):
            if time.monotonic() > deadline:
                return False
            now = time.monotonic()
            for a in self.agents:
                if not a.instance and now - a.hello_at >= HEARTBEAT_S:
                    self.hello(a)
            self.drain(100)
        return True

    def load(self, t0: float) -> None:
        """Agent k ticks at t0 + (k/n + m) * period: spread evenly over the period."""
        args, agents = self.args, self.agents
        period = args.batch_ms / 1000
        n = len(agents)
        t_end = t0 + args.duration_s
        k, m = 0, 0
        while True:
            due = t0 + (k / n + m) * period
            if due > t_end:
                return
            now = time.monotonic()
            if due > now:
                self.drain(max(1, math.ceil((due - now) * 1000)))  # never spin on a 0 ms poll
                continue
            a = agents[k]
            a.generate(int(args.rate * (due - t0 + period)), time.time())
            a.ship(now, self.stats)
            if now - a.last_heartbeat >= HEARTBEAT_S and a.index % args.files == 0:
                self.heartbeat(a, now)
            a.check_ack_timeout(now, self.stats)
            k += 1
            if k % 25 == 0:
                self.drain(0)  # read acks at least every 25 agents
            if k == n:
                k, m = 0, m + 1

    def settle(self, timeout_s: float) -> None:
        """Everything generated shipped and acknowledged, within a deadline."""
        deadline = time.monotonic() + timeout_s
        while any(a.pending for a in self.agents) and time.monotonic() < deadline:
            now = time.monotonic()
            for a in self.agents:
                a.ship(now, self.stats)
                a.check_ack_timeout(now, self.stats)
            self.drain(50)


def simulate(args: argparse.Namespace) -> int:
    sim = Simulator(args)
    try:
        sim.connect()
        if not sim.say_hello(60):
            missing = sum(1 for a in sim.agents if not a.instance)
            print(f"sim {args.first}: {missing} agents got no hello reply", file=sys.stderr)
            return 1
        with open(args.ready, "wb"):
            pass
        while not os.path.exists(args.go):
            sim.drain(10)
        with open(args.go, "rb") as fh:
            t0 = float(fh.read())
        cpu0 = os.times()
        sim.load(t0)
        t_load_end = time.monotonic()
        cpu1 = os.times()
        sim.settle(args.settle_s)
        t_settled = time.monotonic()
        agents = sim.agents
        result = {
            "first": args.first, "count": args.count, "t0": t0, "t_load_end": t_load_end,
            "t_settled": t_settled, "lines": {f"sim-{a.index:04d}": a.lines for a in agents},
            "unacked_agents": sum(1 for a in agents if a.pending),
            "unacked_lines": sum(len(p.lines) for a in agents for p in a.pending),
            "latencies_s": sim.latencies, "stats": sim.stats,
            "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), "load_s": t_load_end - t0,
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
                "--duration-s", str(args.duration_s),
                "--topics", str(args.topics), "--files", str(args.files), "--settle-s", str(args.settle_s),
                "--ready", os.path.join(d, f"ready{i}"), "--go", go,
                "--result", os.path.join(d, f"result{i}.json")], d).start())
        wait_for("every simulated agent's hello", lambda: all(
            os.path.exists(os.path.join(d, f"ready{i}")) for i in range(len(sims))), 90, [aggregator, *sims])
        sampler = Sampler(aggregator.rss_kb, 0.5).start()
        t0 = time.monotonic() + 0.2
        with open(go + ".tmp", "w") as fh:
            fh.write(repr(t0))
        os.rename(go + ".tmp", go)
        cpu0 = aggregator.cpu_s()
        written: list[tuple[float, int]] = []
        ctl_s: list[float] = []
        raw_s: list[float] = []
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
            size = sample(client, aggregator, generation, t0, written, raw_s, timeline)
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
        cpu1 = aggregator.cpu_s()
        for p in sims:
            if p.wait(args.settle_s + 30) is None:
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
    return {
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
        "restart": restart_health(timeline, restarted_at, args.warmup_s),
        "sim_cpu_per_s": sum(r["cpu_s"] for r in results) / max(r["load_s"] for r in results),
        "ctl_status_s": ctl_s, "ctl_failed": ctl_failed, "raw_status_s": raw_s,
        "status_reply_bytes": status_bytes,
        "settle_s": max(r["t_settled"] - r["t_load_end"] for r in results),
        "unacked_lines": sum(r["unacked_lines"] for r in results), "stats": stats,
        "aggregator_totals": {k: totals.get(k) for k in (
            "lines_written", "batches", "commits", "duplicates_dropped", "resyncs", "malformed_dropped")},
        "agents_in_status": len(final.get("agents", [])), "exit_code": code, "verify": v,
    }


def sample(client: ControlClient, aggregator: Proc, generation: int, t0: float,
           written: list[tuple[float, int]], raw_s: list[float],
           timeline: list[tuple[float, int, float, int, int]]) -> int | None:
    """One status request on the open socket: lines written, its latency, the health timeline.
    Returns the reply's size in bytes (None: no reply)."""
    t = time.monotonic()
    s = client.call("status", 10)
    if s is None:
        return None
    now = time.monotonic()
    raw_s.append(now - t)
    written.append((now, s["totals"]["lines_written"]))
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
        f"{r['sim_cpu_per_s']:.2f})",
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
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="role")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4, help="simulator processes")
    p.add_argument("--rate", type=int, default=100, help="lines/s per agent (per file with --files)")
    p.add_argument("--duration-s", type=float, default=30)
    p.add_argument("--batch-ms", type=int, default=100, help="each agent ships what it has this often")
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
    s.add_argument("--batch-ms", type=int, default=100)
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
