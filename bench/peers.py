"""``make bench-peers`` (issue 8.1): fleetlog side by side with rsyslog and syslog-ng.

Each shipper runs the way fleetlog does: an "agent" instance tails the 8 source files and forwards
over loopback TCP to an "aggregator" instance that writes the topic's file (rsyslog: imfile ->
omfwd / imtcp -> omfile; syslog-ng: wildcard-file() -> syslog() / syslog() -> file(); RFC 5424
with octet counting between them, so each line arrives byte for byte). One forwarding thread and
in-memory queues, so per-file order holds; syslog-ng with flow-control, so it waits rather than
drops. All of them run in the foreground with private config files, pid files, state and ports on
127.0.0.1 in a temporary directory; nothing is started as a system service and no system config
is read or changed. rsyslog comes from Debian (``apt-get install -y rsyslog`` when missing and we
are root); syslog-ng conflicts with it as a package, so when it is not installed its Debian
package and the libraries it needs are unpacked (``apt-get download`` + ``dpkg -x``) into
``/tmp/fleetlog-bench-peers/`` and run from there.

Workloads:

* backlog: 8 files x 250,000 lines (``bench/corpus.py``) written before anything starts; time from
  starting the agent to the last byte in the output. The bare floor (``bench/floor.py``) runs too.
* live: 20,000 lines/s for 20 s spread over the 8 files, each line starting with its write time;
  a reader process tails the output file and timestamps each line as it appears: latency = arrival
  minus write time. The floor follows the files by polling them every 5 ms (``bench.floor follow``).

* typical (issue 18): a typical node, 500 lines/s for 30 s spread over the 8 files, each line its
  own ``write()`` at its due time (not bunched in 10 ms steps); agent CPU as % of a core, aggregator
  CPU s per million lines, latency p50/p99 as for live.
* idle (issue 18): 8 quiet files (one line each, shipped, then nothing for ``--idle-s``): the
  agent's CPU as % of a core and its RSS at the end; then 10,000 quiet files (``--idle-many``),
  agent CPU only.
* curve: fleetlog alone on the typical workload once per ``--curve`` setting of
  ``agent.latency_budget_ms`` (``--curve-key``): agent CPU against p50 latency.

Every output is checked (each line exactly once, per-file order, byte-identical). A shipper that
cannot be installed or run here gets a row saying why, and the run goes on.

    python -m bench.peers [--quick] [--only fleetlog,rsyslog,syslog-ng,floor] [--keep] [--json PATH]
        [--workloads backlog,live,typical,idle,curve] [--curve 20,40,60,80]
    python -m bench.peers write|read ...     (internal: the live writer and the output reader)
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import corpus
from bench.backlog import TOPIC, agent_argv, aggregator_argv, run_floor
from bench.procs import ControlClient, Proc, free_port, wait_for

PREFIX = "/tmp/fleetlog-bench-peers"
SYSLOG_NG_PACKAGES = ("syslog-ng-core", "libivykis0", "libnet1", "libwrap0", "libpcre3")
SHIPPERS = ("fleetlog", "rsyslog", "syslog-ng", "floor")
WORKLOADS = ("backlog", "live", "typical", "idle", "curve")


# ---- finding the peers ---------------------------------------------------------------------------

@dataclass
class Peer:
    name: str
    argv0: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    module_path: str = ""
    version: str = ""
    missing: str = ""   # why it cannot run here


def _run(argv: list[str], timeout_s: float = 300, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False, **kw)


def _apt_install(package: str) -> str:
    """Install a Debian package; '' on success, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not installed, and not root with apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = _run(["apt-get", "install", "-y", "-q", package], env=env)
    if out.returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)
        out = _run(["apt-get", "install", "-y", "-q", package], env=env)
    return "" if out.returncode == 0 else f"apt-get install {package} failed: " + \
        out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:][0] if out.stderr else "failed"


def _which(name: str) -> str | None:
    """On PATH, or in /usr/sbin (which a non-root PATH often lacks)."""
    sbin = f"/usr/sbin/{name}"
    return shutil.which(name) or (sbin if os.path.exists(sbin) else None)


def find_rsyslog() -> Peer:
    p = Peer("rsyslog")
    exe = _which("rsyslogd")
    if exe is None:
        p.missing = _apt_install("rsyslog")
        exe = _which("rsyslogd")
        if exe is None:
            p.missing = p.missing or "rsyslogd not found after installing"
            return p
    p.argv0 = [exe]
    out = _run([exe, "-v"], 10)
    p.version = out.stdout.decode(errors="replace").split("\n", 1)[0].replace("compiled with:", "").strip()
    return p


