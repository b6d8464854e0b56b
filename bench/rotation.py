"""``make bench-rotation``: how long a rotation boundary of many topics stalls the aggregator.

One real aggregator rotates every ``--interval-s`` (10) seconds (UTC boundaries, gzip on, fsync on)
while ``--topics`` (2,000) simulated agents, one topic each, send ``--rate`` (5) lines/s each
(10,000 lines/s in all), shipped once a second (``--batch-ms``), through the real protocol
(``bench/fleet.py``'s simulator: hello, heartbeats, acks, resend after 3 s without an ack).
Every second the aggregator's status is read: its loop probe
(``loop.stall_recent_ms``, how late a 100 ms timer fired in the last 10-20 s) gives the longest
stall of the event loop, and when it happened.

Reported: the loop's longest stall and its stall at each boundary, ack latency (p50 / p99 / max),
batches the simulated agents resent after an ack timeout, rotated files written, the
aggregator's CPU and peak RSS; every line is checked (exactly once, in order, across the rotated
and compressed files).

    python -m bench.rotation [--topics 2000] [--rate 5] [--batch-ms 1000] [--interval-s 10] [--duration-s 35]
                             [--procs 4] [--set aggregator.KEY=VALUE] [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import orjson
import zmq

from bench.backlog import aggregator_argv
from bench.fleet import ID_RE, _pct
from bench.procs import ControlClient, Proc, free_port, wait_for


def verify(out: str, expected: dict[int, int]) -> dict[str, int]:
    """Every agent's lines exactly once and in order, across rotated (gzip) and active files."""
    last = dict.fromkeys(expected, -1)
    seen = {a: bytearray(n) for a, n in expected.items()}
    v = {"lines": 0, "duplicated": 0, "out_of_order": 0, "foreign": 0, "missing": 0, "rotated_files": 0}
    for topic in sorted(os.listdir(out)):
        directory = os.path.join(out, topic)
        active = f"{topic}.log"
        # Rotated names sort oldest first; the active file is the newest.
        names = sorted(n for n in os.listdir(directory) if n != active and not n.endswith(".tmp"))
        v["rotated_files"] += len(names)
        for name in [*names, active]:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as fh:
                data = gzip.decompress(fh.read()) if name.endswith(".gz") else fh.read()
            for line in data.splitlines():
                v["lines"] += 1
                m = ID_RE.search(line + b" ")
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
    control = f"tcp://127.0.0.1:{ports['control']}"
    argv = aggregator_argv(d, ports, control=control)
    # aggregator_argv turns rotation off; the last --set of a key wins.
    argv += ["--set", "aggregator.rotate_max_bytes=0", "--set", "aggregator.retain_files=0",
             "--set", f"aggregator.rotate_interval_s={args.interval_s}",
             *(a for x in args.set for a in ("--set", x))]
    aggregator = Proc("aggregator", argv, d)
    sims: list[Proc] = []
    ctx: zmq.Context[Any] = zmq.Context()
    client = ControlClient(ctx, control)
    per = -(-args.topics // args.procs)
    go = os.path.join(d, "go")
    samples: list[tuple[float, float, float]] = []  # (seconds since t0, stall_recent_ms, stall_max_ms)
    try:
        aggregator.start()
        wait_for("aggregator status", lambda: client.call("status", 0.5), 30, [aggregator])
        for i, first in enumerate(range(0, args.topics, per)):
            count = min(per, args.topics - first)
            sims.append(Proc(f"sim{i}", [
                sys.executable, "-m", "bench.fleet", "sim", "--first", str(first), "--count", str(count),
                "--pull", f"tcp://127.0.0.1:{ports['pull']}", "--control", control,
                "--rate", str(args.rate), "--batch-ms", str(args.batch_ms),
                "--duration-s", str(args.duration_s),
                "--topics", str(args.topics), "--settle-s", "30",
                "--ready", os.path.join(d, f"ready{i}"), "--go", go,
                "--result", os.path.join(d, f"result{i}.json")], d).start())
        wait_for("every simulated agent's hello", lambda: all(
            os.path.exists(os.path.join(d, f"ready{i}")) for i in range(len(sims))), 120, [aggregator, *sims])
        t0 = time.monotonic() + 0.2
        with open(go + ".tmp", "w") as fh:
            fh.write(repr(t0))
        os.rename(go + ".tmp", go)
        cpu0 = aggregator.cpu_s()
        while time.monotonic() < t0 + args.duration_s + 5:
            s = client.call("status", 15)
            if s is not None and "loop" in s:
                loop = s["loop"]
                samples.append((time.monotonic() - t0, loop["stall_recent_ms"], loop["stall_max_ms"]))
            time.sleep(1.0)
        cpu1 = aggregator.cpu_s()
        unsettled = []  # simulators still waiting for acks after their settle time: no check then
        for p in sims:
            if p.wait(60) is None:
                unsettled.append(p.name)
            elif p.popen is not None and p.popen.returncode != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.tail()}")
        final = client.call("status", 15) or {}
        hwm = aggregator.peak_rss_kb()
        code = aggregator.stop(timeout_s=30)
    finally:
        for p in sims:
            p.stop(timeout_s=5)
        aggregator.stop(timeout_s=30)
        client.close()
        ctx.term()
    results = []
    for i in range(len(sims)):
        with contextlib.suppress(FileNotFoundError), open(os.path.join(d, f"result{i}.json"), "rb") as fh:
            results.append(orjson.loads(fh.read()))
    expected = {int(name[4:]): n for r in results for name, n in r["lines"].items()}
    lat = [x for r in results for x in r["latencies_s"]]
    stats: dict[str, int] = {}
    for r in results:
        for k, x in r["stats"].items():
            stats[k] = stats.get(k, 0) + x
    return {
        "topics": args.topics, "rate": args.rate, "interval_s": args.interval_s,
        "duration_s": args.duration_s,
        "offered_lines_per_s": args.topics * args.rate,
        "loop_stall_max_ms": (final.get("loop") or {}).get("stall_max_ms"),
        "stall_samples": samples,
        "ack_latency_ms": {"n": len(lat), "p50": 1000 * _pct(lat, 0.5), "p99": 1000 * _pct(lat, 0.99),
                           "max": 1000 * max(lat, default=float("nan"))},
        "resent_batches": stats.get("ack_timeouts", 0), "stats": stats,
        "aggregator_cpu_per_s": (cpu1 - cpu0) / (args.duration_s + 5), "aggregator_hwm_kb": hwm,
        "exit_code": code, "unsettled": unsettled,
        "verify": None if unsettled else verify(os.path.join(d, "out"), expected),
    }


