"""fleetlog.runtime: Wakeup, the event both daemons' hot loops wait on, on a real event loop; the
helper threads' scheduling policy, on real threads."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest
import zmq

from fleetlog.runtime import Wakeup, background_thread, start_zmq_threads

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


async def test_a_wakeup_set_before_the_wait_returns_at_once() -> None:
    w = Wakeup()
    w.set()
    assert await asyncio.wait_for(w.wait(60), timeout=1) is True


async def test_a_wait_ends_false_when_its_timeout_passes() -> None:
    w = Wakeup()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await w.wait(0.05) is False
    assert loop.time() - started >= 0.04


async def test_set_from_a_callback_wakes_the_waiter_and_clear_rearms_it() -> None:
    w = Wakeup()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, w.set)
    assert await asyncio.wait_for(w.wait(60), timeout=5) is True
    assert await w.wait(60) is True  # still set: a set is not lost between two waits
    w.clear()
    assert await w.wait(0.01) is False


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    w = Wakeup()
    task = asyncio.create_task(w.wait(60))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    w.set()  # must not touch the cancelled waiter
    assert await w.wait(0) is True


def _policies() -> dict[str, int]:
    """This process's threads, ``name/tid`` -> scheduling policy."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as fh:
            out[f"{fh.read().strip()}/{tid}"] = os.sched_getscheduler(int(tid))
    return out


@linux_only
def test_zmq_threads_start_as_sched_batch_and_the_caller_keeps_its_policy() -> None:
    before = set(_policies())
    ctx = zmq.Context()
    try:
        start_zmq_threads(ctx)
        # A new thread names itself a moment after it starts: wait for the I/O thread's name.
        deadline = time.monotonic() + 5
        while True:
            new = {k: v for k, v in _policies().items() if k not in before}
            if any(k.startswith("ZMQbg/IO") for k in new) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert any(k.startswith("ZMQbg/IO") for k in new), new
        assert all(v == os.SCHED_BATCH for v in new.values()), new
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        ctx.term()


@linux_only
def test_a_background_thread_and_the_threads_it_starts_are_sched_batch() -> None:
    seen: dict[str, int] = {}

    def helper() -> None:
        background_thread()
        seen["helper"] = os.sched_getscheduler(0)
        child = threading.Thread(target=lambda: seen.setdefault("child", os.sched_getscheduler(0)))
        child.start()
        child.join()

    t = threading.Thread(target=helper)
    t.start()
    t.join(timeout=10)
    assert seen == {"helper": os.SCHED_BATCH, "child": os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
