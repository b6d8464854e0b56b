"""Real processes for the tests: an aggregator, agents, log writers, and waiting on conditions.

Every process started here is registered with its ``Harness`` and killed at teardown; every wait
has a deadline. Endpoints are ipc:// sockets in a short temporary directory (no port races) unless
a test asks for TCP.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from agent.config import AgentConfig
from fleetlog import wire

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None  # added to (not instead of) the test's environment
    state_dir: Path | None = None      # an agent's, for its status socket
    control: str | None = None         # a fleetlog-writer's control endpoint, for the health check

    def start(self) -> Proc:
        env = {**os.environ, **self.env} if self.env else None
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_line_count(self) -> int:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the process has used so far, from /proc."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
            raise AssertionError(f"{self.name} did not exit within {timeout}s of signal {sig}:\n"
                                 + self.log()[-3000:]) from None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL, timeout=10)


@dataclass
class Endpoints:
    pull: str
    xsub: str
    xpub: str
    control: str


@dataclass
class Harness:
    root: Path
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0
    ep: Endpoints | None = None  # the last aggregator's, for the health check
    # Put before every command the harness runs, e.g. ["ip", "netns", "exec", NAME] to run the
    # whole system in a network namespace of the test's own.
    prefix: list[str] = field(default_factory=list)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def endpoints(self, tcp: bool = False) -> Endpoints:
        if tcp:
            ports: list[int] = []
            while len(ports) < 4:  # the kernel may hand the same free port out twice in a row
                if (port := free_port()) not in ports:
                    ports.append(port)
            return Endpoints(*(f"tcp://127.0.0.1:{p}" for p in ports))
        return Endpoints(*(f"ipc://{self.root}/{n}.sock" for n in ("pull", "xsub", "xpub", "ctl")))

    def _proc(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        self.counter += 1
        p = Proc(name, [*self.prefix, *args], self.root / f"{name}.{self.counter}.out", env=env)
        self.procs.append(p)
        return p

    def aggregator(self, ep: Endpoints, *extra: str, out: str = "out", state: str = "agg",
                   env: dict[str, str] | None = None, wrap: list[str] | None = None) -> Proc:
        """An aggregator; ``wrap``: a command it runs under, given its own argv (as for agents)."""
        args = [PY, "-m", "aggregator",
                "--set", f"aggregator.output_dir={self.root / out}",
                "--set", f"aggregator.state_dir={self.root / state}",
                "--set", f"aggregator.pull={ep.pull}", "--set", f"aggregator.xsub={ep.xsub}",
                "--set", f"aggregator.xpub={ep.xpub}", "--set", f"aggregator.control={ep.control}",
                "--set", "aggregator.log_level=debug"]
        for item in extra:
            args += ["--set", item]
        self.ep = ep
        return self._proc("aggregator", [*(wrap or []), *args], env).start()

    def writer(self, servers: list[str], *extra: str, out: str = "wout", state: str = "wst",
               control: str | None = None, env: dict[str, str] | None = None) -> Proc:
        """A fleetlog-writer reading the stream from ``servers``; its control endpoint (an ipc://
        socket of its own unless given) is ``proc.control``."""
        self.counter += 1
        control = control or f"ipc://{self.root}/w{self.counter}.sock"
        args = [PY, "-m", "writer",
                "--set", f"writer.output_dir={self.root / out}",
                "--set", f"writer.state_dir={self.root / state}",
                "--set", f"writer.servers={orjson.dumps(servers).decode()}",
                "--set", f"writer.control={control}",
                "--set", "writer.log_level=debug"]
        for item in extra:
            args += ["--set", item]
        proc = self._proc(f"writer-{out}", args, env)
        proc.control = control
        return proc.start()

    def agent(self, ep: Endpoints, sources: list[dict[str, Any]], *extra: str, name: str = "node1",
              mode: str = "push", state: str | None = None, env: dict[str, str] | None = None,
              wrap: list[str] | None = None, also: list[Endpoints] | None = None) -> Proc:
        """An agent; ``wrap`` is a command the agent runs under (e.g. ``setpriv`` to drop
        capabilities), given the agent's own argv; ``also``: more aggregators beside ``ep``
        (``agent.aggregators``: the agent ranks them itself)."""
        state_dir = self.root / (state or f"st-{name}")
        sources_toml = "[" + ", ".join(_inline_table(s) for s in sources) + "]"
        args = [PY, "-m", "agent",
                "--set", f"agent.name={name}", "--set", f"agent.state_dir={state_dir}",
                "--set", f"agent.mode={mode}",
                *(["--set", "agent.aggregators=[" + ", ".join(
                    _inline_table({"data": e.pull if mode == "push" else e.xsub, "control": e.control})
                    for e in [ep, *also]) + "]"] if also else
                  ["--set", f"agent.data={ep.pull if mode == 'push' else ep.xsub}",
                   "--set", f"agent.control={ep.control}"]),
                "--set", "agent.rescan_interval_ms=300",
                "--set", "agent.ack_timeout_ms=1500",
                "--set", "agent.log_level=debug",
                "--set", f"sources={sources_toml}"]
        for item in extra:
            args += ["--set", item]
        proc = self._proc(f"agent-{name}", [*(wrap or []), *args], env)
        proc.state_dir = state_dir
        return proc.start()

    def ctl(self, ep: Endpoints, *args: str, timeout: float = 20,
            starting_s: float = 10.0) -> subprocess.CompletedProcess[str]:
        """``aggregatorctl --control <ep.control> ARGS``. aggregatorctl answers at once when
        nothing listens; an aggregator just started may not have bound yet, so that answer is
        retried for up to ``starting_s`` (0: never)."""
        deadline = time.monotonic() + starting_s
        while True:
            r = subprocess.run([*self.prefix, PY, "-m", "aggregator.ctl", "--control", ep.control, *args],
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode != 3 or "no aggregator at" not in r.stderr or time.monotonic() > deadline:
                return r
            time.sleep(0.05)

    def status(self, ep: Endpoints) -> dict[str, Any]:
        r = self.ctl(ep, "status", "--json")
        assert r.returncode == 0, r.stderr
        return orjson.loads(r.stdout)

    def agent_status(self, name: str = "node1") -> dict[str, Any] | None:
        """What ``fleetlog-agent status --json`` says for agent ``name``; None if it does not answer."""
        state_dir = next((p.state_dir for p in reversed(self.procs)
                          if p.name == f"agent-{name}" and p.state_dir), self.root / f"st-{name}")
        r = subprocess.run([*self.prefix, PY, "-m", "agent", "status", "--json", "--timeout", "2",
                            "--set", f"agent.state_dir={state_dir}"],
                           capture_output=True, text=True, timeout=20)
        return orjson.loads(r.stdout) if r.returncode == 0 else None

    def all_acknowledged(self, name: str = "node1") -> bool:
        """Agent ``name`` has every line of its files acknowledged as durable. (Lines visible in
        the output are not enough: a killed aggregator leaves uncommitted ones that its
        successor cuts.)"""
        s = self.agent_status(name)
        return (s is not None and bool(s["files"]) and s["lag_bytes"] == 0 and s["inflight_bytes"] == 0
                and all(f["lag_bytes"] == 0 for f in s["files"]))

    def lines(self, topic: str = "app", out: str = "out") -> list[str]:
        """The active output file's lines of ``topic``."""
        return output_lines(self.root / out, topic)

    def daemons(self) -> list[Proc]:
        """The aggregators, agents and writers still running."""
        return [p for p in self.procs if p.alive() and p.name.startswith(("aggregator", "agent-", "writer"))]

    def measure(self, ep: Endpoints | None, window_s: float) -> Health:
        """What each running daemon does over ``window_s``: CPU, log lines, control messages."""
        procs = self.daemons()
        ep = ep or self.ep

        skip: set[str] = set()  # asked once in vain (a CURVE endpoint, another netns): not again

        def control_counts() -> dict[str, int]:
            # In-process requests, not `fleetlog-agent status` / `aggregatorctl` processes: the
            # check runs after most tests, and two interpreter start-ups per daemon and window
            # cost minutes over the suite.
            counts: dict[str, int] = {}
            for p in procs:
                if p.name in skip:
                    continue
                if p.name.startswith("agent-") and p.state_dir is not None:
                    endpoint = AgentConfig(name="-", state_dir=str(p.state_dir)).status_endpoint
                    s = ask(endpoint, "status")
                    if s is not None and "control" in s:
                        counts[p.name] = s["control"]["messages_sent"] + s["control"]["messages_received"]
                elif (endpoint := p.control or (ep.control if ep is not None and
                                                p.name.startswith("aggregator") else None)):
                    s = ask(endpoint, "status")
                    if s is not None:
                        counts[p.name] = s["control"]["messages_received"]
                if p.name not in counts:
                    skip.add(p.name)
            return counts

        cpu0 = {p.name: p.cpu_s() for p in procs}
        logs0 = {p.name: p.log_line_count() for p in procs}
        ctl0 = control_counts()
        t0 = time.monotonic()
        time.sleep(window_s)  # the window being measured, not a wait for a condition
        ctl1 = control_counts()
        elapsed = time.monotonic() - t0
        live = [p for p in procs if p.alive()]
        return Health(
            window_s=elapsed,
            cpu={p.name: (p.cpu_s() - cpu0[p.name]) / elapsed for p in live},
            log_lines={p.name: p.log_line_count() - logs0[p.name] for p in live},
            control_per_s={n: (ctl1[n] - ctl0[n]) / elapsed for n in ctl1 if n in ctl0},
            exited=[p.name for p in procs if not p.alive()],
        )

    def assert_quiet(self, ep: Endpoints | None = None, *, within_s: float = 15.0, window_s: float = 1.5,
                     max_cpu: float = 0.2, max_log_lines: int = 6,
                     max_control_per_s: float | None = None) -> Health:
        """The system is healthy again: within ``within_s``, one window of ``window_s`` in which
        every running agent and aggregator uses at most ``max_cpu`` of a core, logs at most
        ``max_log_lines`` lines, and the control channel carries a steady trickle (heartbeats,
        their replies and acks: by default 3 messages a second per agent plus the measurement's
        own queries). A restart storm, a resync loop or a log flood fails here even when every
        line arrived."""
        agents = sum(1 for p in self.daemons() if p.name.startswith("agent-"))
        bound = max_control_per_s if max_control_per_s is not None else 3.0 * max(1, agents) + 8.0
        deadline = time.monotonic() + within_s
        while True:
            health = self.measure(ep, window_s)
            problems = health.problems(max_cpu, max_log_lines, bound)
            if not problems:
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"not quiet {within_s}s after the fault: " + "; ".join(problems))

    def cleanup(self) -> list[str]:
        """Stop what the test left running; return the names of processes that would not die."""
        Writer.stop_all()
        for p in self.procs:
            if p.alive():
                assert p.popen is not None
                p.popen.kill()
        stuck = []
        for p in self.procs:
            if p.popen is not None:
                try:
                    p.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    stuck.append(p.name)
        return stuck