def find_syslog_ng() -> Peer:
    """The installed syslog-ng, or the Debian package unpacked into a private prefix."""
    p = Peer("syslog-ng")
    exe = _which("syslog-ng")
    if exe is None:
        root = os.path.join(PREFIX, "syslog-ng")
        exe = os.path.join(root, "usr/sbin/syslog-ng")
        if not os.path.exists(exe):
            why = _unpack(root, SYSLOG_NG_PACKAGES)
            if why:
                p.missing = why
                return p
        p.env = {"LD_LIBRARY_PATH": ":".join(os.path.join(root, d) for d in (
            "usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib/syslog-ng"))}
        mods = sorted(glob.glob(os.path.join(root, "usr/lib/syslog-ng/3.*")))
        p.module_path = mods[-1] if mods else ""
    p.argv0 = [exe]
    out = _run([exe, "--version"], 10, env={**os.environ, **p.env})
    if out.returncode != 0:
        p.missing = "syslog-ng --version failed: " + out.stderr.decode(errors="replace").strip()[-200:]
        return p
    p.version = out.stdout.decode(errors="replace").split("\n", 1)[0].strip()
    return p


def _unpack(root: str, packages: tuple[str, ...]) -> str:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "not installed; needs apt-get and dpkg to unpack it privately"
    debs = os.path.join(PREFIX, "debs")
    os.makedirs(debs, exist_ok=True)
    out = _run(["apt-get", "download", *packages], cwd=debs)
    if out.returncode != 0:
        return "apt-get download failed: " + out.stderr.decode(errors="replace").strip()[-200:]
    os.makedirs(root, exist_ok=True)
    for deb in glob.glob(os.path.join(debs, "*.deb")):
        out = _run(["dpkg", "-x", deb, root])
        if out.returncode != 0:
            return f"dpkg -x {os.path.basename(deb)} failed"
    return ""


# ---- configurations ------------------------------------------------------------------------------

def rsyslog_agent_conf(work: str, logs: str, port: int) -> str:
    return f"""
global(workDirectory="{work}" maxMessageSize="64k" net.enableDNS="off")
module(load="imfile" mode="inotify")
template(name="fwd5424" type="string" string="<13>1 - bench bench - - - %msg%")
input(type="imfile" file="{logs}/*.log" tag="bench" ruleset="fwd" freshStartTail="off")
ruleset(name="fwd" queue.type="FixedArray" queue.size="100000" queue.workerThreads="1") {{
  action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" tcp_framing="octet-counted"
         template="fwd5424" action.resumeRetryCount="-1" action.resumeInterval="1")
}}
"""


def rsyslog_aggregator_conf(work: str, out: str, port: int) -> str:
    return f"""
global(workDirectory="{work}" maxMessageSize="64k" net.enableDNS="off")
module(load="imtcp")
template(name="raw" type="string" string="%msg%\\n")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="write")
ruleset(name="write" queue.type="FixedArray" queue.size="100000" queue.workerThreads="1") {{
  action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on" ioBufferSize="256k")
}}
"""


def syslog_ng_agent_conf(logs: str, port: int, max_files: int = 64) -> str:
    return f"""@version: 3.38
options {{ use-dns(no); stats-freq(0); log-fifo-size(100000); keep-timestamp(no); }};
source s_files {{
  wildcard-file(base-dir("{logs}") filename-pattern("*.log") recursive(no) flags(no-parse)
                follow-freq(0.1) log-iw-size(20000) log-fetch-limit(1000) max-files({max_files}));
}};
destination d_fwd {{ syslog("127.0.0.1" port({port}) transport(tcp)); }};
log {{ source(s_files); destination(d_fwd); flags(flow-control); }};
"""


