"""The aggregator under load it does not control: a rotation boundary of many topics, a
subscriber that stops reading, a stop while a big file is being compressed. Real processes,
real sockets and files; each test ends with the system quiet again."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import Harness, append_lines, make_lines, wait_for


def _sha256(data_path: Path) -> str:
    digest = hashlib.sha256()
    with open(data_path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_sigterm_during_a_big_compression_exits_within_budget(h: Harness) -> None:
    # A rotated file left uncompressed (a crash, or compress turned on): the start-up scan
    # compresses it in the background. Random bytes: gzip takes seconds over them.
    topic_dir = h.path("out", "big")
    topic_dir.mkdir(parents=True)
    rotated = topic_dir / "big.20260101T000000Z.log"
    with open(rotated, "wb") as fh:
        for _ in range(192):
            fh.write(os.urandom(1 << 20))
    digest = _sha256(rotated)
    ep = h.endpoints()
    agg = h.aggregator(ep, "aggregator.shutdown_timeout_s=1")
    tmp = Path(f"{rotated}.gz.tmp")
    wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, timeout=30, what="the compression to start")
    started = time.monotonic()
    assert agg.stop(timeout=30) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"stopping took {elapsed:.1f}s with shutdown_timeout_s=1"
    assert "failed" not in agg.log().split("aggregator stopping", 1)[1]
    # The original is whole; the next start removes the temporary and compresses it again.
    assert _sha256(rotated) == digest
    h.aggregator(ep)
    done = Path(f"{rotated}.gz")
    wait_for(lambda: done.exists() and not rotated.exists(), timeout=120, what="the compression redone")
    assert not tmp.exists()
    assert hashlib.sha256(gzip.decompress(done.read_bytes())).hexdigest() == digest
    h.assert_quiet(ep)


def _vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Read a pipe until ``needle`` has come (bounded by ``timeout``)."""
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not come within {timeout}s"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 20)
            assert chunk, "the pipe closed"
            got = got[-len(needle):] + chunk
    return got


def test_stuck_subscriber_is_dropped_and_ingestion_goes_on(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "a.log")
    log.touch()
    agg = h.aggregator(ep, "aggregator.rotate_max_bytes=0")
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    h.status(ep)  # listening: aggregatorctl says at once when nothing listens
    # `aggregatorctl tail app | <something that stopped reading>`.
    with subprocess.Popen([sys.executable, "-m", "aggregator.ctl", "--control", ep.control, "tail", "app",
                           "--wait"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as tail:
        try:
            # Subscribed once it prints a line (subscriptions reach XPUB asynchronously).
            n = 0
            deadline = time.monotonic() + 20
            while True:
                append_lines(log, make_lines("w", n, 1))
                n += 1
                if select.select([tail.stdout], [], [], 0.2)[0]:
                    break
                assert time.monotonic() < deadline, "tail printed nothing"
            assert tail.stdout is not None
            _read_until(tail.stdout.fileno(), b"\n", 5)
            # Now it stops reading, and 192 MiB of lines arrive.
            before = _vm_hwm_mib(agg.pid)
            with open(log, "ab") as fh:
                for chunk in range(48):
                    fh.write(("\n".join(make_lines("a", chunk * 20_000, 20_000, width=190)) + "\n").encode())
            out = h.path("out", "app", "app.log")
            size = log.stat().st_size
            wait_for(lambda: out.stat().st_size == size, timeout=120, what="every line written")
            agg_mib, tail_mib = _vm_hwm_mib(agg.pid), _vm_hwm_mib(tail.pid)
            print(f"aggregator VmHWM {before:.0f} -> {agg_mib:.0f} MiB, tail {tail_mib:.0f} MiB")
            assert tail.poll() is None
            # Read again: what was queued comes, then the gap, and tail says so and exits.
            reader = threading.Thread(target=lambda: tail.stdout.read() if tail.stdout else None, daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while tail.poll() is None:
                append_lines(log, make_lines("z", n, 1))  # the batch after the gap
                n += 1
                assert time.monotonic() < deadline, "tail never noticed it fell behind"
                time.sleep(0.2)
            assert tail.returncode == 4
            assert tail.stderr is not None and b"tail fell behind" in tail.stderr.read()
        finally:
            if tail.poll() is None:
                tail.kill()
    # (Its own ingestion of the backlog takes some 30-45 MiB; the subscriber at most 16 MiB.)
    assert agg_mib < before + 64, f"the aggregator grew from {before:.0f} to {agg_mib:.0f} MiB"
    assert tail_mib < 96, f"tail peaked at {tail_mib:.0f} MiB"
    h.assert_quiet(ep)


def test_a_big_batch_is_published_in_bounded_contiguous_parts() -> None:
    from aggregator.proxy import _parts
    from fleetlog import wire

    lines = [f"line {i} " + "é" * (i % 300) for i in range(3000)] + ["x" * 5000]
    text = "".join(line + "\n" for line in lines)
    size = len(text.encode())
    for body in (text, lines):  # version 2 (one string) and version 1 (a list)
        batch = wire.Batch(topic="t", agent="a", stream="s", base=0, path="/p", file="f", seq=3,
                           start=1000, end=1000 + size, lines=body)
        parts = list(_parts(batch, 4096))
        assert [x for p in parts for x in p.line_list()] == lines
        assert parts[0].start == 1000 and parts[-1].end == 1000 + size
        assert all(a.end == b.start for a, b in itertools.pairwise(parts))
        # At most 4096 bytes of lines each, but a longer line goes whole, alone.
        assert all(sum(len(x.encode()) + 1 for x in p.line_list()) <= 4096 or len(p.line_list()) == 1
                   for p in parts)
