"""status: agents, topics, totals and disk, as one JSON object."""

from __future__ import annotations

from typing import Any

HELP = "agents (last seen, lag), topics (lines, bytes, rates), totals, free disk"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    return agg.status()