@dataclass
class Health:
    """Per daemon over one window: cores used, log lines written, control messages a second."""
    window_s: float
    cpu: dict[str, float]
    log_lines: dict[str, int]
    control_per_s: dict[str, float]
    exited: list[str]

    def problems(self, max_cpu: float, max_log_lines: int, max_control_per_s: float) -> list[str]:
        out = [f"{name} exited" for name in self.exited]
        out += [f"{n} used {c:.2f} cores" for n, c in self.cpu.items() if c > max_cpu]
        out += [f"{n} logged {k} lines in {self.window_s:.1f}s" for n, k in self.log_lines.items()
                if k > max_log_lines]
        out += [f"{n} carried {r:.1f} control messages/s" for n, r in self.control_per_s.items()
                if r > max_control_per_s]
        return out


def ask(endpoint: str, command: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """One control request (``{id, command, args}``) to a daemon's control or status socket,
    in this process; the result, or None when nothing answers within ``timeout_s``."""
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        return None
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(wire.encode_request(1, command, {}))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        # A status of 10,000 files is megabytes: no control-message limit here.
        reply = wire.decode_control(sock.recv(), max_bytes=1 << 30)
        return reply.get("result") if reply.get("ok") else None
    finally:
        sock.close(linger=0)
        ctx.term()


def _inline_table(d: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, str):
            return orjson.dumps(v).decode()
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)
    return "{" + ", ".join(f"{k} = {value(v)}" for k, v in d.items()) + "}"


