"""hello: an agent introduces itself; the reply tells it where each of its streams stands."""

from __future__ import annotations

from typing import Any

from aggregator.journal import stream_key
from fleetlog import wire

HELP = "(agents) register, and learn the committed offset of each of the agent's streams"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    info = agg.touch_agent(args, peer)
    streams = args.get("streams", [])
    if not isinstance(streams, list):
        raise ValueError("streams must be a list")
    committed = {}
    for stream in streams[:100_000]:
        if isinstance(stream, str):
            durable = agg.journal.state.streams.get(stream_key(info.name, stream))
            if durable is not None:
                committed[stream] = int(durable[0])
    return agg.replies(info, {"instance": agg.instance, "committed": committed, "wire": list(wire.READS),
                              "max_message_bytes": agg.cfg.max_message_bytes})
