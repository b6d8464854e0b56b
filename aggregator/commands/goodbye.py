"""goodbye: an agent stopping cleanly says so, and shows as stopped at once (not 30 s later)."""

from __future__ import annotations

from typing import Any

HELP = "(agents) stopping cleanly: show as disconnected now and release its window"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    name = args.get("agent")
    if type(name) is not str:
        raise ValueError("agent must be a name")
    agg.say_goodbye(name, peer)
    return {}
