"""Many agents catching up at once: the aggregator's memory, and how long the fleet takes.

``--agents`` (24) agents each start with a backlog of ``--lines`` (100,000) lines
(``bench/corpus.py``, one file each, about 19 MB), all against one aggregator that is already up,
as after an outage of the aggregator. Each agent ships into a topic of its own, so every output
is checked on its own: every line exactly once, in order, byte-identical. Reported: the time from
starting the first agent to the last byte written, lines/s, and the aggregator's peak RSS
(VmHWM), which is what ``aggregator.window_budget_bytes`` bounds (see the README, Flow control).

    python -m bench.catchup [--agents 24] [--lines 100000] [--set aggregator.KEY=VALUE ...]
                            [--timeout-s 300] [--keep] [--json PATH]

For example ``--set aggregator.window_budget_bytes=0`` shows the aggregator without a budget,
each agent then keeping its own 32 MiB window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import orjson

from bench import corpus
from bench.backlog import agent_argv, aggregator_argv
from bench.procs import Proc, free_port, wait_for


def run(args: argparse.Namespace, d: str) -> dict[str, Any]:
    src = corpus.generate(os.path.join(d, "src"), 1, args.lines, args.seed)[0]
    size = os.path.getsize(src)
    ports = {k: free_port() for k in ("pull", "xsub", "xpub")}
    control = f"ipc://{d}/c.sock"
    aggregator = Proc("aggregator", aggregator_argv(d, ports, tuple(args.set), control=control), d)
    agents = []
    for i in range(args.agents):
        logs = os.path.join(d, f"logs{i:03d}")
        os.makedirs(logs)
        os.link(src, os.path.join(logs, "app.log"))  # the same bytes, read by each agent on its own
        agents.append(Proc(f"agent{i:03d}", agent_argv(os.path.join(d, f"a{i:03d}"), logs, ports, "push",
                                                        control=control, topic=f"t{i:03d}",
                                                        name=f"catchup{i:03d}"), d))
    outputs = [os.path.join(d, "out", f"t{i:03d}", f"t{i:03d}.log") for i in range(args.agents)]
    procs = [aggregator, *agents]
    try:
        aggregator.start()
        wait_for("the aggregator's control socket", lambda: os.path.exists(control[6:]), 30, [aggregator])
        t0 = time.monotonic()
        for a in agents:
            a.start()
        wait_for("every agent's backlog in the output",
                 lambda: all(os.path.exists(o) and os.path.getsize(o) >= size for o in outputs),
                 args.timeout_s, procs, interval_s=0.02)
        wall = time.monotonic() - t0
        peak = aggregator.peak_rss_kb()
        agent_peaks = [a.peak_rss_kb() for a in agents]
    finally:
        for p in procs:
            p.stop(timeout_s=10)
    verdicts = [corpus.verify([o], [src], args.lines) for o in outputs]
    lines = args.agents * args.lines
    return {"agents": args.agents, "lines": lines, "wall_s": wall, "lines_per_s": lines / wall,
            "aggregator_peak_rss_kb": peak,
            "agent_peak_rss_kb_max": max(agent_peaks),
            "missing": sum(v.missing for v in verdicts), "duplicated": sum(v.duplicated for v in verdicts),
            "ok": all(v.ok for v in verdicts), "settings": args.set}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=24)
    p.add_argument("--lines", type=int, default=100_000, help="backlog lines per agent")
    p.add_argument("--set", action="append", default=[], metavar="aggregator.KEY=VALUE")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)
    d = tempfile.mkdtemp(prefix="flcatchup", dir="/tmp")
    try:
        r = run(args, d)
    finally:
        if args.keep:
            print(f"catchup: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    print(f"catchup: {r['agents']} agents x {args.lines:,} lines in {r['wall_s']:.2f}s = "
          f"{r['lines_per_s']:,.0f} lines/s; aggregator peak RSS "
          f"{r['aggregator_peak_rss_kb'] / 1024:.0f} MiB, "
          f"agents at most {r['agent_peak_rss_kb_max'] / 1024:.0f} MiB; missing {r['missing']}, "
          f"duplicated {r['duplicated']}: {'ok' if r['ok'] else 'CHECK FAILED'}"
          + (f" ({', '.join(args.set)})" if args.set else ""))
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
