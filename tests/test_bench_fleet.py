"""Smoke test of ``make bench-fleet``: a small fleet runs end to end against the real aggregator
and its exactly-once check passes. Nothing about speed or the run's validity is asserted (the
machine running the tests is shared; benchmarks measure, tests never do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_fleet(tmp_path: Path, *extra: str, duration_s: float = 3) -> dict:
    out = tmp_path / "fleet.json"
    r = subprocess.run([sys.executable, "-m", "bench.fleet", "--procs", "2", "--duration-s", str(duration_s),
                        "--warmup-s", "1", "--status-every-s", "1", "--settle-s", "60", "--json", str(out),
                        *extra], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: ok" in r.stdout and "measurement: " in r.stdout, r.stdout
    return orjson.loads(out.read_bytes())


@pytest.mark.timeout(300)
def test_bench_fleet_twenty_agents_every_line_once_with_cpu_of_both_sides(tmp_path: Path) -> None:
    r = run_fleet(tmp_path, "--agents", "20")
    v = r["verify"]
    assert v["lines"] == r["generated"] > 0 and v["missing"] == v["duplicated"] == 0, v
    assert r["sim_period_ms"] == pytest.approx(50.0)  # 100 lines/s at the agent's 40 ms budget
    assert r["stats"]["messages"] == r["stats"]["batches"] > 0  # one file: one batch a message
    assert r["sim_cpu_per_s"] > 0 and r["machine_busy_cores"] > 0
    assert isinstance(r["invalid"], list)


@pytest.mark.timeout(300)
def test_bench_fleet_agents_with_several_files_send_one_message_per_topic(tmp_path: Path) -> None:
    # 3 files over 2 topics: two of each agent's batches share a topic, one wire v3 message.
    r = run_fleet(tmp_path, "--agents", "10", "--files", "3", "--topics", "2")
    v = r["verify"]
    assert v["lines"] == r["generated"] > 0 and v["missing"] == v["duplicated"] == 0, v
    assert r["stats"]["batches"] > r["stats"]["messages"] > 0, r["stats"]


@pytest.mark.timeout(300)
def test_bench_fleet_aggregator_restarted_under_load_agents_resend_and_every_line_arrives_once(
        tmp_path: Path) -> None:
    # After the restart every agent says hello again and ships what was not acknowledged: batches
    # sent again are encoded then (with their new seq), not taken from the ones made up front.
    r = run_fleet(tmp_path, "--agents", "10", "--restart-at-s", "3", duration_s=6)
    v = r["verify"]
    assert v["lines"] == r["generated"] > 0 and v["missing"] == v["duplicated"] == v["out_of_order"] == 0, v
    assert r["stats"]["restarts_seen"] == 10, r["stats"]
    assert r["restart"] is not None
