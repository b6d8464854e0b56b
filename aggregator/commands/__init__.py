"""Control-plane commands, one module each, listed explicitly.

Each module has ``HELP`` (one line), ``ADMIN`` (changes state: rotate, reload) and
``async def run(agg, args, peer)`` returning a JSON-able result or raising ValueError.
"""

from __future__ import annotations

from types import ModuleType

from aggregator.commands import goodbye, heartbeat, hello, ping, reload, rotate, status, tail

COMMANDS: dict[str, ModuleType] = {
    "goodbye": goodbye,
    "hello": hello,
    "heartbeat": heartbeat,
    "ping": ping,
    "reload": reload,
    "rotate": rotate,
    "status": status,
    "tail": tail,
}