def syslog_ng_aggregator_conf(out: str, port: int) -> str:
    return f"""@version: 3.38
options {{ use-dns(no); stats-freq(0); log-fifo-size(100000); }};
source s_net {{ syslog(ip(127.0.0.1) port({port}) transport(tcp) log-iw-size(100000) max-connections(10)); }};
destination d_file {{ file("{out}" template("${{MSG}}\\n") create-dirs(yes)); }};
log {{ source(s_net); destination(d_file); flags(flow-control); }};
"""


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def peer_procs(peer: Peer, d: str, logs: str, out: str, max_files: int = 64) -> tuple[Proc, Proc, int]:
    """The aggregator and agent instances of a syslog peer, not started (syslog-ng follows at
    most ``max_files`` files of its wildcard)."""
    port = free_port()
    for sub in ("a", "g"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if peer.name == "rsyslog":
        confs = {"g": rsyslog_aggregator_conf(f"{d}/g", out, port),
                 "a": rsyslog_agent_conf(f"{d}/a", logs, port)}
    else:
        confs = {"g": syslog_ng_aggregator_conf(out, port), "a": syslog_ng_agent_conf(logs, port, max_files)}
    argvs = {}
    for sub, text in confs.items():
        conf = os.path.join(d, sub, f"{peer.name}.conf")
        with open(conf, "w") as fh:
            fh.write(text)
        if peer.name == "rsyslog":
            argvs[sub] = [*peer.argv0, "-n", "-f", conf, "-i", f"{d}/{sub}/pid"]
        else:
            argvs[sub] = [*peer.argv0, "-F", "-f", conf, "--pidfile", f"{d}/{sub}/pid", "--persist-file",
                          f"{d}/{sub}/persist", "--control", f"{d}/{sub}/ctl", "--no-caps"]
            if peer.module_path:
                argvs[sub] += ["--module-path", peer.module_path]
    env_argv = ["env", *(f"{k}={v}" for k, v in peer.env.items())] if peer.env else []
    return (Proc(f"{peer.name}-aggregator", [*env_argv, *argvs["g"]], d),
            Proc(f"{peer.name}-agent", [*env_argv, *argvs["a"]], d), port)


# ---- runs ----------------------------------------------------------------------------------------

@dataclass
class Pipeline:
    """A started agent/aggregator pair and how to tell it is ready."""
    aggregator: Proc
    agent: Proc
    out: str
    cpu0_aggregator: float = 0.0
    control: ControlClient | None = None
    ctx: Any = None

    def close(self) -> None:
        for p in (self.agent, self.aggregator):
            p.stop(timeout_s=10)
        if self.control is not None:
            self.control.close()
        if self.ctx is not None:
            self.ctx.term()


def start_pipeline(shipper: str, peer: Peer | None, d: str, logs: str, max_files: int = 64,
                   floor_follow: tuple[str, ...] = ()) -> Pipeline:
    """The aggregator side started and ready (the agent side is the caller's to start).
    ``floor_follow``: more arguments for the floor's follower (its poll and message shape)."""
    os.makedirs(d, exist_ok=True)
    pl, what, ready = _build(shipper, peer, d, logs, max_files, floor_follow)
    try:
        pl.aggregator.start()
        wait_for(what, ready, 30, [pl.aggregator])
        pl.cpu0_aggregator = pl.aggregator.cpu_s()
    except BaseException:
        pl.close()
        raise
    return pl


# --fleetlog-set KEY=VALUE options, for trying settings side by side with the peers (aggregator.*
# keys go to the aggregator, the others to the agent).
FLEETLOG_AGENT_SET: tuple[str, ...] = ()


def _build(shipper: str, peer: Peer | None, d: str, logs: str, max_files: int = 64,
           floor_follow: tuple[str, ...] = ()) -> tuple[Pipeline, str, Any]:
    if shipper == "fleetlog":
        import zmq
        ports = {k: free_port() for k in ("pull", "xsub", "xpub")}
        aggregator_set = tuple(x for x in FLEETLOG_AGENT_SET if x.startswith("aggregator."))
        agent_set = tuple(x for x in FLEETLOG_AGENT_SET if not x.startswith("aggregator."))
        pl = Pipeline(Proc("aggregator", aggregator_argv(d, ports, aggregator_set), d),
                      Proc("agent", agent_argv(d, logs, ports, "push", agent_set), d),
                      os.path.join(d, "out", TOPIC, f"{TOPIC}.log"))
        pl.ctx = zmq.Context()
        control = pl.control = ControlClient(pl.ctx, f"ipc://{d}/c.sock")
        return pl, "aggregator status", lambda: control.call("status", 0.5)
    out = os.path.join(d, "out", TOPIC, f"{TOPIC}.log")
    if shipper == "floor":  # live only: the backlog floor runs through run_floor
        port, ready = free_port(), os.path.join(d, "ready")
        me = [sys.executable, "-m", "bench.floor"]
        recv = Proc("floor-recv", [*me, "recv", "--bind", f"tcp://127.0.0.1:{port}", "--out", f"{d}/out",
                                   "--expect", "0", "--ready", ready, "--result", f"{d}/recv.json"], d)
        follow = Proc("floor-follow", [*me, "follow", "--connect", f"tcp://127.0.0.1:{port}", *floor_follow,
                                       *sorted(glob.glob(os.path.join(logs, "*.log")))], d)
        return Pipeline(recv, follow, out), "the floor receiver", lambda: os.path.exists(ready)
    assert peer is not None
    aggregator, agent, port = peer_procs(peer, d, logs, out, max_files)
    return Pipeline(aggregator, agent, out), f"{peer.name} listening on {port}", lambda: _port_open(port)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def wait_complete(path: str, expected: int, timeout_s: float, stall_s: float,
                  procs: list[Proc]) -> tuple[float, bool]:
    """Until the output holds ``expected`` bytes; gives up after ``stall_s`` without growth."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while True:
        now = time.monotonic()
        size = _size(path)
        if size >= expected:
            return now, True
        if size != last:
            last, last_change = size, now
        elif now - last_change > stall_s or now > deadline:
            return last_change, False
        for p in procs:
            if not p.alive():
                code = p.popen.returncode if p.popen else "?"
                raise RuntimeError(f"{p.name} exited (code {code}):\n{p.tail()}")
        time.sleep(0.005)


def measure(pl: Pipeline) -> dict[str, Any]:
    return {"agent": {"cpu_s": pl.agent.cpu_s(), "peak_rss_kb": pl.agent.peak_rss_kb()},
            "aggregator": {"cpu_s": pl.aggregator.cpu_s() - pl.cpu0_aggregator,
                           "peak_rss_kb": pl.aggregator.peak_rss_kb()}}


def run_backlog(shipper: str, peer: Peer | None, d: str, sources: list[str], per_file: int, size: int,
                args: argparse.Namespace) -> dict[str, Any]:
    lines = per_file * len(sources)
    if shipper == "floor":
        r = run_floor(d, sources, lines, size, args.timeout_s)
        return {"lines_per_s": lines / r["wall_s"], "complete": True,
                "agent": {"cpu_s": r["send"]["cpu_s"], "peak_rss_kb": r["send"]["peak_rss_kb"]},
                "aggregator": {"cpu_s": r["recv"]["cpu_s"], "peak_rss_kb": r["recv"]["peak_rss_kb"]},
                "verdict": corpus.verify(r["output"], sources, per_file)}
    pl = start_pipeline(shipper, peer, d, os.path.dirname(sources[0]))
    try:
        t0 = time.monotonic()
        pl.agent.start()
        t_last, complete = wait_complete(pl.out, size, args.timeout_s, args.stall_s,
                                         [pl.agent, pl.aggregator])
        if shipper == "fleetlog":
            time.sleep(0.2)  # let the last acknowledgement land before the CPU is read
        m = measure(pl)
    finally:
        pl.close()
    return {"lines_per_s": lines / (t_last - t0), "complete": complete, **m,
            "verdict": corpus.verify([pl.out], sources, per_file)}


def run_live(shipper: str, peer: Peer | None, d: str, args: argparse.Namespace, rate: int | None = None,
             duration_s: float | None = None, each_line: bool = False) -> dict[str, Any]:
    """Lines written at ``rate`` lines/s for ``duration_s`` (default: the live workload's) while the
    shipper runs; ``each_line``: one ``write()`` per line at its due time (the typical node)."""
    rate = args.live_rate if rate is None else rate
    duration_s = args.live_s if duration_s is None else duration_s
    logs = os.path.join(d, "logs")
    os.makedirs(logs, exist_ok=True)
    sources = [os.path.join(logs, f"f{i}.log") for i in range(args.files)]
    for path in sources:
        open(path, "wb").close()  # exist before the shippers start: every one tails them from 0
    per_file = int(rate * duration_s) // args.files
    me = [sys.executable, "-m", "bench.peers"]
    # On the typical node the floor follows at the agent's cadence, one message per poll: the
    # least a Python shipper spends for the same latency (the live floor polls every 5 ms).
    floor_follow = ("--poll-ms", str(args.floor_poll_ms), "--one-message") if each_line else ()
    pl = start_pipeline(shipper, peer, os.path.join(d, "run"), logs, floor_follow=floor_follow)
    result = os.path.join(d, "reader.json")
    reader = Proc("reader", [*me, "read", "--out", pl.out, "--expect", str(per_file * args.files),
                             "--timeout-s", str(duration_s + args.stall_s + 30),
                             "--stall-s", str(args.stall_s),
                             "--result", result], d)
    writer = Proc("writer", [*me, "write", "--rate", str(rate), "--duration-s", str(duration_s),
                             "--per-file", str(per_file), *(["--each-line"] if each_line else []),
                             *sources], d)
    try:
        pl.agent.start()
        reader.start()
        time.sleep(1.0)  # the agents are up and following the (empty) files
        cpu0 = {"agent": pl.agent.cpu_s(), "aggregator": pl.aggregator.cpu_s()}
        t0 = time.monotonic()
        writer.start()
        if writer.wait(duration_s + 60) is None:
            raise TimeoutError("the live writer did not finish")
        if reader.wait(args.stall_s + 60) is None:
            raise TimeoutError("the reader did not finish")
        if shipper == "fleetlog":
            time.sleep(0.2)
        wall_s = time.monotonic() - t0
        m = measure(pl)
        m["agent"]["cpu_s"] = pl.agent.cpu_s() - cpu0["agent"]
        m["aggregator"]["cpu_s"] = pl.aggregator.cpu_s() - cpu0["aggregator"]
    finally:
        writer.stop(timeout_s=5)
        reader.stop(timeout_s=5)
        pl.close()
    with open(result, "rb") as fh:
        rr = orjson.loads(fh.read())
    lat = rr["latencies_s"]
    span = max(1e-9, rr["t_last"] - rr["t_first_write"])
    return {"lines_per_s": rr["lines"] / span if rr["lines"] else 0.0,
            "complete": rr["lines"] >= per_file * args.files, **m,
            "agent_core_pct": 100 * m["agent"]["cpu_s"] / wall_s,
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))] if lat else float("nan"),
            "verdict": corpus.verify([pl.out], sources, per_file)}


def _lines_in(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def run_idle(shipper: str, peer: Peer | None, d: str, files: int, args: argparse.Namespace) -> dict[str, Any]:
    """``files`` quiet files: each gets one line before the shipper starts; once every line is in
    the output and a settling time has passed, nothing happens for ``--idle-s``: the agent's CPU
    over that window (% of a core) and its RSS at its end."""
    logs = os.path.join(d, "logs")
    os.makedirs(logs, exist_ok=True)
    sources = [os.path.join(logs, f"q{i}.log") for i in range(files)]
    for i, path in enumerate(sources):
        with open(path, "wb") as fh:
            fh.write(f"quiet file {i} says hello\n".encode())
    pl = start_pipeline(shipper, peer, os.path.join(d, "run"), logs, max_files=max(64, files))
    try:
        pl.agent.start()
        wait_for(f"{files} lines in the output", lambda: _lines_in(pl.out) >= files,
                 60 + files / 100, [pl.agent, pl.aggregator], interval_s=0.2)
        time.sleep(args.idle_settle_s)
        c0 = {"agent": pl.agent.cpu_s(), "aggregator": pl.aggregator.cpu_s()}
        t0 = time.monotonic()
        time.sleep(args.idle_s)
        wall = time.monotonic() - t0
        agent_pct = 100 * (pl.agent.cpu_s() - c0["agent"]) / wall
        aggr_pct = 100 * (pl.aggregator.cpu_s() - c0["aggregator"]) / wall
        # The agent side's RSS: fleetlog's agent, or the peer's agent instance.
        rss_kb = pl.agent.rss_kb()
        if not pl.agent.alive() or not pl.aggregator.alive():
            raise RuntimeError("a process exited during the idle window")
    finally:
        pl.close()
    return {"files": files, "agent_core_pct": agent_pct, "aggregator_core_pct": aggr_pct,
            "agent_rss_kb": rss_kb, "window_s": wall}


# ---- the live writer and the output reader (subprocesses) ----------------------------------------

def writer_main(args: argparse.Namespace) -> int:
    """Append lines round-robin to the files at ``rate`` lines/s, in 10 ms steps, each line
    starting with its write time (``time.time()``)."""
    import random
    rng = random.Random(7)
    fds = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in args.files]
    ts = ("2024-01-01T00:00:00.000Z", "01/Jan/2024:00:00:00 +0000")
    bodies = [[corpus.make_line(rng, ts, f"id={f}-{n}") for n in range(args.per_file)]
              for f in range(len(fds))]
    total = args.per_file * len(fds)
    t0 = time.monotonic()
    done = 0
    if args.each_line:
        try:
            for k in range(total):
                # Each line its own write() at its due time, as an application logging one event.
                wait = t0 + k / args.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                f, n = k % len(fds), k // len(fds)
                os.write(fds[f], f"{time.time():.6f} {bodies[f][n]}\n".encode())
        finally:
            for fd in fds:
                os.close(fd)
        return 0
    try:
        while done < total:
            due = min(total, int((time.monotonic() - t0) * args.rate) + 1)
            per: dict[int, list[str]] = {}
            now = f"{time.time():.6f} "
            for k in range(done, due):
                f, n = k % len(fds), k // len(fds)
                per.setdefault(f, []).append(now + bodies[f][n])
            for f, lines in per.items():
                os.write(fds[f], ("\n".join(lines) + "\n").encode())
            done = due
            time.sleep(0.01)
    finally:
        for fd in fds:
            os.close(fd)
    return 0


def reader_main(args: argparse.Namespace) -> int:
    """Tail ``--out`` every 2 ms; each complete line's latency = now - its leading write time."""
    latencies: list[float] = []
    buf = b""
    pos = 0
    lines = 0
    fd = None
    t_first_write = 0.0
    t_last = 0.0
    deadline = time.monotonic() + args.timeout_s
    last_change = time.monotonic()
    while lines < args.expect and time.monotonic() < deadline:
        if fd is None:
            try:
                fd = os.open(args.out, os.O_RDONLY)
            except FileNotFoundError:
                time.sleep(0.002)
                continue
        data = os.pread(fd, 1 << 22, pos)
        if not data:
            if lines and time.monotonic() - last_change > args.stall_s:
                break
            time.sleep(0.002)
            continue
        now = time.time()
        last_change = time.monotonic()
        t_last = last_change
        pos += len(data)
        buf += data
        cut = buf.rfind(b"\n")
        if cut < 0:
            continue
        done, buf = buf[:cut], buf[cut + 1:]
        for line in done.split(b"\n"):
            lines += 1
            try:
                sent = float(line[:line.index(b" ")])
            except ValueError:
                continue
            if not t_first_write:
                t_first_write = time.monotonic() - (now - sent)
            latencies.append(now - sent)
    if fd is not None:
        os.close(fd)
    with open(args.result, "wb") as fh:
        fh.write(orjson.dumps({"lines": lines, "latencies_s": latencies, "t_first_write": t_first_write,
                               "t_last": t_last}))
    return 0


# ---- the table -----------------------------------------------------------------------------------

def _cell(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:,.1f}" if isinstance(r.get(key), float) and r[key] == r[key] else "-"


def table(rows: list[tuple[str, str, dict[str, Any]]], live: dict[str, Any]) -> str:
    head = (f"{'workload':9} {'shipper':10} {'lines/s':>10} {'CPU s/M lines':>15} {'peak RSS MiB':>13} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'missing':>8} {'dup':>6}  notes")
    sub = f"{'':9} {'':10} {'':>10} {'agent':>7} {'aggr':>7} {'agent':>6} {'aggr':>6}"
    out = [head, sub]
    for workload, shipper, r in rows:
        if "error" in r:
            out.append(f"{workload:9} {shipper:10} {'-':>10} {'-':>7} {'-':>7} {'-':>6} {'-':>6} {'-':>8} "
                       f"{'-':>8} {'-':>8} {'-':>6}  {r['error']}")
            continue
        v = r["verdict"]
        per_m = max(1, v.expected) / 1e6
        note = "ok" if v.ok else f"order {v.out_of_order}, identical files {v.files_identical}/{v.files}"
        if not r.get("complete", True):
            note += "; stalled (output stopped growing before it was complete)"
        out.append(
            f"{workload:9} {shipper:10} {r['lines_per_s']:>10,.0f} {r['agent']['cpu_s'] / per_m:7.2f} "
            f"{r['aggregator']['cpu_s'] / per_m:7.2f} {r['agent']['peak_rss_kb'] / 1024:6.0f} "
            f"{r['aggregator']['peak_rss_kb'] / 1024:6.0f} {_cell(r, 'p50_ms'):>8} {_cell(r, 'p99_ms'):>8} "
            f"{v.missing:>8,} {v.duplicated:>6,}  {note}")
    out.append("")
    backlog = {s: r for w, s, r in rows if w == "backlog" and "error" not in r}
    fl = backlog.get("fleetlog")
    if fl is not None:
        for other, r in backlog.items():
            if other == "fleetlog":
                continue
            cpu_fl = fl["agent"]["cpu_s"] + fl["aggregator"]["cpu_s"]
            cpu_o = r["agent"]["cpu_s"] + r["aggregator"]["cpu_s"]
            ratio = fl["lines_per_s"] / r["lines_per_s"]
            out.append(f"backlog: fleetlog / {other}: throughput {ratio:.2f}x, "
                       f"CPU per line {cpu_fl / cpu_o:.2f}x")
    lv = {s: r for s, r in live.items() if "error" not in r}
    if "fleetlog" in lv:
        for other, r in lv.items():
            if other != "fleetlog" and r.get("p99_ms") == r.get("p99_ms"):
                fl_l = lv["fleetlog"]
                cpu_fl = fl_l["agent"]["cpu_s"] + fl_l["aggregator"]["cpu_s"]
                cpu_o = r["agent"]["cpu_s"] + r["aggregator"]["cpu_s"]
                out.append(f"live:    fleetlog / {other}: p99 latency {fl_l['p99_ms'] / r['p99_ms']:.2f}x, "
                           f"CPU per line {cpu_fl / cpu_o:.2f}x")
    return "\n".join(out)


def _node_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return str(r["error"])
    if "files" in r:
        return (f"agent {r['agent_core_pct']:.3f}% of a core, RSS {r['agent_rss_kb'] / 1024:.0f} MiB; "
                f"aggregator {r['aggregator_core_pct']:.3f}%")
    ok = "ok" if r["verdict"].ok and r.get("complete", True) else "check FAILED"
    return (f"agent {r['agent_core_pct']:.2f}% of a core, p50 {_cell(r, 'p50_ms')} ms, "
            f"p99 {_cell(r, 'p99_ms')} ms, {ok}")


def node_table(rows: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace) -> str:
    """The typical node, idle and curve rows: what a fleet pays on every node."""
    out = [f"typical node: {args.typical_rate:,} lines/s over {args.files} files for {args.typical_s:g}s, "
           f"one write() per line; idle: quiet files for {args.idle_s:g}s",
           f"{'workload':30} {'shipper':10} {'agent %core':>11} {'agent s/M':>9} {'aggr s/M':>8} "
           f"{'p50 ms':>7} {'p99 ms':>7} {'agent RSS':>9} {'aggr %core':>10}  notes"]
    for workload, shipper, r in rows:
        if "error" in r:
            out.append(f"{workload:30} {shipper:10} {'-':>11} {'-':>9} {'-':>8} {'-':>7} {'-':>7} {'-':>9} "
                       f"{'-':>10}  {r['error']}")
            continue
        if "files" in r:
            out.append(f"{workload:30} {shipper:10} {r['agent_core_pct']:11.3f} {'':>9} {'':>8} {'':>7} "
                       f"{'':>7} {r['agent_rss_kb'] / 1024:7.1f}Mi {r['aggregator_core_pct']:10.3f}  ")
            continue
        v = r["verdict"]
        per_m = max(1, v.expected) / 1e6
        note = "ok" if v.ok else f"missing {v.missing}, dup {v.duplicated}, order {v.out_of_order}"
        if not r.get("complete", True):
            note += "; stalled"
        out.append(f"{workload:30} {shipper:10} {r['agent_core_pct']:11.2f} "
                   f"{r['agent']['cpu_s'] / per_m:9.1f} {r['aggregator']['cpu_s'] / per_m:8.1f} "
                   f"{_cell(r, 'p50_ms'):>7} {_cell(r, 'p99_ms'):>7} "
                   f"{r['agent']['peak_rss_kb'] / 1024:7.1f}Mi {'':>10}  {note}")
    return "\n".join(out)


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="role")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 8 x 25,000 lines backlog, 5,000 lines/s for 5 s live")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--lines-per-file", type=int, default=250_000)
    p.add_argument("--live-rate", type=int, default=20_000, help="lines/s, all files together")
    p.add_argument("--live-s", type=float, default=20)
    p.add_argument("--only", default=",".join(SHIPPERS),
                   help="comma-separated subset of " + ",".join(SHIPPERS))
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--typical-rate", type=int, default=500,
                   help="the typical node's lines/s, all files together")
    p.add_argument("--typical-s", type=float, default=30)
    p.add_argument("--floor-poll-ms", type=float, default=40,
                   help="the typical node's floor: its poll (ms), one message per poll; 40 is the "
                        "agent's default latency budget")
    p.add_argument("--idle-s", type=float, default=30, help="the idle window")
    p.add_argument("--idle-settle-s", type=float, default=6,
                   help="after the quiet files' lines arrived, before the idle window starts")
    p.add_argument("--idle-many", type=int, default=10_000, help="the second idle run's quiet files")
    p.add_argument("--curve", default="20,40,60,80", help="settings of --curve-key for the trade-off curve")
    p.add_argument("--curve-key", default="agent.latency_budget_ms")
    p.add_argument("--stall-s", type=float, default=10,
                   help="give up on an output that stops growing this long")
    p.add_argument("--timeout-s", type=float, default=300, help="deadline for each backlog run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--fleetlog-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an agent setting for the fleetlog runs, e.g. agent.batch_max_delay_ms=20")
    w = sub.add_parser("write", help="(internal) the live writer")
    w.add_argument("--rate", type=int, required=True)
    w.add_argument("--duration-s", type=float, required=True)
    w.add_argument("--per-file", type=int, required=True)
    w.add_argument("--each-line", action="store_true", help="one write() per line, at its due time")
    w.add_argument("files", nargs="+")
    r = sub.add_parser("read", help="(internal) the output reader")
    r.add_argument("--out", required=True)
    r.add_argument("--expect", type=int, required=True)
    r.add_argument("--timeout-s", type=float, required=True)
    r.add_argument("--stall-s", type=float, required=True)
    r.add_argument("--result", required=True)
    args = p.parse_args(argv)
    if args.role is None and args.quick:
        args.lines_per_file, args.live_rate, args.live_s = 25_000, 5_000, 5.0
        args.typical_s, args.idle_s, args.idle_many, args.curve = 10.0, 10.0, 2_000, "20,60"
    return args


