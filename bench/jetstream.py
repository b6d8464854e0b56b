"""``make bench-jetstream``: the files sink against JetStream R1 and R3 with two aggregators and a
``fleetlog-writer``, and (``--soak``) a kill -9 soak of the JetStream pipeline.

Three setups run in one go, each with the same agents (real ``fleetlog-agent`` processes, the 8
source files dealt over them):

* ``files``: one aggregator writing its rolling files (today's default);
* ``JetStream R1``: one nats-server (the pinned one of requirements/nats-server.txt, started by
  ``tests/natsserver.py``), two aggregators with ``sink = "jetstream"``, ``replicas = 1``, and one
  ``fleetlog-writer`` making the topic file;
* ``JetStream R3``: the same on a 3-node cluster, ``replicas = 3``;
* ``R1 sync always`` (only with ``--only ...,r1-sync``): R1 with the server's
  ``jetstream { sync_interval: always }``, an fsync before each acknowledgement.

Every agent lists both aggregators; the agents' names are chosen so that their rendezvous
ranking puts half of them on each aggregator first. Workloads:

* backlog: 8 files x 250,000 realistic lines (``bench/corpus.py``) written before anything
  starts; lines/s = lines / (time from starting the agents to the last byte in the final output
  file: the aggregator's, or the writer's); also the rate between 10% and 90% of the bytes;
* live: 20,000 lines/s for 15 s over the 8 files (``bench.peers write``, each line starting with
  its write time); ``bench.peers read`` tails the final output file: latency = arrival minus
  write time, p50 / p99.

CPU is user+system from /proc per process kind (agents, aggregators, nats-servers, writer), from
the moment the agents start (backlog) or the live writer starts (live) to the last line, given in
CPU seconds per million lines. Every output is checked: every line exactly once, in per-file
order, byte-identical to its source.

``--soak``: 20 agents (one file each, both aggregators), an R3 cluster, 2 aggregators, 1 writer;
1,000,000 lines written at ``--soak-rate`` lines/s; every ``--kill-every-s`` one of (an aggregator,
the stream's leader nats-server, the writer) in turn is killed with SIGKILL and started again.
At the end the writer's file must hold every line exactly once and in order: lost, doubled and
out-of-order lines are printed; the exit code is 1 unless all are 0. Bounded by
``--deadline-s``; every process started is stopped on the way out.

    python -m bench.jetstream [--quick] [--only files,r1,r3,r1-sync] [--workloads backlog,live]
                              [--files 8] [--lines-per-file 250000] [--agents 4]
                              [--live-rate 20000] [--live-s 15] [--aggregator-set KEY=VALUE]
                              [--profile DIR] [--keep] [--json PATH]
    python -m bench.jetstream --soak [--soak-agents 20] [--soak-lines 1000000] [--soak-rate 15000]
                              [--kill-every-s 10] [--deadline-s 600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import zmq

from agent.failover import weight
from bench import corpus, pyspy
from bench.backlog import TOPIC, aggregator_argv
from bench.procs import ControlClient, Proc, free_port, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# tests/natsserver.py: a plain module the tests and this bench share
from natsserver import NatsCluster, server_binary

_CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM = "FLEETLOG"
SETUPS = {"files": "files", "r1": "JetStream R1", "r3": "JetStream R3", "r1-sync": "R1 sync always"}
KINDS = ("agent", "aggregator", "nats-server", "writer")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def balanced_names(n: int, controls: list[str]) -> list[str]:
    """n agent names whose rendezvous ranking puts agent i first on aggregator ``i % len``."""
    names = []
    for i in range(n):
        want = controls[i % len(controls)]
        j = 0
        while max(controls, key=lambda c: weight(f"bench{i}-{j}", c)) != want:
            j += 1
        names.append(f"bench{i}-{j}")
    return names


def _toml_str(s: str) -> str:
    return orjson.dumps(s).decode()


class Fleet:
    """One setup's processes in directory ``d``: nats-servers, aggregators, writer, agents.

    ``kind``: "files" (one aggregator, its own files), "r1" or "r3" (two aggregators publishing
    into JetStream, one writer). ``groups``: each agent's source files."""

    def __init__(self, kind: str, d: str, groups: list[list[str]],
                 aggregator_sets: tuple[str, ...] = ()) -> None:
        self.kind, self.d, self.groups = kind, d, groups
        self.aggregator_sets = aggregator_sets
        os.makedirs(d, exist_ok=True)
        self.jetstream = kind != "files"
        self.nats: NatsCluster | None = None
        self.ctx: zmq.Context[Any] = zmq.Context()
        n_aggregators = 2 if self.jetstream else 1
        self.ports = [{k: free_port() for k in ("pull", "xsub", "xpub")} for _ in range(n_aggregators)]
        self.controls = [f"ipc://{d}/a{i}.sock" for i in range(n_aggregators)]
        self.aggregators: list[Proc] = []
        self.writer: Proc | None = None
        self.writer_control = f"ipc://{d}/w.sock"
        self.agents: list[Proc] = []
        self.names = balanced_names(len(groups), self.controls)
        self.restarts = 0
        out_dir = os.path.join(d, "wout" if self.jetstream else "a0", "out")
        self.out = os.path.join(out_dir, TOPIC, f"{TOPIC}.log")
        self.out_dir = os.path.join(out_dir, TOPIC)

    # -- processes ---------------------------------------------------------------------------

    def _aggregator_proc(self, i: int) -> Proc:
        extra: tuple[str, ...] = self.aggregator_sets
        if self.jetstream:
            assert self.nats is not None
            extra += ('aggregator.sink="jetstream"',
                     f"aggregator.jetstream.servers={orjson.dumps(self.nats.urls).decode()}",
                     f"aggregator.jetstream.replicas={3 if self.kind == 'r3' else 1}",
                     f'aggregator.jetstream.stream="{STREAM}"')
        name = f"aggregator{i}" + (f"-{self.restarts}" if self.restarts else "")
        return Proc(name, aggregator_argv(os.path.join(self.d, f"a{i}"), self.ports[i], extra,
                                          control=self.controls[i]), self.d)

    def _writer_proc(self) -> Proc:
        assert self.nats is not None
        sets = {"output_dir": _toml_str(os.path.join(self.d, "wout", "out")),
                "state_dir": _toml_str(os.path.join(self.d, "wout", "state")),
                "servers": orjson.dumps(self.nats.urls).decode(), "stream": f'"{STREAM}"',
                "control": _toml_str(self.writer_control), "rotate_max_bytes": "0", "rotate_interval_s": "0"}
        name = "writer" + (f"-{self.restarts}" if self.restarts else "")
        return Proc(name, [sys.executable, "-m", "writer",
                           *(a for k, v in sets.items() for a in ("--set", f"writer.{k}={v}"))], self.d)

    def _agent_proc(self, i: int) -> Proc:
        st = os.path.join(self.d, f"st{i}")
        aggs = ", ".join(f'{{data = "tcp://127.0.0.1:{p["pull"]}", control = {_toml_str(c)}}}'
                         for p, c in zip(self.ports, self.controls, strict=True))
        paths = ", ".join(_toml_str(p) for p in self.groups[i])
        sets = [f"agent.state_dir={_toml_str(st)}", f"agent.aggregators=[{aggs}]",
                f'agent.name="{self.names[i]}"', 'agent.mode="push"',
                f'sources=[{{paths=[{paths}], topic="{TOPIC}"}}]']
        return Proc(f"agent{i}", [sys.executable, "-m", "agent", *(a for s in sets for a in ("--set", s))],
                    self.d)

    def _status(self, control: str, timeout_s: float = 0.5) -> dict[str, Any] | None:
        c = ControlClient(self.ctx, control)
        try:
            return c.call("status", timeout_s)
        finally:
            c.close()

    def start_servers(self) -> None:
        """nats-servers, aggregators and the writer, each answering its status."""
        if self.jetstream:
            root = Path(self.d) / "nats"
            # r1-sync: the server fsyncs each write before acknowledging it (2.10+)
            self.nats = NatsCluster.cluster(root, 3) if self.kind == "r3" else NatsCluster.single(
                root, jetstream_conf="sync_interval: always" if self.kind == "r1-sync" else "")
        for i in range(len(self.controls)):
            p = self._aggregator_proc(i).start()
            self.aggregators.append(p)
            # one at a time: the first creates the stream, the next finds it
            control = self.controls[i]
            wait_for(f"{p.name} status", lambda c=control: self._status(c), 60, [p])
            if self.jetstream:
                wait_for(f"{p.name} connected to NATS", lambda c=control: (
                    (self._status(c) or {}).get("jetstream") or {}).get("connected"), 60, [p])
        if self.jetstream:
            self.writer = self._writer_proc().start()
            wait_for("writer status", lambda: self._status(self.writer_control), 60, [self.writer])

    def start_agents(self) -> None:
        self.agents = [self._agent_proc(i).start() for i in range(len(self.groups))]

    def daemons(self) -> list[Proc]:
        return [*self.aggregators, *([self.writer] if self.writer else []), *self.agents]

    def pids(self) -> dict[str, list[int]]:
        """Live pids by process kind."""
        nats = [n.proc.pid for n in self.nats.nodes if n.alive() and n.proc] if self.nats else []
        return {"agent": [p.pid for p in self.agents if p.alive()],
                "aggregator": [p.pid for p in self.aggregators if p.alive()],
                "nats-server": nats,
                "writer": [self.writer.pid] if self.writer and self.writer.alive() else []}

    def cpu(self) -> dict[str, float]:
        return {k: sum(cpu_of(p) for p in pids) for k, pids in self.pids().items()}

    def close(self) -> None:
        for p in (*self.agents, *self.aggregators, *([self.writer] if self.writer else [])):
            p.stop(timeout_s=10)
        if self.nats is not None:
            self.nats.close()
        self.ctx.term()

    # -- faults (the soak) ----------------------------------------------------------------------

    def kill_restart_aggregator(self, i: int) -> str:
        old = self.aggregators[i]
        old.stop(signal.SIGKILL)
        self.restarts += 1
        self.aggregators[i] = self._aggregator_proc(i).start()
        return f"aggregator {i} (pid {old.pid})"

    def kill_restart_writer(self) -> str:
        assert self.writer is not None
        old = self.writer
        old.stop(signal.SIGKILL)
        self.restarts += 1
        self.writer = self._writer_proc().start()
        return f"writer (pid {old.pid})"

    def kill_restart_leader(self) -> str:
        assert self.nats is not None
        i = self.nats.stream_leader(STREAM)
        self.nats.kill(i)
        self.nats.restart(i)
        return f"nats-server n{i}, the stream leader"


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _wait_bytes(fleet: Fleet, expected: int, timeout_s: float) -> tuple[float, float, float]:
    """Poll the output's size until it holds ``expected`` bytes: the times it first held 10%,
    90% and all of them."""
    marks: dict[float, float] = {}

    def done() -> float | None:
        size, now = _size(fleet.out), time.monotonic()
        for f in (0.1, 0.9):
            if size >= f * expected:
                marks.setdefault(f, now)
        return now if size >= expected else None
    t_last = float(wait_for(f"{expected} bytes in {fleet.out}", done, timeout_s, fleet.daemons(),
                            interval_s=0.005))
    return marks[0.1], marks[0.9], t_last