# ---- log content ------------------------------------------------------------------------------


def make_lines(tag: str, start: int, count: int, width: int = 60) -> list[str]:
    """Lines carrying a unique, ordered id: ``<tag>#<n> ...padding...``."""
    pad = "x" * width
    return [f"{tag}#{n:08d} {pad}" for n in range(start, start + count)]


def append_lines(path: Path, lines: Iterable[str]) -> None:
    with open(path, "ab") as fh:
        fh.write(("\n".join(lines) + "\n").encode())


def output_lines(root: Path, topic: str, include_rotated: bool = False) -> list[str]:
    directory = root / topic
    files = [directory / f"{topic}.log"]
    if include_rotated and directory.exists():
        import gzip
        rotated = sorted(p for p in directory.iterdir() if p.name != f"{topic}.log")
        out: list[str] = []
        for p in rotated:
            if p.name.endswith(".gz"):
                out += gzip.decompress(p.read_bytes()).decode(errors="replace").splitlines()
            elif p.name.endswith(".log"):
                out += p.read_text(errors="replace").splitlines()
        return out + output_lines(root, topic)
    try:
        return files[0].read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def check_exactly_once(lines: list[str], expected: dict[str, int]) -> None:
    """Every ``tag#n`` for n < expected[tag] appears exactly once, in order per tag."""
    seen: dict[str, list[int]] = {}
    for line in lines:
        head = line.split(" ", 1)[0]
        tag, sep, n = head.partition("#")
        if not sep or not n.isdigit():
            continue
        seen.setdefault(tag, []).append(int(n))
    problems = []
    for tag, count in expected.items():
        got = seen.get(tag, [])
        if got != list(range(count)):
            missing = sorted(set(range(count)) - set(got))
            dupes = len(got) - len(set(got))
            out_of_order = sum(1 for a, b in itertools.pairwise(got) if b < a)
            problems.append(f"{tag}: {len(got)} lines for {count}; missing {len(missing)} "
                            f"(first {missing[:5]}), duplicates {dupes}, out of order {out_of_order}")
    extra = set(seen) - set(expected)
    if extra:
        problems.append(f"unexpected tags {sorted(extra)[:5]}")
    assert not problems, "\n".join(problems)



