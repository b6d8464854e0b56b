"""``make run`` with settings (RUN_ARGS): the demo's daemons take them, on ports of the test's
own, and a bad one stops the demo with the daemon's message and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import orjson
import pytest
from harness import PY, wait_for

REPO = Path(__file__).resolve().parent.parent
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def free_port_base() -> int:
    """Four free consecutive loopback ports."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        socks = []
        try:
            for port in range(base, base + 4):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no four free consecutive ports")


def make_run(run_args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(["make", "-s", "run", f"RUN_ARGS={run_args}"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def demo_processes(demo: Path) -> list[int]:
    """The processes whose command line names ``demo`` (the demo and its daemons)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(demo).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def stop(proc: subprocess.Popen[bytes], demo: Path) -> None:
    """Ctrl-C, as a user stops it (the terminal's foreground group: make and the demo); the demo
    stops its daemons. Whatever is left after that is killed, and fails the test."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
        wait_for(lambda: not demo_processes(demo), timeout=30, what="the demo and its daemons stopped")
    finally:
        for pid in demo_processes(demo):
            os.kill(pid, signal.SIGKILL)


@needs_make
def test_make_run_takes_settings_for_both_daemons(short_tmp: Path) -> None:
    base = free_port_base()
    demo = short_tmp / "demo"
    proc = make_run(f"--dir {demo} --port-base {base} --status-interval-s 0 "
                    "--agent-set agent.name=custom-node --agent-set agent.latency_budget_ms=100 "
                    "--aggregator-set aggregator.format=json", short_tmp / "make.out")
    try:
        web = demo / "out" / "web" / "web.log"
        wait_for(lambda: web.exists() and web.read_bytes().count(b"\n") >= 20, timeout=60,
                 what="the demo's lines in topic web")
        first = orjson.loads(web.read_bytes().splitlines()[0])
        assert first["agent"] == "custom-node" and first["path"] == str(demo / "logs" / "web.log")
        r = subprocess.run([PY, "-m", "aggregator.ctl", "--control", f"tcp://127.0.0.1:{base + 3}",
                            "status", "--json"], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert [a["name"] for a in orjson.loads(r.stdout)["agents"]] == ["custom-node"]
        assert 'name = "demo-node"' in (demo / "agent.toml").read_text()  # --set wins over the file
    finally:
        stop(proc, demo)
    said = (short_tmp / "make.out").read_text()
    assert "fleetlog demo stopped" in said and "agent stopped" in said and "aggregator stopped" in said, said
    assert "second stop signal" not in said, said


@needs_make
def test_make_run_with_a_bad_setting_stops_with_the_daemons_message(short_tmp: Path) -> None:
    base = free_port_base()
    demo = short_tmp / "demo"
    proc = make_run(f"--dir {demo} --port-base {base} --status-interval-s 0 "
                    "--agent-set agent.no_such_key=1", short_tmp / "make.out")
    try:
        assert proc.wait(timeout=60) != 0
    finally:
        stop(proc, demo)
    said = (short_tmp / "make.out").read_text()
    assert "agent.no_such_key" in said and "the agent exited with code 2" in said, said
