"""``make bench``: ship a backlog through a real fleetlog, through fleetlog with acks off, and
through a bare floor, and compare.

8 files x 250,000 realistic lines (80-300 bytes, some unicode, each with ``id=<file>-<n>``) are
written before anything starts. Then ``fleetlog-aggregator`` and ``fleetlog-agent`` run as
subprocesses on loopback until every byte is in the topic's output file, twice: with their
guarantees as configured by default ("fleetlog"), and with them off ("acks off":
``aggregator.fsync=false``, and ``agent.max_inflight_bytes`` = 1 TiB so the agent never waits for an
acknowledgement). Then the floor (``bench/floor.py``: read, batch, orjson, PUSH->PULL, append; no
acks) does the same. Every output is checked: every id exactly once, in per-file order,
byte-identical to its source. With ``--repeat N`` (default 5) the pipelines take turns N times and
the table shows each one's median run (by wall time); the machine is shared, so compare medians.

    python -m bench.backlog [--files 8] [--lines-per-file 250000] [--mode push|pub] [--repeat 5]
                            [--no-acks-off] [--no-floor]
                            [--keep] [--json PATH] [--profile DIR] [--timeout-s 600] [--stuck-tail]

Wall time runs from starting the agent (the floor's sender) to the last line written. CPU is
user+system of all threads from /proc/PID/stat: the agent's (the sender's) from its start, the
aggregator's (the receiver's) from when it was ready; sampled after the last acknowledgement,
just before stopping. Peak RSS is VmHWM. Output rotation is off so the run measures the pipeline.
With ``--stuck-tail`` the fleetlog runs also have ``aggregatorctl tail`` of the topic writing into
a pipe nobody reads (a subscriber that stopped), and the tail process's peak RSS is shown too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson
import zmq

from bench import corpus, pyspy
from bench.procs import ControlClient, Proc, free_port, wait_for

TOPIC = "bench"
# The "acks off" run: nothing fsynced, and an in-flight bound the agent never reaches.
ACKS_OFF_AGGREGATOR = ("aggregator.fsync=false",)
ACKS_OFF_AGENT = ("agent.max_inflight_bytes=1099511627776",)


def aggregator_argv(d: str, ports: dict[str, int], extra: tuple[str, ...] = (),
                    control: str | None = None) -> list[str]:
    """The aggregator with its files under ``d`` (``out``, ``astate``), rotation off."""
    sets = {
        "output_dir": f'"{d}/out"', "state_dir": f'"{d}/astate"',
        "pull": f'"tcp://127.0.0.1:{ports["pull"]}"', "xsub": f'"tcp://127.0.0.1:{ports["xsub"]}"',
        "xpub": f'"tcp://127.0.0.1:{ports["xpub"]}"', "control": f'"{control or f"ipc://{d}/c.sock"}"',
        "rotate_max_bytes": "0", "rotate_interval_s": "0",
    }
    return [sys.executable, "-m", "aggregator",
            *(a for k, v in sets.items() for a in ("--set", f"aggregator.{k}={v}")),
            *(a for x in extra for a in ("--set", x))]


def agent_argv(d: str, logs: str, ports: dict[str, int], mode: str, extra: tuple[str, ...] = (),
               control: str | None = None, topic: str = TOPIC, name: str = "bench") -> list[str]:
    """The agent with its state under ``d/st``, following ``logs/*.log`` into ``topic``."""
    data_port = ports["pull"] if mode == "push" else ports["xsub"]
    sets = [
        f'agent.state_dir="{d}/st"', f'agent.data="tcp://127.0.0.1:{data_port}"',
        f'agent.control="{control or f"ipc://{d}/c.sock"}"', f'agent.name="{name}"', f'agent.mode="{mode}"',
        f'sources=[{{paths=["{logs}/*.log"], topic="{topic}"}}]', *extra,
    ]
    return [sys.executable, "-m", "agent", *(a for s in sets for a in ("--set", s))]


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def wait_output(path: str, expected_bytes: int, timeout_s: float, procs: list[Proc]) -> float:
    """Poll the output file's size (cheap) until it holds every byte; the time it did."""
    def done() -> float | None:
        return time.monotonic() if _file_size(path) >= expected_bytes else None
    return float(wait_for(f"{expected_bytes} bytes in {path}", done, timeout_s, procs, interval_s=0.005))


def run_fleetlog(d: str, logs: str, expected_lines: int, expected_bytes: int, mode: str, timeout_s: float,
                 profile_dir: str | None, name: str = "fleetlog", agent_sets: tuple[str, ...] = (),
                 aggregator_sets: tuple[str, ...] = (), stuck_tail: bool = False) -> dict[str, Any]:
    """One run in its own directory ``d`` (output, state, daemon logs); the sources are in ``logs``.
    ``stuck_tail``: an ``aggregatorctl tail`` of the topic writes into a pipe nobody reads."""
    os.makedirs(d, exist_ok=True)
    ports = {k: free_port() for k in ("pull", "xsub", "xpub")}
    out = os.path.join(d, "out", TOPIC, f"{TOPIC}.log")
    aggregator = Proc("aggregator", aggregator_argv(d, ports, aggregator_sets), d)
    agent = Proc("agent", agent_argv(d, logs, ports, mode, agent_sets), d)
    recorders: list[Proc] = []
    ctx: zmq.Context[Any] = zmq.Context()
    control = ControlClient(ctx, f"ipc://{d}/c.sock")
    agent_status = ControlClient(ctx, f"ipc://{d}/st/agent.sock")
    tail: subprocess.Popen[bytes] | None = None
    tail_kb = 0
    try:
        aggregator.start()
        wait_for("aggregator status", lambda: control.call("status", 0.5), 30, [aggregator])
        if stuck_tail:
            with open(os.path.join(d, "tail.log"), "wb") as err:
                tail = subprocess.Popen([sys.executable, "-m", "aggregator.ctl", "--control", f"ipc://{d}/c.sock",
                                         "tail", TOPIC, "--wait"], stdout=subprocess.PIPE, stderr=err)
            wait_for("the tail's subscription", lambda: (control.call("status", 0.5) or {}).get(
                "subscriptions"), 30, [aggregator])
        cpu0_aggregator = aggregator.cpu_s()
        t0 = time.monotonic()
        agent.start()
        if profile_dir is not None:
            recorders = _start_profilers(profile_dir, [aggregator, agent], agent_status)
        t_last = wait_output(out, expected_bytes, timeout_s, [aggregator, agent])

        def settled() -> dict[str, Any] | None:
            s = agent_status.call("status", 1.0)
            return s if s is not None and s["inflight_bytes"] == 0 and s["lag_bytes"] == 0 else None
        a_status = wait_for("the last acknowledgement", settled, 30, [aggregator, agent])
        g_status = control.call("status") or {}
        cpu = {"agent": agent.cpu_s(), "aggregator": aggregator.cpu_s() - cpu0_aggregator}
        rss = {"agent": agent.peak_rss_kb(), "aggregator": aggregator.peak_rss_kb()}
        if tail is not None:
            tail_kb = _vm_hwm_kb(tail.pid)
        threads = {"agent": agent.threads_cpu_s(), "aggregator": aggregator.threads_cpu_s()}
        for r in recorders:
            pyspy.finish(r)
        codes = {"agent": agent.stop(), "aggregator": aggregator.stop()}
    finally:
        if tail is not None:
            tail.kill()
            tail.wait(10)
            assert tail.stdout is not None
            tail.stdout.close()
        for p in (*recorders, agent, aggregator):
            p.stop(timeout_s=10)
        control.close()
        agent_status.close()
        ctx.term()
    totals = g_status.get("totals", {})
    return {
        "name": name, "mode": mode, "wall_s": t_last - t0, "lines": expected_lines, "bytes": expected_bytes,
        "send": {"name": "agent", "cpu_s": cpu["agent"], "peak_rss_kb": rss["agent"]},
        "recv": {"name": "aggregator", "cpu_s": cpu["aggregator"], "peak_rss_kb": rss["aggregator"]},
        "exit_codes": codes, "threads_cpu_s": threads,
        "details": {
            "batches": totals.get("batches"), "commits": totals.get("commits"),
            "lines_written": totals.get("lines_written"),
            "duplicates_dropped": totals.get("duplicates_dropped"), "resyncs": totals.get("resyncs"),
            "malformed_dropped": totals.get("malformed_dropped"),
            "agent_batches": a_status.get("batches_shipped"), "agent_resends": a_status.get("resends"),
        },
        "output": corpus.output_files(os.path.dirname(out), TOPIC),
        **({"stuck_tail_peak_rss_kb": tail_kb} if stuck_tail else {}),
    }


def _vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def _start_profilers(profile_dir: str, targets: list[Proc], agent_status: ControlClient) -> list[Proc]:
    exe = pyspy.find()
    if exe is None:
        print("bench: --profile needs py-spy (.venv/bin/pip install py-spy); not profiling", file=sys.stderr)
        return []
    os.makedirs(profile_dir, exist_ok=True)
    # Attach once the agent's interpreter is up (its status socket answers): startup is not profiled.
    wait_for("agent status", lambda: agent_status.call("status", 0.5), 30, targets, interval_s=0.01)
    return [pyspy.record(exe, t, profile_dir) for t in targets]


def run_floor(d: str, sources: list[str], expected_lines: int, expected_bytes: int,
              timeout_s: float) -> dict[str, Any]:
    """The floor in its own directory ``d``."""
    port = free_port()
    fd = d
    os.makedirs(fd, exist_ok=True)
    me = [sys.executable, "-m", "bench.floor"]
    ready, recv_result, send_result = (os.path.join(fd, n) for n in ("ready", "recv.json", "send.json"))
    receiver = Proc("floor-recv", [*me, "recv", "--bind", f"tcp://127.0.0.1:{port}", "--out", f"{fd}/out",
                                   "--expect", str(expected_lines), "--ready", ready,
                                   "--result", recv_result], fd)
    sender = Proc("floor-send", [*me, "send", "--connect", f"tcp://127.0.0.1:{port}",
                                 "--result", send_result, *sources], fd)
    try:
        receiver.start()
        wait_for("the floor receiver", lambda: os.path.exists(ready), 30, [receiver])
        t0 = time.monotonic()
        sender.start()
        if receiver.wait(timeout_s) is None:
            raise TimeoutError(f"the floor did not finish within {timeout_s:g}s")
        if sender.wait(30) is None:
            raise TimeoutError("the floor sender did not exit")
    finally:
        sender.stop(timeout_s=5)
        receiver.stop(timeout_s=5)
    for p in (receiver, sender):
        if p.popen is not None and p.popen.returncode != 0:
            raise RuntimeError(f"{p.name} failed:\n{p.tail()}")
    with open(recv_result, "rb") as fh:
        r = orjson.loads(fh.read())
    with open(send_result, "rb") as fh:
        s = orjson.loads(fh.read())
    return {
        "name": "floor", "wall_s": r["t_last"] - t0, "lines": r["lines"], "bytes": expected_bytes,
        "send": {"name": "sender", "cpu_s": s["cpu_s"], "peak_rss_kb": s["peak_rss_kb"]},
        "recv": {"name": "receiver", "cpu_s": r["cpu_s"] - r["cpu_ready_s"], "peak_rss_kb": r["peak_rss_kb"]},
        "output": corpus.output_files(os.path.join(fd, "out", TOPIC), TOPIC),
    }


def derive(run: dict[str, Any]) -> None:
    """Rates and CPU per million lines, added in place."""
    per_m = run["lines"] / 1e6
    run["lines_per_s"] = run["lines"] / run["wall_s"]
    run["mb_per_s"] = run["bytes"] / 1e6 / run["wall_s"]
    for side in ("send", "recv"):
        run[side]["cpu_s_per_m_lines"] = run[side]["cpu_s"] / per_m
    run["cpu_s_per_m_lines"] = run["send"]["cpu_s_per_m_lines"] + run["recv"]["cpu_s_per_m_lines"]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the lower middle one of an even count), and every
    run's throughput in ``all_lines_per_s``; a failed check in any run shows in the median's."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["all_lines_per_s"] = [r["lines_per_s"] for r in runs]
    bad = [r for r in runs if not r["verdict"].ok]
    if bad:
        mid["verdict"] = bad[0]["verdict"]
    return mid


def _check(v: corpus.Verdict) -> str:
    if v.ok:
        return "ok"
    return (f"missing {v.missing} dup {v.duplicated} order {v.out_of_order} foreign {v.foreign} "
            f"identical {v.files_identical}/{v.files}")


def table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'':18} {'wall s':>7} {'lines/s':>10} {'MB/s':>6}   {'CPU s per M lines':^28}   "
            f"{'peak RSS MiB':^16}  {'check':<}")
    sub = (f"{'':18} {'':>7} {'':>10} {'':>6}   {'send':>8} {'recv':>8} {'total':>8}     "
           f"{'send':>7} {'recv':>7}")
    rows = [head, sub]
    for r in runs:
        rows.append(
            f"{r['name']:18} {r['wall_s']:7.2f} {r['lines_per_s']:10,.0f} {r['mb_per_s']:6.1f}   "
            f"{r['send']['cpu_s_per_m_lines']:8.2f} {r['recv']['cpu_s_per_m_lines']:8.2f} "
            f"{r['cpu_s_per_m_lines']:8.2f}     {r['send']['peak_rss_kb'] / 1024:7.0f} "
            f"{r['recv']['peak_rss_kb'] / 1024:7.0f}  {_check(r['verdict'])}")
    if any(len(r.get("all_lines_per_s", ())) > 1 for r in runs):
        rows.append("")
        for r in runs:
            rows.append(f"{r['name']:18} lines/s of each run: "
                        + ", ".join(f"{x:,.0f}" for x in r["all_lines_per_s"]))
    by_name = {r["name"]: r for r in runs}
    fl, off, floor = by_name.get("fleetlog"), by_name.get("acks off"), by_name.get("floor")
    if fl is not None and off is not None:
        rows.append("")
        rows.append(f"fleetlog / acks off: throughput {100 * fl['lines_per_s'] / off['lines_per_s']:.0f}% "
                    f"(target >= 80%); CPU per line "
                    f"{fl['cpu_s_per_m_lines'] / off['cpu_s_per_m_lines']:.2f}x; the price of fsync and "
                    f"of waiting for acknowledgements")
    if fl is not None and floor is not None:
        def cpu(side: str) -> float:
            return float(fl[side]["cpu_s_per_m_lines"] / floor[side]["cpu_s_per_m_lines"])
        rows.append(f"fleetlog / floor: throughput {100 * fl['lines_per_s'] / floor['lines_per_s']:.0f}% "
                    f"(target >= 50%); "
                    f"CPU per line {fl['cpu_s_per_m_lines'] / floor['cpu_s_per_m_lines']:.2f}x "
                    f"(agent {cpu('send'):.2f}x the sender, aggregator {cpu('recv'):.2f}x the receiver)")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--lines-per-file", type=int, default=250_000)
    p.add_argument("--mode", choices=("push", "pub"), default="push")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5, help="runs of each pipeline, taking turns; medians shown")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--profile", metavar="DIR",
                   help="record the agent and aggregator with py-spy into DIR (the last fleetlog run)")
    p.add_argument("--no-floor", action="store_true", help="skip the floor")
    p.add_argument("--no-acks-off", action="store_true", help="skip the acks-off fleetlog run")
    p.add_argument("--timeout-s", type=float, default=600, help="deadline for each pipeline")
    p.add_argument("--stuck-tail", action="store_true",
                   help="fleetlog runs with `aggregatorctl tail` of the topic writing into a pipe"
                        " nobody reads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = tempfile.mkdtemp(prefix="flb", dir="/tmp")
    try:
        return _bench(args, d)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"bench: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def _one_run(args: argparse.Namespace, d: str, name: str, i: int, sources: list[str], lines: int,
             size: int) -> dict[str, Any]:
    rd = os.path.join(d, f"{name.replace(' ', '-')}-{i}")
    logs = os.path.dirname(sources[0])
    last = i == args.repeat - 1
    if name == "floor":
        run = run_floor(rd, sources, lines, size, args.timeout_s)
    else:
        off = name == "acks off"
        run = run_fleetlog(rd, logs, lines, size, args.mode, args.timeout_s,
                           args.profile if last and not off else None, name=name,
                           agent_sets=ACKS_OFF_AGENT if off else (),
                           aggregator_sets=ACKS_OFF_AGGREGATOR if off else (),
                           stuck_tail=args.stuck_tail and not off)
    derive(run)
    run["verdict"] = corpus.verify(run.pop("output"), sources, args.lines_per_file)
    if not args.keep:
        shutil.rmtree(rd, ignore_errors=True)  # 400 MB each: do not keep them all
    print(f"bench: {name} run {i + 1}/{args.repeat}: {run['wall_s']:.2f}s, "
          f"{run['lines_per_s']:,.0f} lines/s, {_check(run['verdict'])}", flush=True)
    return run


def _bench(args: argparse.Namespace, d: str) -> int:
    lines = args.files * args.lines_per_file
    t = time.monotonic()
    sources = corpus.generate(os.path.join(d, "logs"), args.files, args.lines_per_file, args.seed)
    size = sum(os.path.getsize(p) for p in sources)
    print(f"bench: {args.files} files x {args.lines_per_file:,} lines = {lines:,} lines, {size / 1e6:.1f} MB "
          f"(avg {size / lines:.0f} B/line), generated in {time.monotonic() - t:.1f}s in {d}; "
          f"{os.cpu_count()} CPUs", flush=True)
    names = ["fleetlog"] + ([] if args.no_acks_off else ["acks off"]) + ([] if args.no_floor else ["floor"])
    all_runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(max(1, args.repeat)):
        for name in names:
            all_runs[name].append(_one_run(args, d, name, i, sources, lines, size))
    runs = [median_run(all_runs[n]) for n in names]
    print(table(runs))
    fl = runs[0]
    print("fleetlog: " + ", ".join(f"{k} {v}" for k, v in fl["details"].items()))
    if args.stuck_tail:
        print(f"stuck tail: aggregator peak RSS {fl['recv']['peak_rss_kb'] / 1024:.0f} MiB, the tail process "
              f"{fl['stuck_tail_peak_rss_kb'] / 1024:.0f} MiB")
    for name, threads in fl["threads_cpu_s"].items():
        busy = sorted(threads.items(), key=lambda kv: -kv[1])
        print(f"  {name} CPU s by thread: " + ", ".join(f"{t} {s:.2f}" for t, s in busy if s >= 0.01))
    if args.profile:
        for name in ("agent", "aggregator"):
            path = os.path.join(args.profile, f"{name}.collapsed.txt")
            if os.path.exists(path):
                print(pyspy.summarize(path))
    if args.json:
        def plain(r: dict[str, Any]) -> dict[str, Any]:
            return {**r, "verdict": {**vars(r["verdict"]), "ok": r["verdict"].ok}}
        doc = {"files": args.files, "lines_per_file": args.lines_per_file, "bytes": size, "mode": args.mode,
               "cpus": os.cpu_count(), "profiled": bool(args.profile), "repeat": args.repeat,
               "runs": [plain(r) for r in runs],
               "all_runs": {n: [plain(r) for r in rs] for n, rs in all_runs.items()}}
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0 if all(r["verdict"].ok for rs in all_runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
