"""The control commands fleetlog-writer answers: the aggregator's own modules, those that make
sense without agents (``aggregatorctl --control <writer endpoint> status|ping|rotate|reload``)."""

from __future__ import annotations

from types import ModuleType

from aggregator.commands import ping, reload, rotate, status

COMMANDS: dict[str, ModuleType] = {
    "ping": ping,
    "reload": reload,
    "rotate": rotate,
    "status": status,
}
