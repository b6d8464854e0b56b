"""Backpressure (issue 4.4): the agent's memory while the aggregator is down, and the catch-up after.

A backlog (default 8 files, 1.5 million lines in all, ``bench/corpus.py``) is written, then the
agent starts with the aggregator DOWN (its endpoints are reserved, nothing listens). For
``--down-s`` seconds the agent's resident set (VmRSS) is sampled every ``--sample-ms``; at the end
``fleetlog-agent status --json`` (the agent's local status socket) tells what it holds in flight.
The contract says the agent stops reading with bounded memory: ``agent.max_inflight_bytes``
(32 MiB by default) bounds what is shipped but not acknowledged. Then the aggregator starts on the
reserved endpoints and the catch-up time runs until every byte of the backlog is in the output,
which is then checked: every line exactly once, in order, byte-identical.

    python -m bench.backpressure [--files 8] [--lines 1500000 [15000000 ...]] [--down-s 15]
                                 [--sample-ms 500] [--timeout-s 600] [--keep] [--json PATH]

Several ``--lines`` values run one after the other (e.g. ``--lines 1500000 15000000`` for a
backlog 10 times larger; its corpus alone takes about a minute to write and 3 GB of disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson
import zmq

from agent.config import AgentConfig
from bench import corpus
from bench.backlog import TOPIC, agent_argv, aggregator_argv, wait_output
from bench.procs import ControlClient, Proc, Sampler, free_port, wait_for

DEFAULT_INFLIGHT_BOUND: int = next(f.default for f in dataclasses.fields(AgentConfig)
                                   if f.name == "max_inflight_bytes")  # type: ignore[assignment]
MIB = 1024 * 1024


def agent_status_cli(state_dir: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """What ``fleetlog-agent status --json`` prints, asked the way an operator asks."""
    argv = [sys.executable, "-m", "agent", "status", "--json", "--set", f'agent.state_dir="{state_dir}"']
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, timeout=timeout_s + 10, check=False)
    took = time.monotonic() - t0
    if out.returncode != 0:
        return {"error": out.stderr.decode("utf-8", "replace").strip(), "took_s": took}
    doc: dict[str, Any] = orjson.loads(out.stdout)
    doc["took_s"] = took
    return doc


def run_once(d: str, files: int, lines: int, down_s: float, sample_s: float, timeout_s: float,
             seed: int) -> dict[str, Any]:
    per_file = lines // files
    lines = per_file * files
    t = time.monotonic()
    sources = corpus.generate(os.path.join(d, "logs"), files, per_file, seed)
    size = sum(os.path.getsize(p) for p in sources)
    print(f"backpressure: {files} files x {per_file:,} lines = {lines:,} lines, {size / 1e6:.0f} MB, "
          f"generated in {time.monotonic() - t:.1f}s in {d}", flush=True)
    ports = {k: free_port() for k in ("pull", "xsub", "xpub")}
    run = os.path.join(d, "run")
    os.makedirs(run)
    out = os.path.join(run, "out", TOPIC, f"{TOPIC}.log")
    agent = Proc("agent", agent_argv(run, os.path.join(d, "logs"), ports, "push"), run)
    aggregator = Proc("aggregator", aggregator_argv(run, ports), run)
    ctx: zmq.Context[Any] = zmq.Context()
    status = ControlClient(ctx, f"ipc://{run}/st/agent.sock")
    sampler_status = ControlClient(ctx, f"ipc://{run}/st/agent.sock")
    control = ControlClient(ctx, f"ipc://{run}/c.sock")
    rss: Sampler | None = None
    inflight: Sampler | None = None
    try:
        agent.start()
        t_agent = time.monotonic()
        rss = Sampler(agent.rss_kb, sample_s).start()
        wait_for("agent status", lambda: status.call("status", 0.5), 30, [agent], interval_s=0.05)
        # A socket of its own: ZeroMQ sockets are not shared between threads.
        inflight = Sampler(lambda: (sampler_status.call("status", 0.4) or {}).get("inflight_bytes"),
                           1.0).start()
        # The agent must stay alive all along: wait_for fails at once if it exits.
        wait_for("the end of the outage", lambda: time.monotonic() - t_agent >= down_s, down_s + 5, [agent],
                 interval_s=0.1)
        t_down_end = time.monotonic()
        cli = agent_status_cli(os.path.join(run, "st"))
        down_rss = rss.between(t_agent, t_down_end)
        hwm_down = agent.peak_rss_kb()

        aggregator.start()
        t_up = time.monotonic()
        t_last = wait_output(out, size, timeout_s, [aggregator, agent])

        def settled() -> dict[str, Any] | None:
            s = status.call("status", 1.0)
            return s if s is not None and s["inflight_bytes"] == 0 and s["lag_bytes"] == 0 else None
        a_status = wait_for("the last acknowledgement", settled, 60, [aggregator, agent])
        t_acked = time.monotonic()
        g_status = control.call("status") or {}
        rss.stop()
        inflight.stop()
        up_rss = rss.between(t_up, t_acked)
        codes = {"agent": agent.stop(), "aggregator": aggregator.stop()}
    finally:
        for s in (rss, inflight):
            if s is not None:
                s.stop()
        agent.stop(timeout_s=10)
        aggregator.stop(timeout_s=10)
        status.close()
        sampler_status.close()
        control.close()
        ctx.term()
    verdict = corpus.verify(corpus.output_files(os.path.dirname(out), TOPIC), sources, per_file)
    totals = g_status.get("totals", {})
    return {
        "files": files, "lines": lines, "bytes": size, "down_s": t_down_end - t_agent,
        # The baseline is the first sample after a second: interpreter up, files open, first batches out.
        "rss_first_kb": next((v for t, v in rss.samples if t - t_agent >= 1.0), 0),
        "rss_peak_down_kb": max(down_rss, default=0),
        "rss_last_down_kb": down_rss[-1] if down_rss else 0, "hwm_down_kb": hwm_down,
        "rss_peak_catchup_kb": max(up_rss, default=0),
        "rss_timeline_kb": [(round(t - t_agent, 1), v) for t, v in rss.samples],
        "inflight_timeline": [(round(t - t_agent, 1), v) for t, v in inflight.samples],
        "status_down": {k: cli.get(k) for k in ("inflight_bytes", "lag_bytes", "lines_shipped",
                                                "batches_shipped", "resends", "took_s", "error")},
        "catchup_s": t_last - t_up, "acked_s": t_acked - t_up, "catchup_lines_per_s": lines / (t_last - t_up),
        "agent_after": {k: a_status.get(k) for k in ("lines_shipped", "batches_shipped", "resends")},
        "aggregator": {k: totals.get(k)
                       for k in ("lines_written", "duplicates_dropped", "resyncs", "batches")},
        "exit_codes": codes, "verdict": verdict,
    }


def report(r: dict[str, Any]) -> str:
    v = r["verdict"]
    check = "ok (every line exactly once, in order, identical)" if v.ok else (
        f"FAILED: missing {v.missing} dup {v.duplicated} order {v.out_of_order} foreign {v.foreign} "
        f"identical {v.files_identical}/{v.files}")
    sd = r["status_down"]
    bound = DEFAULT_INFLIGHT_BOUND
    growth = r["rss_peak_down_kb"] - r["rss_first_kb"]
    timeline = ", ".join(f"{t:g}s {v / 1024:.0f}" for t, v in r["rss_timeline_kb"][::2]
                         if t <= r["down_s"] + 0.5)
    inflight = ", ".join(f"{t:g}s {v / MIB:.1f}" if v is not None else f"{t:g}s ?"
                         for t, v in r["inflight_timeline"] if t <= r["down_s"] + 0.5)
    return "\n".join([
        f"backlog {r['lines']:,} lines in {r['files']} files ({r['bytes'] / 1e6:.0f} MB); aggregator down "
        f"for {r['down_s']:.1f}s",
        f"  bound: agent.max_inflight_bytes = {bound / MIB:.0f} MiB (default)",
        f"  agent RSS while down (MiB): at 1s {r['rss_first_kb'] / 1024:.0f}, peak "
        f"{r['rss_peak_down_kb'] / 1024:.0f} (VmHWM {r['hwm_down_kb'] / 1024:.0f}), last "
        f"{r['rss_last_down_kb'] / 1024:.0f}; growth 1s->peak {growth / 1024:.0f} MiB = "
        f"{growth * 1024 / bound:.1f}x the bound",
        f"  RSS timeline (MiB): {timeline}",
        f"  in flight timeline (MiB, agent status socket): {inflight}",
        f"  `fleetlog-agent status --json` at {r['down_s']:.0f}s (answered in {sd['took_s']:.2f}s): "
        + (f"error {sd['error']}" if sd.get("error") else
           f"inflight_bytes {sd['inflight_bytes']:,} ({sd['inflight_bytes'] / MIB:.1f} MiB), lag_bytes "
           f"{sd['lag_bytes']:,}, lines_shipped {sd['lines_shipped']:,}, batches {sd['batches_shipped']}, "
           f"resends {sd['resends']}"),
        f"  catch-up after the aggregator started: all lines in the output after {r['catchup_s']:.2f}s "
        f"({r['catchup_lines_per_s']:,.0f} lines/s), all acknowledged after {r['acked_s']:.2f}s; agent RSS "
        f"peak during catch-up {r['rss_peak_catchup_kb'] / 1024:.0f} MiB",
        "  aggregator: " + ", ".join(f"{k} {v}" for k, v in r["aggregator"].items())
        + "; agent: " + ", ".join(f"{k} {v}" for k, v in r["agent_after"].items()),
        f"  check: {check}",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.backpressure", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--lines", type=int, nargs="+", default=[1_500_000],
                   help="backlog size(s) in lines, all files together; each value is one run")
    p.add_argument("--down-s", type=float, default=15.0, help="how long the aggregator stays down")
    p.add_argument("--sample-ms", type=int, default=500, help="RSS sampling interval")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=600, help="deadline for the catch-up")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    ok = True
    for lines in args.lines:
        d = tempfile.mkdtemp(prefix="flbp", dir="/tmp")
        try:
            r = run_once(d, args.files, lines, args.down_s, args.sample_ms / 1000, args.timeout_s, args.seed)
        except (RuntimeError, TimeoutError) as exc:
            print(f"backpressure: failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.keep:
                print(f"backpressure: kept {d}")
            else:
                shutil.rmtree(d, ignore_errors=True)
        print(report(r), flush=True)
        ok = ok and r["verdict"].ok
        results.append({**r, "verdict": {**vars(r["verdict"]), "ok": r["verdict"].ok}})
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps({"runs": results, "cpus": os.cpu_count()}, option=orjson.OPT_INDENT_2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
