"""A full disk at the aggregator: it stops acknowledging, keeps running, says so, and resumes
when space returns, losing nothing. Tested on a real filesystem that fills (a small tmpfs)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Harness, Writer, check_exactly_once, count_lines, mount_tmpfs, output_lines, wait_for


@pytest.fixture
def small_fs(short_tmp: Path) -> Iterator[Path]:
    mount = short_tmp / "out"
    mount_tmpfs(mount, "256k")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_stops_acks_and_resumes_without_loss(h: Harness, small_fs: Path) -> None:
    ep = h.endpoints()
    agg = h.aggregator(ep, "aggregator.commit_max_bytes=65536")
    writer = Writer({"a": h.path("logs", "a.log"), "b": h.path("logs", "b.log")},
                    lines_per_tick=50, tick_s=0.01, limit=6000).start()
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    status = wait_for(lambda: (s := h.status(ep))["disk_error"] and s, timeout=30, what="disk full noticed")
    assert "No space left" in status["disk_error"] or "ENOSPC" in status["disk_error"]
    assert "!! output not writable" in h.ctl(ep, "status").stdout
    wait_for(lambda: writer.total >= 12000, timeout=30, what="the writer to finish")
    time.sleep(1.5)
    assert agg.alive() and agent.alive()
    assert "ERROR" in agg.log() and "cannot write output" in agg.log()
    # The agent keeps the rest in the log files (its buffer) instead of dropping it.
    assert count_lines(small_fs / "app" / "app.log") < 12000
    r = subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: count_lines(small_fs / "app" / "app.log") >= 12000, timeout=60,
             what="all lines once space returned")
    assert h.status(ep)["disk_error"] is None
    time.sleep(0.5)
    check_exactly_once(output_lines(small_fs, "app"), writer.stop())