# ---- the comparison ------------------------------------------------------------------------------

def deal(sources: list[str], agents: int) -> list[list[str]]:
    """Source files dealt round-robin over ``agents`` agents."""
    return [sources[i::agents] for i in range(agents)]


def run_backlog(kind: str, d: str, sources: list[str], per_file: int,
                args: argparse.Namespace) -> dict[str, Any]:
    size = sum(os.path.getsize(p) for p in sources)
    fleet = Fleet(kind, d, deal(sources, args.agents), tuple(args.aggregator_set))
    recorders: list[Proc] = []
    try:
        fleet.start_servers()
        cpu0 = fleet.cpu()
        t0 = time.monotonic()
        fleet.start_agents()
        if args.profile and kind == "r1":
            exe = pyspy.find()
            if exe is None:
                print("bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
            else:
                os.makedirs(args.profile, exist_ok=True)
                recorders = [pyspy.record(exe, p, args.profile)
                             for p in (*fleet.aggregators, *([fleet.writer] if fleet.writer else []))]
        t10, t90, t_last = _wait_bytes(fleet, size, args.timeout_s)
        cpu1 = fleet.cpu()
        for r in recorders:
            pyspy.finish(r)
        split = [sum(1 for n in fleet.names if max(fleet.controls, key=lambda c: weight(n, c)) == c)
                 for c in fleet.controls]
    finally:
        for r in recorders:
            r.stop(timeout_s=5)
        fleet.close()
    lines = per_file * len(sources)
    return {"lines_per_s": lines / (t_last - t0), "wall_s": t_last - t0, "lines": lines,
            "steady_lines_per_s": 0.8 * lines / max(t90 - t10, 1e-9),
            "cpu_s": {k: cpu1[k] - cpu0.get(k, 0.0) for k in KINDS}, "agents_per_aggregator": split,
            "verdict": corpus.verify(corpus.output_files(fleet.out_dir, TOPIC), sources, per_file)}


def run_live(kind: str, d: str, args: argparse.Namespace) -> dict[str, Any]:
    logs = os.path.join(d, "logs")
    os.makedirs(logs, exist_ok=True)
    sources = [os.path.join(logs, f"f{i}.log") for i in range(args.files)]
    for path in sources:
        open(path, "wb").close()  # exist before the agents start: they follow them from 0
    per_file = int(args.live_rate * args.live_s) // args.files
    fleet = Fleet(kind, os.path.join(d, "run"), deal(sources, args.agents), tuple(args.aggregator_set))
    me = [sys.executable, "-m", "bench.peers"]
    result = os.path.join(d, "reader.json")
    reader = Proc("reader", [*me, "read", "--out", fleet.out, "--expect", str(per_file * args.files),
                             "--timeout-s", str(args.live_s + 60), "--stall-s", "15", "--result", result], d)
    feeder = Proc("live-writer", [*me, "write", "--rate", str(args.live_rate), "--duration-s",
                                  str(args.live_s), "--per-file", str(per_file), *sources], d)
    try:
        fleet.start_servers()
        fleet.start_agents()
        reader.start()
        for i in range(len(fleet.agents)):   # every agent is up and following its (empty) files
            sock = f"ipc://{fleet.d}/st{i}/agent.sock"
            wait_for(f"agent {i} status", lambda s=sock: fleet._status(s), 60, fleet.daemons())
        cpu0 = fleet.cpu()
        feeder.start()
        if feeder.wait(args.live_s + 60) is None:
            raise TimeoutError("the live writer did not finish")
        if reader.wait(90) is None:
            raise TimeoutError("the output reader did not finish")
        cpu1 = fleet.cpu()
    finally:
        feeder.stop(timeout_s=5)
        reader.stop(timeout_s=5)
        fleet.close()
    with open(result, "rb") as fh:
        rr = orjson.loads(fh.read())
    lat = sorted(rr["latencies_s"])
    return {"lines": rr["lines"], "cpu_s": {k: cpu1[k] - cpu0.get(k, 0.0) for k in KINDS},
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan"),
            "verdict": corpus.verify(corpus.output_files(fleet.out_dir, TOPIC), sources, per_file)}


def _check(v: corpus.Verdict) -> str:
    if v.ok:
        return "ok"
    return (f"missing {v.missing} dup {v.duplicated} order {v.out_of_order} foreign {v.foreign} "
            f"identical {v.files_identical}/{v.files}")


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'':14} {'backlog':>10} {'vs':>5} {'10-90%':>10}   {'CPU s per M lines (backlog)':^42}   "
            f"{'live':^15}  {'live CPU s/M':>12}  check",
            f"{'':14} {'lines/s':>10} {'files':>5} {'lines/s':>10}   {'agent':>8} {'aggr.':>8} {'nats':>8} "
            f"{'writer':>8} {'total':>6}   {'p50 ms':>7} {'p99 ms':>7}  {'total':>12}"]
    base = (results.get("files") or {}).get("backlog")
    for kind, name in SETUPS.items():
        r = results.get(kind)
        if r is None:
            continue
        b, lv = r.get("backlog"), r.get("live")
        cells = f"{name:14} "
        if b is not None:
            per_m = b["lines"] / 1e6
            cpu = [b["cpu_s"][k] / per_m for k in KINDS]
            ratio = f"{100 * b['lines_per_s'] / base['lines_per_s']:4.0f}%" if base else "    -"
            cells += (f"{b['lines_per_s']:10,.0f} {ratio} {b['steady_lines_per_s']:10,.0f}   "
                      + " ".join(f"{c:8.2f}" for c in cpu)
                      + f" {sum(cpu):6.2f}   ")
        else:
            cells += f"{'-':>10} {'':5} {'':10}   {'':42}   "
        if lv is not None:
            lcpu = sum(lv["cpu_s"].values()) / (lv["lines"] / 1e6) if lv["lines"] else float("nan")
            cells += f"{lv['p50_ms']:7.1f} {lv['p99_ms']:7.1f}  {lcpu:12.2f}"
        else:
            cells += f"{'-':>7} {'-':>7}  {'-':>12}"
        checks = [f"{w} {_check(x['verdict'])}" for w, x in (("backlog", b), ("live", lv)) if x is not None]
        rows.append(cells + "  " + ", ".join(checks))
    r1 = (results.get("r1") or {}).get("backlog")
    if base and r1:
        pct = 100 * r1["lines_per_s"] / base["lines_per_s"]
        rows.append("")
        rows.append(f"JetStream R1 / files: throughput {pct:.0f}% (target >= 50%: "
                    f"{'met' if pct >= 50 else 'MISSED'})")
    r3 = (results.get("r3") or {}).get("backlog")
    if base and r3:
        rows.append(f"JetStream R3 / files: throughput {100 * r3['lines_per_s'] / base['lines_per_s']:.0f}%")
    for kind, r in results.items():
        if "backlog" in r and len(r["backlog"]["agents_per_aggregator"]) > 1:
            rows.append(f"{SETUPS[kind]}: agents whose first choice is each aggregator: "
                        f"{r['backlog']['agents_per_aggregator']}")
            break
    return "\n".join(rows)


