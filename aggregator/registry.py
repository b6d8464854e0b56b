"""What the aggregator remembers across restarts about who it has heard from: every agent (name,
address, mode, version, when last seen) and every topic (lines and bytes written), so that
``aggregatorctl status`` after a restart still lists an agent that is down ("last seen 3h ago")
instead of forgetting it until it says hello again.

Kept in ``state_dir/registry.json``, replaced atomically (fleetlog.durable) every few seconds
when something changed and at shutdown. It is a convenience, not a promise: losing it loses no
line (the journal is what delivery rests on), so a damaged file is set aside with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleetlog.durable import write_atomic

log = logging.getLogger("fleetlog.aggregator.registry")

FILE = "registry.json"
VERSION = 1


@dataclass
class Remembered:
    """The registry as read at start: agents and topics as plain dicts (see ``snapshot``)."""
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    topics: dict[str, dict[str, Any]] = field(default_factory=dict)


def load(state_dir: str) -> Remembered:
    path = os.path.join(state_dir, FILE)
    try:
        with open(path, "rb") as fh:
            doc = orjson.loads(fh.read())
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError("unknown version")
        agents, topics = doc.get("agents"), doc.get("topics")
        if not isinstance(agents, dict) or not isinstance(topics, dict):
            raise ValueError("agents and topics must be objects")
    except FileNotFoundError:
        return Remembered()
    except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        log.warning("cannot read %s (%s): set aside; agents and topics are learnt again as they "
                    "come (no line depends on it)", path, exc)
        with contextlib.suppress(OSError):
            os.replace(path, f"{path}.bad")
        return Remembered()
    return Remembered(
        agents={k: v for k, v in agents.items() if isinstance(k, str) and isinstance(v, dict)},
        topics={k: v for k, v in topics.items() if isinstance(k, str) and isinstance(v, dict)})


def save(state_dir: str, agents: dict[str, dict[str, Any]], topics: dict[str, dict[str, Any]]) -> None:
    """Replace the registry; raises OSError (the caller logs it once and goes on)."""
    write_atomic(os.path.join(state_dir, FILE),
                 orjson.dumps({"v": VERSION, "agents": agents, "topics": topics}))
