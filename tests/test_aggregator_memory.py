"""The aggregator's memory after its event loop fell behind a fleet (issue 18 item 5).

Messages waiting in ZeroMQ's receive queues hold its receive buffers (8 KiB each for a small
message that came in a read of its own, as an agent's 50 ms read cycle sends them), so a loop
that falls behind for a second with 1,000 agents queues 20,000 of them. Once they are taken the
memory is free, but glibc keeps the pages: without a trim the RSS stays at the backlog's peak.
"""

from __future__ import annotations

import os
import signal

import zmq
from harness import Harness, ask, output_lines, wait_for

from fleetlog import wire

SOCKETS = 100
BATCHES = 300  # per socket, 5 lines each (an agent's read cycle at 100 lines/s)
LINES = 5


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _batch(i: int, b: int) -> list[bytes]:
    text = "".join(f"s{i:03d}-{b:04d}-{n} " + "x" * 112 + "\n" for n in range(LINES))  # 125 bytes a line
    start = (b - 1) * len(text)
    return wire.batch_frames(b"app", f"mem{i}", f"st{i}", 0, f"/var/log/m{i}.log", f"f{i}", b, start,
                             start + len(text), text)


def test_aggregator_gives_back_the_memory_of_a_receive_backlog_once_taken(h: Harness) -> None:
    ep = h.endpoints(tcp=True)
    agg = h.aggregator(ep)

    def taken() -> int:
        status = ask(ep.control, "status", timeout_s=5)
        return -1 if status is None else int(status["totals"]["batches"])

    wait_for(lambda: taken() >= 0, what="the aggregator answering")
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(SOCKETS):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDHWM, BATCHES + 10)
            push.connect(ep.pull)
            socks.append(push)
        # Connected (their handshakes need the aggregator's I/O thread) before it is paused.
        for i, push in enumerate(socks):
            push.send_multipart(_batch(i, 1))
        wait_for(lambda: taken() == SOCKETS, what="each socket's first batch")
        base_kib = _status_kib(agg.pid, "VmRSS")
        # Paused, as a loop that falls behind: what the agents send meanwhile waits, and is
        # read into ZeroMQ's queues at once when the process runs again.
        os.kill(agg.pid, signal.SIGSTOP)
        try:
            for b in range(2, BATCHES + 1):
                for i, push in enumerate(socks):
                    push.send_multipart(_batch(i, b), zmq.NOBLOCK)
        finally:
            os.kill(agg.pid, signal.SIGCONT)
        total = SOCKETS * BATCHES
        wait_for(lambda: taken() == total, timeout=120,
                 what=f"all {total} batches taken")
        peak_kib = _status_kib(agg.pid, "VmHWM")
        grown_kib = peak_kib - base_kib
        # Otherwise this test shows nothing (the backlog was taken as fast as it came).
        assert grown_kib > 20 * 1024, f"the backlog cost only {grown_kib} KiB"
        # Given back within a trim or two (every 10 s), not held at the peak.
        wait_for(lambda: _status_kib(agg.pid, "VmRSS") < base_kib + grown_kib // 2, timeout=40,
                 what=f"RSS back from its peak ({base_kib} KiB before, {peak_kib} at the peak)")
    finally:
        for push in socks:
            push.close()
        ctx.term()
    lines = output_lines(h.path("out"), "app")
    assert len(lines) == total * LINES and len(set(lines)) == len(lines)
