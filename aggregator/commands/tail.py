"""tail: where to subscribe to see a topic's lines live (the XPUB endpoint)."""

from __future__ import annotations

from typing import Any

HELP = "the XPUB endpoint that publishes every accepted batch, topic frame first"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    # "curve": the XPUB endpoint requires CURVE, so that aggregatorctl can say so rather than
    # wait in silence when it has no keys (it may have reached us over the plain ipc:// socket).
    topic = args.get("topic")
    known = sorted(set(agg.topics) | set(agg.sink.topics_on_disk()))
    # "format": tail shows a raw_agent topic's lines after their agent's name, as its files do.
    return {"xpub": agg.cfg.xpub, "curve": bool(agg.guard.enabled),
            "format": agg.cfg.topic_format(topic) if isinstance(topic, str) else None,
            "known": topic in known if isinstance(topic, str) else None, "topics": known[:50],
            # sink = "jetstream": no files here, so no history (the writers' files have it).
            "sink": agg.cfg.sink}
