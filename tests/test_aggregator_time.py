"""The aggregator's wall clock stepped, both ways, under a real process (Debian's libfaketime).

libfaketime is preloaded into the aggregator only and reads the offset from a file that the test
rewrites, so the clock of a running process steps (within FAKETIME_CACHE_DURATION, 1 s). The
monotonic clock is left alone, as the kernel leaves it when the wall clock is stepped. The agent
runs on the real clock.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest
from harness import (
    Endpoints,
    Harness,
    Proc,
    append_lines,
    check_exactly_once,
    count_lines,
    make_lines,
    output_lines,
    wait_for,
)

YEAR_S = 365 * 86400


class SteppedClock:
    """The offset of the aggregator's wall clock from the real one, changed at run time."""

    def __init__(self, path: Path, library: str) -> None:
        self.path = path
        self.library = library
        self.offset_s = 0

    def set(self, offset_s: float) -> None:
        self.offset_s = int(offset_s)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset_s:+d}\n")
        os.rename(tmp, self.path)  # never read half-written

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": self.library, "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture
def clock(h: Harness) -> SteppedClock:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") or
                   glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not found:
        pytest.skip("libfaketime is not installed (Debian: apt-get install faketime; `make system-deps`)")
    c = SteppedClock(h.path("faketime"), found[0])
    c.set(0)
    return c


def start(h: Harness, clock: SteppedClock, *settings: str) -> tuple[Endpoints, Proc, Path]:
    ep = h.endpoints()
    agg = h.aggregator(ep, "aggregator.compress=none", *settings, env=clock.env())
    log = h.path("logs", "a.log")
    log.touch()
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    return ep, agg, log


def rotated(h: Harness) -> list[str]:
    return sorted(n for n in os.listdir(h.path("out", "app")) if n != "app.log")


def write(h: Harness, log: Path, first: int, count: int) -> None:
    append_lines(log, make_lines("a", first, count))
    wait_for(lambda: count_lines(h.path("out", "app", "app.log")) == count, what=f"lines {first}..")


def stepped(agg: Proc, direction: str, times: int = 1) -> bool:
    return agg.log().count(f"the wall clock was stepped {direction}") >= times


def test_clock_stepped_back_retention_keeps_the_newest(h: Harness, clock: SteppedClock) -> None:
    clock.set(YEAR_S)  # a clock a year ahead (a bad RTC, NTP not yet synchronised)
    ep, agg, log = start(h, clock, "aggregator.retain_files=1")
    write(h, log, 0, 10)
    assert h.ctl(ep, "rotate", "app").returncode == 0
    stale = rotated(h)
    assert len(stale) == 1 and stale[0] > f"app.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    clock.set(0)  # NTP steps it back
    wait_for(lambda: stepped(agg, "back"), what="the aggregator to see the step")
    for first in (10, 20):
        append_lines(log, make_lines("a", first, 10))
        wait_for(lambda f=first: make_lines("a", f, 10)[-1] in output_lines(h.path("out"), "app", True),
                 what=f"lines {first}..")
        # (The first file after the step may already have rolled over by itself: it was
        # started "next year", in another period than the clock's.)
        assert h.ctl(ep, "rotate", "app").returncode == 0
        # Retention keeps the newest rotation, whatever the clock said when each was named.
        wait_for(lambda f=first: len(rotated(h)) == 1 and output_lines(h.path("out"), "app", True)
                 == make_lines("a", f, 10), what=f"retention to keep only the rotation of {first}..")
    assert output_lines(h.path("out"), "app", include_rotated=True) == make_lines("a", 20, 10)
    assert "behind the newest rotated file" in agg.log()
    h.assert_quiet(ep)


def test_clock_stepped_forward_and_back_rotation_goes_on(h: Harness, clock: SteppedClock) -> None:
    # Hourly rotation, and the clock half-way through an hour (nowhere near a boundary).
    now = time.time()
    clock.set(int(now // 3600) * 3600 + 1800 - now)
    ep, agg, log = start(h, clock, "aggregator.rotate_interval_s=3600", "aggregator.rotate_max_bytes=0",
                         "aggregator.retain_files=0")
    write(h, log, 0, 5)
    assert rotated(h) == []
    clock.set(clock.offset_s + 86400)  # a day ahead: the hour is over, the file rolls over
    wait_for(lambda: stepped(agg, "forward"), what="the aggregator to see the step forward")
    wait_for(lambda: len(rotated(h)) == 1, what="the rotation after the step forward")
    write(h, log, 5, 5)
    clock.set(clock.offset_s - 86400)  # and back: the file started "tomorrow" rolls over too
    wait_for(lambda: stepped(agg, "back"), what="the aggregator to see the step back")
    wait_for(lambda: len(rotated(h)) == 2, what="the rotation after the step back")
    write(h, log, 10, 5)
    # Rotation goes on at the next boundary of the stepped-back clock (3 s ahead of it).
    fake_now = time.time() + clock.offset_s
    clock.set(clock.offset_s + (int(fake_now // 3600) + 1) * 3600 - 3 - fake_now)
    wait_for(lambda: len(rotated(h)) == 3, timeout=30, what="the rotation at the next hour")
    write(h, log, 15, 5)
    # Rotated names sort in rotation order, so the output reads in the order the lines came.
    check_exactly_once(output_lines(h.path("out"), "app", include_rotated=True), {"a": 20})
    assert not agg.log().count("Traceback")
    h.assert_quiet(ep)


def test_clock_stepped_forward_retention_by_age_keeps_the_files(h: Harness, clock: SteppedClock) -> None:
    ep, agg, log = start(h, clock, "aggregator.retain_days=1", "aggregator.retain_files=0")
    write(h, log, 0, 5)
    assert h.ctl(ep, "rotate", "app").returncode == 0
    clock.set(30 * 86400)  # a month ahead: every file would seem older than retain_days
    wait_for(lambda: stepped(agg, "forward"), what="the aggregator to see the step")
    write(h, log, 5, 5)
    assert h.ctl(ep, "rotate", "app").returncode == 0
    wait_for(lambda: agg.log().count("retention pass over") >= 2, what="retention after both rotations")
    assert len(rotated(h)) == 2 and "retention removed" not in agg.log()
    check_exactly_once(output_lines(h.path("out"), "app", include_rotated=True), {"a": 10})
    h.assert_quiet(ep)