def compare(args: argparse.Namespace, d: str) -> int:
    t = time.monotonic()
    wanted = [k for k in args.only.split(",") if k]
    workloads = [w for w in args.workloads.split(",") if w]
    results: dict[str, dict[str, Any]] = {k: {} for k in wanted}
    sources: list[str] = []
    if "backlog" in workloads:
        sources = corpus.generate(os.path.join(d, "logs"), args.files, args.lines_per_file, args.seed)
        size = sum(os.path.getsize(p) for p in sources)
        print(f"bench: backlog {args.files} x {args.lines_per_file:,} lines, {size / 1e6:.0f} MB, "
              f"generated in {time.monotonic() - t:.1f}s; {args.agents} agents; "
              f"live {args.live_rate:,} lines/s for {args.live_s:g}s; {os.cpu_count()} CPUs; "
              f"nats-server {server_binary()}; in {d}", flush=True)
    ok = True
    for workload in workloads:
        for kind in wanted:
            rd = os.path.join(d, f"{workload}-{kind}")
            try:
                if workload == "backlog":
                    r = run_backlog(kind, rd, sources, args.lines_per_file, args)
                    said = f"{r['lines_per_s']:,.0f} lines/s"
                else:
                    r = run_live(kind, rd, args)
                    said = f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
            except (RuntimeError, TimeoutError, OSError) as exc:
                print(f"bench: {workload} {SETUPS[kind]} failed: {exc}", file=sys.stderr, flush=True)
                ok = False
                continue
            finally:
                if not args.keep:
                    shutil.rmtree(rd, ignore_errors=True)
            results[kind][workload] = r
            ok = ok and r["verdict"].ok
            print(f"bench: {workload} {SETUPS[kind]}: {said}, {_check(r['verdict'])}", flush=True)
    print(table(results))
    if args.profile:
        for name in ("aggregator0", "aggregator1", "writer"):
            path = os.path.join(args.profile, f"{name}.collapsed.txt")
            if os.path.exists(path):
                print(f"-- {name} (JetStream R1 backlog)")
                print(pyspy.summarize(path))
    if args.json:
        doc = {k: {w: {**x, "verdict": {**vars(x["verdict"]), "ok": x["verdict"].ok}} for w, x in r.items()}
               for k, r in results.items()}
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps({"args": vars(args), "results": doc}, option=orjson.OPT_INDENT_2))
    return 0 if ok else 1


