"""``make run``: an aggregator, an agent and a small log writer on loopback, to watch lines flow.

Everything lives under ``./demo`` (logs, output, state); the daemons use their built-in
defaults (tcp://127.0.0.1:5555-5558), so ``aggregatorctl status`` in another terminal works
with no flags. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("FLEETLOG_DEMO_DIR", "demo")).resolve()
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


def main() -> int:
    logs, out, state = ROOT / "logs", ROOT / "out", ROOT / "state"
    for d in (logs, out, state):
        d.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    aggregator = [py, "-m", "aggregator", "--set", f"aggregator.output_dir={out}",
                  "--set", f"aggregator.state_dir={state / 'aggregator'}"]
    agent = [py, "-m", "agent", "--set", f"agent.state_dir={state / 'agent'}",
             "--set", "agent.name=demo-node",
             "--set", f'sources=[{{paths=["{logs}/web.log"], topic="web"}}, '
                      f'{{paths=["{logs}/app.log"], topic="app"}}]']
    print(f"fleetlog demo: logs in {logs}, per-topic output in {out}; Ctrl-C to stop\n")
    procs = [subprocess.Popen(aggregator)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(agent))
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
            if time.monotonic() - last_status > 5:
                last_status = time.monotonic()
                print("\n$ aggregatorctl status", flush=True)
                subprocess.run([py, "-m", "aggregator.ctl", "status"], timeout=10, check=False)
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
    print("\nfleetlog demo stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