def report(r: dict[str, Any]) -> str:
    lat, v = r["ack_latency_ms"], r["verify"]
    ok = v is not None and v["missing"] == v["duplicated"] == v["out_of_order"] == v["foreign"] == 0
    # A stall shows in the window after it: list the windows where it jumped.
    steps = [f"{t:.0f}s:{recent:.0f}" for t, recent, _ in r["stall_samples"] if recent >= 100]
    return "\n".join([
        f"rotation: {r['topics']} topics rotating every {r['interval_s']}s under "
        f"{r['offered_lines_per_s']:,} lines/s for {r['duration_s']:g}s; {os.cpu_count()} CPUs",
        f"  {'loop stall max ms':34} {r['loop_stall_max_ms']}",
        f"  {'windows with a stall >= 100 ms':34} {', '.join(steps) or 'none'}",
        f"  {'ack latency ms p50 / p99 / max':34} {lat['p50']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f}"
        f"  ({lat['n']:,} batches)",
        f"  {'batches resent after ack timeout':34} {r['resent_batches']}",
        f"  {'aggregator CPU (cores) / VmHWM MiB':34} {r['aggregator_cpu_per_s']:.2f} / "
        f"{r['aggregator_hwm_kb'] / 1024:.0f}",
        f"  check: {'ok' if ok else 'FAILED'} ("
        + (", ".join(f"{k} {x}" for k, x in v.items()) if v else
           f"not acknowledged in time: {', '.join(r['unsettled'])}") + ")",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rotation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--topics", type=int, default=2000, help="simulated agents, one topic each")
    p.add_argument("--rate", type=int, default=5, help="lines/s per agent")
    p.add_argument("--batch-ms", type=int, default=1000, help="each agent ships what it has this often")
    p.add_argument("--interval-s", type=int, default=10, help="the aggregator's rotate_interval_s")
    p.add_argument("--duration-s", type=float, default=35)
    p.add_argument("--procs", type=int, default=4, help="simulator processes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more aggregator settings, e.g. aggregator.fsync=false")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = tempfile.mkdtemp(prefix="flr", dir="/tmp")
    try:
        r = run(args, d)
    except (RuntimeError, TimeoutError) as exc:
        print(f"rotation: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"rotation: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    print(report(r))
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(r, option=orjson.OPT_INDENT_2))
    v = r["verify"]
    ok = v is not None and v["missing"] == v["duplicated"] == v["out_of_order"] == v["foreign"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
