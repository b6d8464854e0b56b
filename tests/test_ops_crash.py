"""A crash during rotation or compression loses and doubles nothing.

The aggregator journals a rotation's intent (name and committed size) before renaming, and
compresses through ``.gz.tmp`` + rename before removing the original; at start it finishes an
interrupted rotation and compresses what was left uncompressed. Checked against every line across
the active, rotated and compressed files.
"""

from __future__ import annotations

import gzip
import os
import random
import signal
import time

import pytest
from harness import (
    Harness,
    Writer,
    append_lines,
    check_exactly_once,
    count_lines,
    make_lines,
    output_lines,
    wait_for,
)

from aggregator.journal import Journal

ROTATE_SMALL = "aggregator.rotate_max_bytes=32768"


def rotated(h: Harness, topic: str = "app") -> list[str]:
    try:
        return sorted(n for n in os.listdir(h.path("out", topic)) if n != f"{topic}.log")
    except FileNotFoundError:
        return []


def rotations(h: Harness) -> set[str]:
    """Distinct rotated files, whatever stage of compression they are in."""
    return {n.split(".log")[0] for n in rotated(h)}




def test_aggregator_killed_around_rotations_under_load(h: Harness) -> None:
    rng = random.Random(7)
    ep = h.endpoints()
    agg = h.aggregator(ep, ROTATE_SMALL)
    writer = Writer({f"w{i}": h.path("logs", f"w{i}.log") for i in range(3)}, lines_per_tick=5,
                    tick_s=0.005).start()
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    for i in range(6):
        # Kill right after a rotation shows up (its compression is running), or at a random moment.
        before = len(rotations(h))
        wait_for(lambda b=before: len(rotations(h)) > b, what="a rotation")
        if i % 2:
            time.sleep(rng.uniform(0, 0.05))
        agg.kill9()
        agg = h.aggregator(ep, ROTATE_SMALL)
    counts = writer.stop()
    total = sum(counts.values())
    wait_for(lambda: h.all_acknowledged(), timeout=30, interval=0.2, what=f"{total} lines acknowledged")
    h.assert_quiet()
    # Read the files once they stand still; SIGTERM waits for running compressions.
    assert agg.stop(signal.SIGTERM) == 0
    check_exactly_once(output_lines(h.path("out"), "app", include_rotated=True), counts)
    assert len(rotations(h)) >= 6 and all(n.endswith(".log.gz") for n in rotated(h))
    assert not [n for n in os.listdir(h.path("out", "app")) if n.endswith(".tmp")]


@pytest.mark.parametrize("stage", ["intent_journaled", "renamed", "compressing"])
def test_interrupted_rotation_is_finished_at_start(h: Harness, stage: str) -> None:
    """The states a kill -9 can leave, made exactly: then the aggregator starts on them."""
    ep = h.endpoints()
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("a", 0, 500))
    agg = h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    active = h.path("out", "app", "app.log")
    wait_for(lambda: count_lines(active) == 500, what="lines")
    name = "app.20240101T000000Z.log"
    target = h.path("out", "app", name)
    if stage == "compressing":
        assert h.ctl(ep, "rotate").returncode == 0
        wait_for(lambda: rotated(h) and rotated(h)[0].endswith(".gz"), what="compressed")
    assert agg.stop() == 0

    if stage == "compressing":
        # Killed after the rename of the .gz but before the original was removed, while a second
        # compression had a temporary file half written.
        gz = h.path("out", "app", rotated(h)[0])
        original = gz.with_suffix("")
        original.write_bytes(gzip.decompress(gz.read_bytes()))
        gz.with_suffix(".gz.tmp").write_bytes(b"\x1f\x8b half a gzip")
    else:
        journal = Journal(str(h.path("agg")))
        size = journal.recover().topics["app"]
        assert size == active.stat().st_size
        journal.append({"app": size}, {}, rotations={"app": {"name": name, "size": size}})
        journal.close()
        if stage == "intent_journaled":
            append_lines(active, ["torn, never committed"])
        else:
            os.rename(active, target)
            append_lines(active, ["written after the rename, never committed"])

    agg = h.aggregator(ep)
    wait_for(lambda: all(n.endswith(".log.gz") for n in rotated(h)) and len(rotated(h)) == 1,
             what="one compressed rotated file")
    if stage != "compressing":
        assert rotated(h) == [name + ".gz"]
        assert "finished the rotation of app" in agg.log()
    append_lines(log, make_lines("a", 500, 100))
    wait_for(lambda: count_lines(active) == 100, what="new lines in the new active file")
    check_exactly_once(output_lines(h.path("out"), "app", include_rotated=True), {"a": 600})
    assert not [n for n in os.listdir(h.path("out", "app")) if n.endswith(".tmp")]
    assert agent.alive() and agg.alive()