# ---- the soak ------------------------------------------------------------------------------------

def line_ends(path: str) -> list[int]:
    """The offset after each line of ``path``."""
    with open(path, "rb") as fh:
        data = fh.read()
    ends, i = [], data.find(b"\n")
    while i >= 0:
        ends.append(i + 1)
        i = data.find(b"\n", i + 1)
    return ends


class Feeder(threading.Thread):
    """Copies the source files into the followed files at ``rate`` lines/s in all (round-robin,
    whole lines, in 10 ms steps), so the soak's lines flow while processes are killed."""

    def __init__(self, sources: list[str], targets: list[str], rate: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.sources, self.targets, self.rate = sources, targets, rate
        self.ends = [line_ends(p) for p in sources]
        self.total = sum(len(e) for e in self.ends)
        self.written = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        src = [os.open(p, os.O_RDONLY) for p in self.sources]
        dst = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in self.targets]
        done = [0] * len(src)  # lines copied per file
        t0 = time.monotonic()
        try:
            while self.written < self.total and not self.stop_event.is_set():
                due = min(self.total, int((time.monotonic() - t0) * self.rate) + 1)
                per = (due + len(src) - 1) // len(src)
                for f in range(len(src)):
                    n = min(per, len(self.ends[f]))
                    if n > done[f]:
                        start = self.ends[f][done[f] - 1] if done[f] else 0
                        end = self.ends[f][n - 1]
                        os.write(dst[f], os.pread(src[f], end - start, start))
                        self.written += n - done[f]
                        done[f] = n
                self.stop_event.wait(0.01)
        finally:
            for fd in (*src, *dst):
                os.close(fd)


