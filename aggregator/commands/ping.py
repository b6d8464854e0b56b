"""ping: is the aggregator there, and which instance is it."""

from __future__ import annotations

from typing import Any

from fleetlog import __version__

HELP = "answer with the aggregator's instance id and version"
ADMIN = False


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    return {"instance": agg.instance, "version": __version__}
