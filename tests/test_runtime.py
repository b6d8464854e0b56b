"""fleetlog.runtime.Wakeup, the event both daemons' hot loops wait on, on a real event loop."""

from __future__ import annotations

import asyncio

from fleetlog.runtime import Wakeup


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
