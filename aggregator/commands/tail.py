"""tail: where to subscribe to see a topic's lines live (the XPUB endpoint)."""

from __future__ import annotations

from typing import Any

HELP = "the XPUB endpoint that publishes every accepted batch, topic frame first"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    return {"xpub": agg.cfg.xpub}
