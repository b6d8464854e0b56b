"""Smoke test of ``make bench-jetstream``: its quick mode runs end to end and its exactly-once check
passes. Nothing about speed is asserted (benchmarks measure it; tests never do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from natsserver import server_binary

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(server_binary() is None,
                    reason="nats-server not installed (make .venv/.installed installs the pinned one)")
def test_bench_jetstream_quick_backlog_through_two_aggregators_and_writer_is_exactly_once() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.jetstream", "--quick", "--only", "r1",
                        "--workloads", "backlog"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backlog JetStream R1:" in r.stdout and "backlog ok" in r.stdout, r.stdout
    assert "agents whose first choice is each aggregator: [1, 1]" in r.stdout, r.stdout
