"""Control-plane commands, one module each, listed explicitly.

Each module has ``HELP`` (one line), ``ADMIN`` (changes state: rotate, reload) and
``async def run(agg, args, peer)`` returning a JSON-able result or raising ValueError; a module
with ``BACKGROUND = True`` is answered when it is done, while the control socket goes on.
"""

from __future__ import annotations

from types import ModuleType

from aggregator.commands import goodbye, heartbeat, hello, history, ping, reload, rotate, status, tail

COMMANDS: dict[str, ModuleType] = {
    "goodbye": goodbye,
    "hello": hello,
    "history": history,
    "heartbeat": heartbeat,
    "ping": ping,
    "reload": reload,
    "rotate": rotate,
    "status": status,
    "tail": tail,
}
