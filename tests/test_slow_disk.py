"""A slow disk (an fsync that takes seconds, as on a disk other writers keep busy) slows the
writes that need it and nothing else: the agent's and the aggregator's event loops never wait
for one, so lines go on being read, shipped, received and acknowledged.

The disk is made slow with strace's fault injection (``-e inject=fsync:delay_enter=...``) on
the daemon's main thread only (strace without ``-f`` stops the thread whose id is the process
id: the event loop's), so the fsyncs the daemons do in their threads keep their speed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Harness, append_lines, check_exactly_once, count_lines, make_lines, output_lines, wait_for

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="strace is not installed (`make system-deps`)")

DELAY_US = 3_000_000  # each fsync of the main thread takes 3 s longer (a save: 6 s)


def slow_fsyncs_of_the_main_thread(pid: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-e", "trace=fsync,fdatasync",
                             "-e", f"inject=fsync,fdatasync:delay_enter={DELAY_US}", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def lines_while_slow(pid: int, log: Path, saved: Path, arrived: Callable[[int], bool],
                     timeout_s: float) -> int:
    """With every fsync of ``pid``'s main thread slowed, append a line to ``log`` and wait
    (``timeout_s`` at most) until ``arrived(n)`` for its count n, again and again until ``saved``
    is written anew (a save made while the disk was slow is done). Returns the lines appended."""
    before = saved.stat().st_mtime_ns
    slow = slow_fsyncs_of_the_main_thread(pid)
    try:
        n = 0
        deadline = time.monotonic() + 30
        while saved.stat().st_mtime_ns == before:
            assert time.monotonic() < deadline, f"{saved.name} not saved within 30 s"
            assert slow.poll() is None, "strace could not attach (ptrace not permitted?)"
            append_lines(log, make_lines("late", n, 1))
            n += 1
            wait_for(lambda n=n: arrived(n), timeout=timeout_s,  # type: ignore[misc]
                     what=f"line {n} while the disk is slow")
    finally:
        slow.terminate()
        slow.wait(timeout=10)
    return n


def test_a_slow_state_disk_does_not_stop_the_agent_from_shipping(h: Harness) -> None:
    """The agent saves its checkpoints once a second (two fsyncs): on its event loop a slow disk
    stopped its reading and shipping for as long as they took (6 s here) at every save. The
    checkpoint store's thread writes them now, in order: with every fsync of the event loop's
    thread slowed, each new line still arrives at once while the checkpoints are saved."""
    ep = h.endpoints()
    h.aggregator(ep)
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("a", 0, 10))
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    out = h.path("out", "app", "app.log")
    wait_for(lambda: count_lines(out) >= 10, what="the first lines")
    assert agent.state_dir is not None
    # On the old code a line waited for the save in progress: 6 s.
    n = lines_while_slow(agent.pid, log, agent.state_dir / "checkpoints.json",
                         lambda n: count_lines(out) >= 10 + n, timeout_s=3)
    wait_for(lambda: h.all_acknowledged(), what="every line acknowledged")
    check_exactly_once(output_lines(h.path("out"), "app"), {"a": 10, "late": n})

def test_a_slow_state_disk_does_not_stop_the_aggregators_loop(h: Harness) -> None:
    """Every fsync of the aggregator's main thread made 3 s slow (strace's fault injection, as a
    disk kept busy by other writers does): its loop goes on receiving and acknowledging (the
    registry it saves every 10 s is written in a thread, like the commits; on the loop thread
    its two fsyncs stopped everything for as long as the disk took)."""
    ep = h.endpoints()
    agg = h.aggregator(ep)
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("a", 0, 10))
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    wait_for(lambda: (s := h.agent_status()) is not None and s["lines_shipped"] == 10,
             what="10 lines acknowledged")
    registry = h.path("agg", "registry.json")
    wait_for(registry.exists, what="the first registry save")
    n = lines_while_slow(agg.pid, log, registry,
                         lambda n: (s := h.agent_status()) is not None and s["lines_shipped"] == 10 + n,
                         timeout_s=8)
    stall_ms = h.status(ep)["loop"]["stall_recent_ms"]
    assert stall_ms < 2000, f"the loop stood still {stall_ms} ms"  # 6,000 on the old code
    check_exactly_once(output_lines(h.path("out"), "app"), {"a": 10, "late": n})
