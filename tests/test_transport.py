"""The agent's transport on its own, with real ZeroMQ sockets on the loop: how it reads the
control channel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from agent.config import AgentConfig
from agent.transport import Transport
from fleetlog import wire


async def test_a_reply_that_arrives_just_before_a_request_goes_out_is_still_read(tmp_path: Path) -> None:
    """The agent watches its control socket's descriptor itself (no pyzmq future per message).
    ZeroMQ signals that descriptor once per change of state, and a send takes that signal in:
    a message that arrived while the loop was busy, followed by a request from the same busy
    stretch, left the descriptor quiet and the message unread (an agent that had just moved
    to another aggregator heard nothing from it). After every request the receiver looks again."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    events: list[dict[str, Any]] = []
    cfg = AgentConfig(name="t", state_dir=str(tmp_path), data="tcp://127.0.0.1:1",
                      control=f"tcp://127.0.0.1:{port}")
    transport = Transport(ctx, cfg, events.append, lambda result, restarted: None, lambda window: None,
                          dict, dict)
    transport.connect()
    receiving = asyncio.create_task(transport.receive_loop())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while transport.request("heartbeat", {}) is None:  # connected once a request goes
            assert loop.time() < deadline, "the control socket never connected"
            await asyncio.sleep(0.02)
        peer, _ = await asyncio.wait_for(router.recv_multipart(), 10)
        await asyncio.sleep(0.1)  # the receiver waits on the descriptor
        for n in range(5):
            await router.send_multipart([peer, wire.encode_event("ack", streams={"s": n})])
            # The loop busy meanwhile (no await): the ack reaches the agent's socket, then a
            # request goes out from the same stretch of work.
            time.sleep(0.1)
            assert transport.request("heartbeat", {}) is not None
            while len(events) <= n:
                assert loop.time() < deadline + 5 * (n + 1), f"ack {n} not read"
                await asyncio.sleep(0.01)
        assert [e["streams"]["s"] for e in events] == list(range(5))
    finally:
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        transport.close()
        router.close(linger=0)
        ctx.term()