def one_run(workload: str, shipper: str, peer: Peer | None, d: str, sources: list[str], size: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One shipper on one workload; a row saying why when it cannot run or fails."""
    if peer is not None and peer.missing:
        return {"error": f"not run: {peer.missing}"}
    rd = os.path.join(d, f"{workload}-{shipper}")
    try:
        if workload == "backlog":
            return run_backlog(shipper, peer, rd, sources, args.lines_per_file, size, args)
        if workload in ("typical", "curve"):
            return run_live(shipper, peer, rd, args, args.typical_rate, args.typical_s, each_line=True)
        if workload.startswith("idle"):
            return run_idle(shipper, peer, rd, int(workload.split("-")[1]), args)
        return run_live(shipper, peer, rd, args)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"peers: {workload} {shipper} failed: {exc}", file=sys.stderr)
        return {"error": f"failed: {str(exc).splitlines()[0][:160]}"}
    finally:
        if not args.keep:
            shutil.rmtree(rd, ignore_errors=True)


def run_workloads(workloads: list[str], wanted: list[str], peers: dict[str, Peer | None], d: str,
                  sources: list[str], size: int, args: argparse.Namespace,
                  rows: list[tuple[str, str, dict[str, Any]]], node: list[tuple[str, str, dict[str, Any]]],
                  live: dict[str, Any]) -> None:
    """Each workload for each wanted shipper, in order; results appended to ``rows`` (backlog,
    live), ``node`` (typical, idle, curve) and ``live``."""
    global FLEETLOG_AGENT_SET
    for workload in workloads:
        if workload in ("backlog", "live"):
            for shipper in wanted:
                r = one_run(workload, shipper, peers.get(shipper), d, sources, size, args)
                rows.append((workload, shipper, r))
                if workload == "live":
                    live[shipper] = r
                done = r.get("error") or f"{r['lines_per_s']:,.0f} lines/s, " + (
                    "ok" if r["verdict"].ok else "check FAILED")
                print(f"peers: {workload} {shipper}: {done}", flush=True)
        elif workload == "typical":
            for shipper in wanted:
                r = one_run("typical", shipper, peers.get(shipper), d, sources, size, args)
                node.append(("typical", shipper, r))
                print(f"peers: typical {shipper}: {_node_line(r)}", flush=True)
        elif workload == "idle":
            for files in (args.files, args.idle_many):
                for shipper in (s for s in wanted if s != "floor"):
                    r = one_run(f"idle-{files}", shipper, peers.get(shipper), d, sources, size, args)
                    node.append((f"idle-{files}", shipper, r))
                    print(f"peers: idle {files} files {shipper}: {_node_line(r)}", flush=True)
        elif workload == "curve" and "fleetlog" in wanted:
            base = FLEETLOG_AGENT_SET
            for setting in (v for v in args.curve.split(",") if v):
                FLEETLOG_AGENT_SET = (*base, f"{args.curve_key}={setting}")
                r = one_run("curve", "fleetlog", None, d, sources, size, args)
                FLEETLOG_AGENT_SET = base
                node.append((f"curve {args.curve_key}={setting}", "fleetlog", r))
                print(f"peers: curve {args.curve_key}={setting}: {_node_line(r)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    global FLEETLOG_AGENT_SET
    args = parse_args(argv)
    FLEETLOG_AGENT_SET = tuple(getattr(args, "fleetlog_set", ()) or ())
    if args.role == "write":
        return writer_main(args)
    if args.role == "read":
        return reader_main(args)
    wanted = [s for s in args.only.split(",") if s]
    peers = {"rsyslog": find_rsyslog() if "rsyslog" in wanted else None,
             "syslog-ng": find_syslog_ng() if "syslog-ng" in wanted else None}
    for peer in peers.values():
        if peer is not None:
            print(f"peers: {peer.name}: " + (peer.version or "") + (f" NOT AVAILABLE: {peer.missing}"
                                                                   if peer.missing else ""), flush=True)
    d = tempfile.mkdtemp(prefix="flpeers", dir="/tmp")
    rows: list[tuple[str, str, dict[str, Any]]] = []
    node: list[tuple[str, str, dict[str, Any]]] = []  # typical, idle and curve rows
    live: dict[str, Any] = {}
    try:
        t = time.monotonic()
        workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
        if "backlog" not in workloads:
            args.lines_per_file = 0
        sources = corpus.generate(os.path.join(d, "logs"), args.files, args.lines_per_file, args.seed)
        size = sum(os.path.getsize(p) for p in sources)
        lines = args.files * args.lines_per_file
        print(f"peers: backlog {args.files} x {args.lines_per_file:,} = {lines:,} lines, {size / 1e6:.0f} MB,"
              f" generated in {time.monotonic() - t:.1f}s; live {args.live_rate:,} lines/s for "
              f"{args.live_s:g}s; {os.cpu_count()} CPUs; in {d}", flush=True)
        run_workloads(workloads, wanted, peers, d, sources, size, args, rows, node, live)
    finally:
        if args.keep:
            print(f"peers: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    if rows:
        print(table(rows, live))
    if node:
        print(node_table(node, args))
    if args.json:
        doc = [{"workload": w, "shipper": s, **{k: (vars(v) | {"ok": v.ok}) if k == "verdict" else v
                                                 for k, v in r.items()}} for w, s, r in rows + node]
        for row in doc:
            row.pop("latencies_s", None)
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps({"rows": doc, "peers": {k: vars(p) for k, p in peers.items() if p}},
                                  option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