def soak_counters(fleet: Fleet) -> dict[str, int]:
    """What the exactly-once machinery did: the agents' aggregator switches and the live
    aggregators' JetStream counters (a restarted aggregator's count from its restart)."""
    out = {"agent switches": 0}
    for i in range(len(fleet.agents)):
        s = fleet._status(f"ipc://{fleet.d}/st{i}/agent.sock", 2.0) or {}
        out["agent switches"] += int((s.get("aggregators") or {}).get("switches") or 0)
    for control in fleet.controls:
        js = (fleet._status(control, 2.0) or {}).get("jetstream") or {}
        for k in ("duplicates", "precondition_refusals", "already_in", "resyncs", "retries"):
            out[f"aggregators' {k}"] = out.get(f"aggregators' {k}", 0) + int(js.get(k) or 0)
    return out


def soak(args: argparse.Namespace, d: str) -> int:
    per_file = args.soak_lines // args.soak_agents
    t = time.monotonic()
    pre = corpus.generate(os.path.join(d, "src"), args.soak_agents, per_file, args.seed)
    logs = os.path.join(d, "logs")
    os.makedirs(logs)
    sources = [os.path.join(logs, os.path.basename(p)) for p in pre]
    for p in sources:
        open(p, "wb").close()
    size = sum(os.path.getsize(p) for p in pre)
    print(f"soak: {args.soak_agents} agents x {per_file:,} lines = {per_file * args.soak_agents:,} lines "
          f"({size / 1e6:.0f} MB, generated in {time.monotonic() - t:.1f}s) at {args.soak_rate:,.0f} "
          f"lines/s; R3, 2 aggregators, 1 writer; a kill -9 every {args.kill_every_s:g}s; "
          f"deadline {args.deadline_s:g}s; in {d}", flush=True)
    deadline = time.monotonic() + args.deadline_s
    fleet = Fleet("r3", os.path.join(d, "run"), [[p] for p in sources])
    feeder = Feeder(pre, sources, args.soak_rate)
    kills: list[str] = []
    counters: dict[str, int] = {}
    complete = False
    try:
        fleet.start_servers()
        fleet.start_agents()
        t0 = time.monotonic()
        feeder.start()
        victims = ("aggregator", "nats", "writer")
        next_kill = t0 + args.kill_every_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            if _size(fleet.out) >= size and not feeder.is_alive():
                complete = True
                break
            if feeder.is_alive() and now >= next_kill:
                victim = victims[len(kills) % 3]
                if victim == "aggregator":
                    what = fleet.kill_restart_aggregator((len(kills) // 3) % 2)
                elif victim == "nats":
                    what = fleet.kill_restart_leader()
                else:
                    what = fleet.kill_restart_writer()
                kills.append(what)
                print(f"soak: {now - t0:6.1f}s kill -9 {what}, restarted; {feeder.written:,} lines written, "
                      f"{_size(fleet.out) / size:.0%} of the bytes in the writer's file", flush=True)
                next_kill = max(next_kill + args.kill_every_s, time.monotonic() + 1)
            for proc in fleet.daemons():
                if not proc.alive():
                    code = proc.popen.returncode if proc.popen else "?"
                    raise RuntimeError(f"{proc.name} exited (code {code}):\n{proc.tail()}")
            time.sleep(0.05)
        t_end = time.monotonic()
        # the writer has every byte: let it commit, and see that nothing more comes (a duplicate)
        wstatus: dict[str, Any] = {}
        if complete:
            def settled() -> dict[str, Any] | None:
                s = fleet._status(fleet.writer_control, 1.0)
                return s if s and s.get("lag_messages") == 0 else None
            wstatus = wait_for("the writer's lag 0", settled, 60, fleet.daemons(), interval_s=0.2)
        counters = soak_counters(fleet)
    finally:
        feeder.stop_event.set()
        feeder.join(10)
        fleet.close()
    v = corpus.verify(corpus.output_files(fleet.out_dir, TOPIC), sources, per_file)
    lines = per_file * args.soak_agents
    print(f"soak: {'complete' if complete else 'NOT complete (deadline)'} after {t_end - t0:.1f}s; "
          f"{len(kills)} kills: " + "; ".join(kills))
    totals = wstatus.get("totals") or {}
    print(f"soak: writer's file: {v.lines:,} lines of {lines:,}: lost {v.missing}, doubled {v.duplicated}, "
          f"out of order {v.out_of_order}, foreign {v.foreign}, "
          f"files byte-identical {v.files_identical}/{v.files}; "
          f"the writer's second net dropped {totals.get('duplicates_dropped', '?')} duplicate lines")
    if complete:
        print("soak: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    print("soak: " + ("ok: every line exactly once, in order" if v.ok else "FAILED"))
    return 0 if v.ok and complete else 1


# ---- command line --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.jetstream", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 4 x 10,000 lines backlog, 2,000 lines/s for 3 s live; with --soak: "
                        "4 agents, 40,000 lines, a kill every 3 s")
    p.add_argument("--only", default="files,r1,r3",
                   help="comma-separated subset of files,r1,r3,r1-sync (R1 with sync_interval: always)")
    p.add_argument("--workloads", default="backlog,live", help="comma-separated subset of backlog,live")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--lines-per-file", type=int, default=250_000)
    p.add_argument("--agents", type=int, default=4, help="agents sharing the files")
    p.add_argument("--live-rate", type=int, default=20_000, help="lines/s, all files together")
    p.add_argument("--live-s", type=float, default=15)
    p.add_argument("--timeout-s", type=float, default=300, help="deadline for each backlog run")
    p.add_argument("--aggregator-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every aggregator, e.g. aggregator.commit_interval_ms=50")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", metavar="DIR", help="record R1's aggregators and writer with py-spy into DIR")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--soak", action="store_true", help="the kill -9 soak instead of the comparison")
    p.add_argument("--soak-agents", type=int, default=20)
    p.add_argument("--soak-lines", type=int, default=1_000_000)
    p.add_argument("--soak-rate", type=float, default=15_000, help="lines/s, all agents together")
    p.add_argument("--kill-every-s", type=float, default=10)
    p.add_argument("--deadline-s", type=float, default=600, help="the soak gives up after this long")
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.lines_per_file, args.agents = 4, 10_000, 2
        args.live_rate, args.live_s = 2_000, 3.0
        args.soak_agents, args.soak_lines, args.soak_rate, args.kill_every_s = 4, 40_000, 4_000, 3.0
        args.deadline_s = min(args.deadline_s, 120)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if server_binary() is None:
        print("bench: nats-server not found: run `make .venv/.installed`", file=sys.stderr)
        return 1
    d = tempfile.mkdtemp(prefix="fljs", dir="/tmp")
    try:
        return soak(args, d) if args.soak else compare(args, d)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"bench: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
