"""The aggregator under load it does not control: a rotation boundary of many topics, a
subscriber that stops reading, a stop while a big file is being compressed. Real processes,
real sockets and files; each test ends with the system quiet again."""

from __future__ import annotations

import gzip
import hashlib
import os
import time
from pathlib import Path

from harness import Harness, wait_for


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
