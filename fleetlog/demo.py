"""``make run``: an aggregator, an agent and a small log writer on loopback, to watch lines flow.

Everything lives under ``./demo`` (logs, output, state, and the two config files the daemons
run with: ``demo/agent.toml`` and ``demo/aggregator.toml``, written at each start); the
aggregator listens on tcp://127.0.0.1:5555-5558, its built-in defaults, so
``aggregatorctl status`` in another terminal works with no flags. Ctrl-C stops everything
cleanly.

Settings: ``make run RUN_ARGS="..."`` passes options to this module (``--help`` lists them):
``--agent-set KEY=VALUE`` and ``--aggregator-set KEY=VALUE`` as the daemons' own ``--set``,
``--dir``, ``--port-base``, ``--status-interval-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

PATHS = ["/", "/login", "/api/orders", "/api/users/42", "/static/app.js", "/health"]
LEVELS = ["INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"]


def write_some(logs: Path, rng: random.Random, n: int) -> None:
    now = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
    with open(logs / "web.log", "a") as web:
        for _ in range(n):
            web.write(f'10.0.{rng.randint(0, 9)}.{rng.randint(1, 254)} - - [{now}] "GET {rng.choice(PATHS)} '
                      f'HTTP/1.1" {rng.choice([200, 200, 200, 304, 404, 500])} {rng.randint(80, 9000)}\n')
    with open(logs / "app.log", "a") as app:
        for _ in range(max(1, n // 3)):
            app.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {rng.choice(LEVELS)} "
                      f"orders: processed order {rng.randint(1000, 99999)} in {rng.random() * 90:.1f}ms\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make run RUN_ARGS=...", description="An aggregator, an agent and a demo log writer on "
        "loopback. Options go through make as RUN_ARGS, e.g. make run RUN_ARGS=\"--agent-set "
        "agent.latency_budget_ms=200 --aggregator-set aggregator.format=json\".")
    p.add_argument("--dir", default=os.environ.get("FLEETLOG_DEMO_DIR", "demo"),
                   help="where the logs, per-topic output, state and the two config files go "
                        "(default ./demo, or $FLEETLOG_DEMO_DIR)")
    p.add_argument("--port-base", type=int, default=5555, metavar="PORT",
                   help="the aggregator's pull, xsub, xpub and control ports on 127.0.0.1 are PORT "
                        "to PORT+3 (default 5555, the built-in defaults aggregatorctl finds alone)")
    p.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an agent setting, as fleetlog-agent's --set (e.g. agent.log_level=debug, "
                        "agent.latency_budget_ms=200); applied after the demo's own, so it wins; "
                        "repeat for more")
    p.add_argument("--aggregator-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an aggregator setting, as fleetlog-aggregator's --set (e.g. "
                        "aggregator.format=json, aggregator.rotate_max_bytes=1000000); repeat for more")
    p.add_argument("--status-interval-s", type=float, default=5.0, metavar="S",
                   help="print aggregatorctl status every S seconds (default 5; 0: never)")
    return p.parse_args(argv)


def toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_configs(root: Path, base: int) -> tuple[Path, Path]:
    """The demo's two config files (so nothing under /etc/fleetlog is read), written afresh at
    each start: a starting point to copy, and what SIGHUP re-reads."""
    logs, out, state = root / "logs", root / "out", root / "state"
    ep = [f"tcp://127.0.0.1:{base + i}" for i in range(4)]
    aggregator = root / "aggregator.toml"
    aggregator.write_text(
        "# Written by make run (fleetlog/demo.py) at each start.\n[aggregator]\n"
        f"output_dir = {toml_str(out)}\nstate_dir = {toml_str(state / 'aggregator')}\n"
        f"pull = {toml_str(ep[0])}\nxsub = {toml_str(ep[1])}\nxpub = {toml_str(ep[2])}\n"
        f"control = {toml_str(ep[3])}\n")
    agent = root / "agent.toml"
    agent.write_text(
        "# Written by make run (fleetlog/demo.py) at each start.\n[agent]\nname = \"demo-node\"\n"
        f"state_dir = {toml_str(state / 'agent')}\ndata = {toml_str(ep[0])}\ncontrol = {toml_str(ep[3])}\n"
        f"\n[[sources]]\npaths = [{toml_str(logs / 'web.log')}]\ntopic = \"web\"\n"
        f"\n[[sources]]\npaths = [{toml_str(logs / 'app.log')}]\ntopic = \"app\"\n")
    return aggregator, agent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.dir).resolve()
    logs, out, state = root / "logs", root / "out", root / "state"
    for d in (logs, out, state):
        d.mkdir(parents=True, exist_ok=True)
    aggregator_toml, agent_toml = write_configs(root, args.port_base)
    py = sys.executable
    control = f"tcp://127.0.0.1:{args.port_base + 3}"
    aggregator = [py, "-m", "aggregator", "--config", str(aggregator_toml),
                  *(arg for item in args.aggregator_set for arg in ("--set", item))]
    agent = [py, "-m", "agent", "--config", str(agent_toml),
             *(arg for item in args.agent_set for arg in ("--set", item))]
    ctl = [py, "-m", "aggregator.ctl", "--control", control]
    print(f"fleetlog demo: logs in {logs}, per-topic output in {out}, configs {agent_toml} and "
          f"{aggregator_toml}; Ctrl-C to stop\n", flush=True)
    # Each in a session of its own: Ctrl-C reaches the whole foreground group, and a daemon that
    # got it beside the SIGTERM below took the second as "quit now" (the agent skipped its drain).
    procs = [subprocess.Popen(aggregator, start_new_session=True)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(agent, start_new_session=True))
    rng = random.Random(1)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    last_status = time.monotonic()
    try:
        while not stop and all(p.poll() is None for p in procs):
            write_some(logs, rng, rng.randint(5, 50))
            time.sleep(0.2)
            if args.status_interval_s > 0 and time.monotonic() - last_status > args.status_interval_s:
                last_status = time.monotonic()
                print(f"\n$ aggregatorctl --control {control} status", flush=True)
                subprocess.run([*ctl, "status"], timeout=10, check=False)
                print(f"\n$ tail -n 2 {out}/web/web.log", flush=True)
                subprocess.run(["tail", "-n", "2", str(out / "web" / "web.log")], check=False)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [(name, p.returncode) for name, p in zip(("aggregator", "agent"), procs, strict=False)
              if p.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if not stop and failed:
        for name, code in failed:
            print(f"fleetlog demo: the {name} exited with code {code} (its messages are above); "
                  "stopped", file=sys.stderr)
        return 1
    print("\nfleetlog demo stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
