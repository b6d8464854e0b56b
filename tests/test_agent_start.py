"""An agent whose start fails closes what it opened and leaves its checkpoints alone (in-process)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from agent.config import parse
from agent.daemon import Agent
from agent.offsets import FILENAME


async def test_a_failed_start_closes_what_it_opened(short_tmp: Path) -> None:
    (short_tmp / "app.log").write_bytes(b"one\ntwo\n")
    with socket.socket() as taken:  # the metrics port: start-up fails there, after zmq is up
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = parse({
            "agent": {"name": "n1", "state_dir": str(short_tmp / "state"),
                      "data": f"ipc://{short_tmp}/pull.sock", "control": f"ipc://{short_tmp}/ctl.sock",
                      "metrics_listen": f"127.0.0.1:{taken.getsockname()[1]}"},
            "sources": [{"paths": [f"{short_tmp}/*.log"], "topic": "t"}]}, "<test>")
        agent = Agent(config)
        with pytest.raises(OSError, match="metrics_listen"):
            await asyncio.wait_for(agent.serve(), timeout=15)
    assert agent.ctx is not None and agent.ctx.closed
    assert agent.transport is not None and agent.status_server is not None
    assert not os.path.exists(short_tmp / "state" / FILENAME)
