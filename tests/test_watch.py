"""agent.watch.Watcher on its own (no rescan behind it): real inotify, a real thread, a real loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import AgentConfig, SourceConfig
from agent.inotify import RESCAN
from agent.watch import IDLE_AFTER_MS, Watcher


async def _next_change(changes: asyncio.Queue[set[str]], timeout: float = 5.0) -> set[str]:
    return await asyncio.wait_for(changes.get(), timeout)


async def _reported_after_quiet(log: Path, changes: asyncio.Queue[set[str]]) -> None:
    """What was reported before is dropped; a write now is reported."""
    while not changes.empty():
        changes.get_nowait()
    with log.open("ab") as fh:
        fh.write(b"after a quiet spell\n")
    assert str(log) in await _next_change(changes)


async def test_changes_are_reported_while_busy_and_after_a_quiet_spell(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    watcher = Watcher((SourceConfig(paths=(f"{tmp_path}/*.log",), topic="t"),), changes.put_nowait,
                      AgentConfig(name="w"))
    watcher.refresh()
    try:
        await asyncio.sleep(0.1)  # inotify watches in place
        with log.open("ab") as fh:
            fh.write(b"busy\n")
        assert str(log) in await _next_change(changes)
        # Quiet for longer than IDLE_AFTER_MS: the watcher now steps watch_idle_step_ms, and a
        # change is still reported (events were collected all along).
        await asyncio.sleep(IDLE_AFTER_MS / 1000 + 0.5)
        await _reported_after_quiet(log, changes)
    finally:
        watcher.stop()


async def test_inotify_reports_files_in_new_subdirectories_when_recursive(tmp_path: Path) -> None:
    """The loop's own inotify (no thread): a directory created under a recursive root is
    watched as it appears, and a new directory also asks for a rescan."""
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    watcher = Watcher((SourceConfig(paths=(f"{tmp_path}/**/*.log",), topic="t"),), changes.put_nowait,
                      AgentConfig(name="w", latency_budget_ms=10))
    watcher.refresh()
    try:
        assert watcher.reports_every_change
        sub = tmp_path / "a" / "b"
        sub.mkdir(parents=True)
        assert RESCAN in await _next_change(changes)
        await asyncio.sleep(0.1)  # the new directories' watches in place
        log = sub / "x.log"
        log.write_bytes(b"deep\n")
        seen: set[str] = set()
        while str(log) not in seen:
            seen |= await _next_change(changes)
    finally:
        watcher.stop()


def test_a_busy_node_waits_less_after_a_change_than_a_typical_one(tmp_path: Path) -> None:
    """The latency budget is the wait on a typical node (500 lines/s: each wake-up saved is CPU
    saved); at 20,000 lines/s the wait shrinks (its cycles are large anyway), to an eighth at most."""
    cfg = AgentConfig(name="w", latency_budget_ms=40)
    watcher = Watcher((SourceConfig(paths=(f"{tmp_path}/*.log",), topic="t"),), lambda _: None, cfg)
    assert watcher.pace(0) == 0.040
    assert watcher.pace(500 * 100) == 0.040
    assert 0.005 < watcher.pace(20_000 * 100) < 0.040
    assert watcher.pace(1e9) == 0.005


async def test_inotify_reads_on_a_timer_while_busy_and_waits_for_events_once_quiet(tmp_path: Path) -> None:
    """While changes keep coming, each read of the events schedules the next one a budget later
    (no wake-up per change); the first read that finds nothing puts the descriptor back in the
    loop, so a change after a quiet spell is still reported, and a quiet watcher does nothing."""
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    watcher = Watcher((SourceConfig(paths=(f"{tmp_path}/*.log",), topic="t"),), changes.put_nowait,
                      AgentConfig(name="w", latency_budget_ms=20))
    watcher.refresh()
    inotify = watcher._inotify
    assert inotify is not None
    loop = asyncio.get_running_loop()
    try:
        with log.open("ab") as fh:
            for i in range(10):  # busy: a change every 10 ms for 100 ms
                fh.write(b"busy %d\n" % i)
                fh.flush()
                await asyncio.sleep(0.01)
            assert str(log) in await _next_change(changes)
        # Quiet: one read finds nothing and waits for events again (the descriptor back in
        # the loop: removing it again says it was there), with no read scheduled.
        deadline = loop.time() + 5
        while inotify._pending is not None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert inotify._pending is None
        assert loop.remove_reader(inotify.fd)
        loop.add_reader(inotify.fd, inotify._readable)
        await _reported_after_quiet(log, changes)
    finally:
        watcher.stop()


async def test_a_renamed_directory_reports_its_files_under_the_new_name(tmp_path: Path) -> None:
    """Recursive watching: a directory renamed keeps its watch descriptor (the kernel watches
    the inode) and is watched again under its new name; the names its events report then lead
    there, not to where the directory was (the watcher remembers names per descriptor)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "x.log").write_bytes(b"")
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    watcher = Watcher((SourceConfig(paths=(f"{tmp_path}/**/*.log",), topic="t"),), changes.put_nowait,
                      AgentConfig(name="w", latency_budget_ms=10))
    watcher.refresh()
    try:
        with (old / "x.log").open("ab") as fh:
            fh.write(b"before\n")
        seen: set[str] = set()
        while str(old / "x.log") not in seen:
            seen |= await _next_change(changes)
        old.rename(new)
        assert RESCAN in await _next_change(changes)
        await asyncio.sleep(0.1)  # watched again under its new name
        while not changes.empty():
            changes.get_nowait()
        with (new / "x.log").open("ab") as fh:
            fh.write(b"after\n")
        seen = set()
        while str(new / "x.log") not in seen:
            seen |= await _next_change(changes)
        assert str(old / "x.log") not in seen
    finally:
        watcher.stop()
