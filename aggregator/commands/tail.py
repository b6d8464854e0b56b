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
    return {"xpub": agg.cfg.xpub, "curve": bool(agg.guard.enabled),
            "known": topic in known if isinstance(topic, str) else None, "topics": known[:50]}
