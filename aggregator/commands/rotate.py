"""rotate [TOPIC]: roll a topic's active file over now (all topics without TOPIC)."""

from __future__ import annotations

import os
from typing import Any

from aggregator.files import SinkError
from fleetlog import wire

HELP = "roll the active file of TOPIC (or of every topic) over now"
ADMIN = True


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    topic = args.get("topic")
    if topic is not None and (type(topic) is not str or not wire.valid_topic(topic)):
        raise ValueError(f"not a topic name: {topic!r}")
    if topic is not None and topic not in agg.topics and topic not in agg.sink.files \
            and not os.path.isdir(os.path.join(agg.cfg.output_dir, topic)):
        raise ValueError(f"no such topic: {topic}")
    try:
        return {"rotated": await agg.rotate_now(topic)}
    except SinkError as exc:
        agg.on_disk_error(exc)
        raise ValueError(f"rotation failed: {exc}") from None
    except OSError as exc:
        raise ValueError(f"rotation failed: {exc}") from None
