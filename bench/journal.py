"""``make bench``'s journal row: a backlog of journal entries through a real fleetlog.

N entries (default 500,000; messages of 60-200 bytes, each ``J#<n>``, some unicode) are written
as export format through Debian's ``systemd-journal-remote`` into a journal file before anything
starts. Then ``fleetlog-aggregator`` and ``fleetlog-agent`` (one ``[[journal]]`` source reading
that directory with journalctl) run on loopback until every entry is in the topic's output; the
output is checked (every entry exactly once, in order). Reported: entries/s (agent start to the
last line written), the agent's CPU and its journalctl's CPU per million entries, peak RSS.

    python -m bench.journal [--entries 500000] [--repeat 1] [--mode push|pub] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq

from bench.backlog import aggregator_argv
from bench.procs import _CLK_TCK, ControlClient, Proc, free_port, wait_for

TOPIC = "jbench"
JOURNAL_REMOTE = next((p for p in ("/lib/systemd/systemd-journal-remote",
                                   "/usr/lib/systemd/systemd-journal-remote") if os.access(p, os.X_OK)), None)
WORDS = ["GET", "/api/v1/items", "200", "user=alice", "latency_ms=12", "cache=miss", "Grüße", "naïve",
         "connection", "reset", "by", "peer", "retrying", "in", "5s", "ok", "★"]


def generate(directory: str, entries: int, seed: int = 7) -> int:
    """Write ``entries`` into ``directory/bench.journal``; the bytes of their messages."""
    assert JOURNAL_REMOTE is not None
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    boot = f"{rng.getrandbits(128):032x}"
    t0 = int(time.time() * 1e6) - 86_400_000_000
    total = 0
    chunk = 100_000
    for start in range(0, entries, chunk):
        out = bytearray()
        for n in range(start, min(entries, start + chunk)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
            msg = f"J#{n:09d} {words}".encode()
            total += len(msg) + 1
            out += (f"__REALTIME_TIMESTAMP={t0 + n}\n__MONOTONIC_TIMESTAMP={n + 1}\n_BOOT_ID={boot}\n"
                    f"_HOSTNAME=bench\n_SYSTEMD_UNIT=app.service\nSYSLOG_IDENTIFIER=app\nPRIORITY=6\n"
                    f"_PID=1234\nMESSAGE=").encode() + msg + b"\n\n"
        subprocess.run([JOURNAL_REMOTE, f"--output={directory}/bench.journal", "-"], input=bytes(out),
                       check=True, capture_output=True, timeout=600)
    return total


def children_cpu_s(pid: int) -> float:
    """CPU seconds of the running children of ``pid`` (its journalctl)."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids = fh.read().split()
        except FileNotFoundError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


def check(out: str, entries: int) -> str:
    """'ok', or what is wrong with the output."""
    seen = 0
    with open(out, "rb") as fh:
        for line in fh:
            if not line.startswith(b"J#%09d " % seen):
                return f"line {seen + 1}: expected J#{seen:09d}, got {line[:20]!r}"
            seen += 1
    return "ok" if seen == entries else f"{seen} lines for {entries} entries"


def run(d: str, journal_dir: str, entries: int, size: int, mode: str, timeout_s: float) -> dict[str, Any]:
    os.makedirs(d, exist_ok=True)
    ports = {k: free_port() for k in ("pull", "xsub", "xpub")}
    out = os.path.join(d, "out", TOPIC, f"{TOPIC}.log")
    data = ports["pull"] if mode == "push" else ports["xsub"]
    aggregator = Proc("aggregator", aggregator_argv(d, ports), d)
    agent = Proc("agent", [sys.executable, "-m", "agent", *(a for s in (
        f'agent.state_dir="{d}/st"', f'agent.data="tcp://127.0.0.1:{data}"', f'agent.control="ipc://{d}/c.sock"',
        'agent.name="bench"', f'agent.mode="{mode}"', "sources=[]",
        f'journal=[{{topic="{TOPIC}", directory="{journal_dir}"}}]') for a in ("--set", s))], d)
    ctx: zmq.Context[Any] = zmq.Context()
    control = ControlClient(ctx, f"ipc://{d}/c.sock")
    agent_status = ControlClient(ctx, f"ipc://{d}/st/agent.sock")
    try:
        aggregator.start()
        wait_for("aggregator status", lambda: control.call("status", 0.5), 30, [aggregator])
        t0 = time.monotonic()
        agent.start()
        wait_for("every entry written", lambda: os.path.exists(out) and os.path.getsize(out) >= size,
                 timeout_s, [aggregator, agent])
        t_last = time.monotonic()

        def settled() -> dict[str, Any] | None:
            s = agent_status.call("status", 1.0)
            return s if s is not None and s["inflight_bytes"] == 0 else None
        wait_for("the last acknowledgement", settled, 30, [aggregator, agent])
        cpu = {"agent": agent.cpu_s(), "journalctl": children_cpu_s(agent.pid),
               "aggregator": aggregator.cpu_s()}
        rss = agent.peak_rss_kb()
    finally:
        for p in (agent, aggregator):
            p.stop(timeout_s=10)
        control.close()
        agent_status.close()
        ctx.term()
    wall = t_last - t0
    per_m = 1e6 / entries
    return {"mode": mode, "entries": entries, "wall_s": wall, "entries_per_s": entries / wall,
            "agent_cpu_s_per_m": cpu["agent"] * per_m, "journalctl_cpu_s_per_m": cpu["journalctl"] * per_m,
            "aggregator_cpu_s_per_m": cpu["aggregator"] * per_m, "agent_peak_rss_kb": rss,
            "check": check(out, entries)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.journal", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=500_000)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--mode", choices=["push", "pub"], default="push")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    if JOURNAL_REMOTE is None or shutil.which("journalctl") is None:
        print("bench: journal row skipped: needs journalctl and systemd-journal-remote (make system-deps)")
        return 0
    d = tempfile.mkdtemp(prefix="flj", dir="/tmp")
    try:
        t = time.monotonic()
        size = generate(os.path.join(d, "journal"), args.entries)
        print(f"bench: journal: {args.entries:,} entries, {size / 1e6:.1f} MB of messages, written in "
              f"{time.monotonic() - t:.1f}s", flush=True)
        runs = [run(os.path.join(d, f"run-{i}"), os.path.join(d, "journal"), args.entries, size, args.mode,
                    args.timeout_s) for i in range(max(1, args.repeat))]
        r = sorted(runs, key=lambda x: x["wall_s"])[len(runs) // 2]
        print("source   entries/s  agent CPU s/M entries  journalctl CPU s/M  aggregator CPU s/M  "
              "agent peak RSS  output")
        print(f"journal  {r['entries_per_s']:>9,.0f}  {r['agent_cpu_s_per_m']:>21.1f}  "
              f"{r['journalctl_cpu_s_per_m']:>18.1f}  {r['aggregator_cpu_s_per_m']:>18.1f}  "
              f"{r['agent_peak_rss_kb'] / 1024:>11.0f} MiB  {r['check']}")
        return 0 if all(x["check"] == "ok" for x in runs) else 1
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"bench: journal failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"bench: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
