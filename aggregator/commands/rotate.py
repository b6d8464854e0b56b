"""rotate [TOPIC]: roll a topic's active file over now (all topics without TOPIC)."""

from __future__ import annotations

from typing import Any

from fleetlog import wire

HELP = "roll the active file of TOPIC (or of every topic) over now"
ADMIN = True


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    topic = args.get("topic")
    if topic is not None and (type(topic) is not str or not wire.valid_topic(topic)):
        raise ValueError(f"not a topic name: {topic!r}")
    if topic is not None and topic not in agg.topics and topic not in agg.sink.files:
        raise ValueError(f"no such topic: {topic}")
    return {"rotated": await agg.rotate_now(topic)}
