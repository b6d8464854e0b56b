"""heartbeat: an agent is alive; it reports its lag (bytes not yet shipped) and file count."""

from __future__ import annotations

from typing import Any

HELP = "(agents) keep-alive with lag and file count; the reply carries the instance id"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    info = agg.touch_agent(args, peer)
    return agg.replies(info, {"instance": agg.instance})
