"""reload: read the config file again and apply what can change while running."""

from __future__ import annotations

from typing import Any

HELP = "reload the configuration (a bad file is reported and the running config stays)"
ADMIN = True


async def run(agg: Any, args: dict[str, Any], peer: Any) -> dict[str, Any]:
    return await agg.reload()
