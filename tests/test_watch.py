"""agent.watch.Watcher on its own (no rescan behind it): real inotify, a real thread, a real loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import AgentConfig, SourceConfig
from agent.watch import IDLE_AFTER_MS, Watcher


async def _next_change(changes: asyncio.Queue[set[str]], timeout: float = 5.0) -> set[str]:
    return await asyncio.wait_for(changes.get(), timeout)


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
        while not changes.empty():
            changes.get_nowait()
        with log.open("ab") as fh:
            fh.write(b"after a quiet spell\n")
        assert str(log) in await _next_change(changes)
    finally:
        watcher.stop()