class Writer:
    """Appends id-carrying lines to files from a thread, like applications logging, until stopped.

    ``hold_open`` keeps each file's descriptor open across writes (as most daemons do), so after a
    rename the writer goes on writing into the rotated file until ``reopen()``.
    """

    running: set[Writer] = set()  # started and not yet stopped, for ``stop_all``

    def __init__(self, paths: dict[str, Path], lines_per_tick: int = 50, tick_s: float = 0.005,
                 hold_open: bool = False, limit: int | None = None) -> None:
        import threading
        self.paths = paths
        self.lines_per_tick = lines_per_tick
        self.tick_s = tick_s
        self.hold_open = hold_open
        self.limit = limit
        self.counts = dict.fromkeys(paths, 0)
        self._fhs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        Writer.running.add(self)
        self._thread.start()
        return self

    def _write(self, tag: str) -> None:
        n = self.lines_per_tick if self.limit is None else min(self.lines_per_tick,
                                                                 self.limit - self.counts[tag])
        if n <= 0:
            return
        data = ("\n".join(make_lines(tag, self.counts[tag], n)) + "\n").encode()
        if self.hold_open:
            fh = self._fhs.get(tag)
            if fh is None:
                fh = self._fhs[tag] = open(self.paths[tag], "ab", buffering=0)  # noqa: SIM115
            fh.write(data)
        else:
            with open(self.paths[tag], "ab") as fh:
                fh.write(data)
        self.counts[tag] += n

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                for tag in self.paths:
                    self._write(tag)
            if self.limit is not None and all(c >= self.limit for c in self.counts.values()):
                return
            time.sleep(self.tick_s)

    def reopen(self) -> None:
        with self._lock:
            for fh in self._fhs.values():
                fh.close()
            self._fhs.clear()

    def pause(self) -> Any:
        return self._lock

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(timeout=10)
        self.reopen()
        Writer.running.discard(self)
        return dict(self.counts)

    @classmethod
    def stop_all(cls) -> None:
        """Stop the writers a failed test left running (before its directory goes)."""
        for writer in list(cls.running):
            writer.stop()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` (e.g. "256k") at ``path`` (a real full disk for a test); the
    test skips where mounts are not allowed. The caller unmounts it (``umount -l``)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {r.stderr.strip()}")
