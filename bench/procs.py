"""Processes the benchmark starts: what they cost (from /proc), asking them for status, stopping them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import zmq

from fleetlog import wire

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process with its stdout/stderr in ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, argv: list[str], log_dir: str) -> None:
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "wb") as out:
            # A session of its own: Ctrl-C reaches only the benchmark, whose cleanup stops us.
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_s(self) -> float:
        """User + system CPU seconds of all its threads so far."""
        with open(f"/proc/{self.pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def threads_cpu_s(self) -> dict[str, float]:
        """CPU seconds per thread, keyed ``name/tid`` (the main thread's tid is the pid)."""
        out: dict[str, float] = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat", "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                continue  # the thread ended meanwhile
            name = raw[raw.index(b"(") + 1: raw.rindex(b")")].decode("utf-8", "replace")
            fields = raw.rsplit(b")", 1)[1].split()
            out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        return out

    def peak_rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
        return 0

    def rss_kb(self) -> int:
        """Resident set size now (VmRSS); 0 once the process is gone."""
        try:
            with open(f"/proc/{self.pid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmRSS:"):
                        return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return b"\n".join(fh.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def wait(self, timeout_s: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Signal, wait up to ``timeout_s``, then kill. Returns the exit code (None if killed)."""
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(sig)
        code = self.wait(timeout_s)
        if code is None:
            self.popen.kill()
            self.popen.wait()
        return code


class Sampler:
    """A thread calling ``probe()`` every ``interval_s`` and keeping ``(monotonic time, value)``."""

    def __init__(self, probe: Any, interval_s: float = 0.5) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.probe()))
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        return self.samples

    def between(self, t0: float, t1: float) -> list[Any]:
        return [v for t, v in self.samples if t0 <= t <= t1]


class ControlClient:
    """A DEALER asking a daemon's control or status socket; None when it does not answer in time."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = 0

    def call(self, command: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
        self.ids += 1
        self.sock.send(wire.encode_request(self.ids, command))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                return None
            reply = wire.decode_control(self.sock.recv())
            if reply.get("id") == self.ids and reply.get("ok"):
                result: dict[str, Any] = reply["result"]
                return result
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


def wait_for(what: str, condition: Any, timeout_s: float, procs: list[Proc], interval_s: float = 0.05) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail on deadline or a dead process."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited (code {p.popen.returncode if p.popen else '?'}) "
                                   f"while waiting for {what}:\n{p.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:g}s")
        time.sleep(interval_s)
