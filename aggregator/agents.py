"""The agents: who they are, where their acks go, what they say of themselves, remembered across
restarts (registry.json)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aggregator import registry
from aggregator.stages import Stages
from aggregator.status import TopicStats
from fleetlog import wire

log = logging.getLogger("fleetlog.aggregator")


@dataclass
class AgentInfo:
    name: str
    routing_id: bytes = b""
    route: Any = None  # the control socket the agent talks on
    name_clash_warned: bool = False
    agent_id: str = ""     # the agent's own id (kept in its state_dir): two hosts, two ids
    heartbeat_s: float = 1.0
    problems: list[str] = field(default_factory=list)  # what the agent says is wrong
    # Another live agent with this name, refused while this one is connected: its address and id,
    # and when it last tried (monotonic).
    clash: tuple[str, str, float] | None = None
    address: str = ""
    mode: str = ""
    last_seen: float = 0.0
    connected: bool = False
    stopped: bool = False  # said goodbye: stopped cleanly, not lost
    heard: bool = True     # by this instance (False: remembered from before a restart)
    version: str = ""
    aggregators: int = 1  # how many aggregators the agent is configured with (its hello says)
    started_at: float = 0.0   # wall-clock time the agent started (from its hello)
    errors: dict[str, int] = field(default_factory=dict)  # its files' troubles (heartbeats)
    file_list: list[str] = field(default_factory=list)     # what it follows (heartbeats, on change)
    lag_bytes: int = 0
    # How old the oldest line the agent has not had acknowledged is (its heartbeats say; 0: none).
    lag_s: float = 0.0
    files: int = 0
    # [[journal]] sources (from heartbeats): entries read and not acknowledged, and how far
    # (seconds of journal time) the last acknowledged entry is behind the newest read.
    journal_lag_entries: int | None = None
    journal_lag_s: float | None = None
    # Flow control: the window last granted to it, and the most it asked for (its own
    # max_inflight_bytes, from its hello; 0: not said).
    window: int = 0
    max_window: int = 0
    lines: int = 0
    bytes: int = 0
    rate: float = 0.0
    _last_lines: int = 0

    def take_report(self, args: dict[str, Any]) -> None:
        """What a hello or heartbeat says of the agent (each field checked; bad ones ignored)."""
        mode = args.get("mode")
        if mode in ("push", "pub"):
            self.mode = mode
        if type(args.get("aggregators")) is int:
            self.aggregators = args["aggregators"]
        version, started_at = args.get("version"), args.get("started_at")
        if isinstance(version, str) and len(version) <= 64:
            self.version = version
        if isinstance(started_at, int | float) and started_at > 0:
            self.started_at = float(started_at)
        problems = args.get("problems")
        if isinstance(problems, list):
            self.problems = [str(p)[:1000] for p in problems[:10]]
        beat = args.get("heartbeat_interval_ms")
        if type(beat) is int and beat > 0:
            self.heartbeat_s = beat / 1000
        fields = (("lag_bytes", "lag_bytes"), ("files", "files"), ("max_window", "max_inflight_bytes"))
        for attr, key in fields:
            value = args.get(key)
            if type(value) is int and value >= 0:
                setattr(self, attr, value)
        errors, file_list = args.get("errors"), args.get("file_list")
        if isinstance(errors, dict):
            self.errors = {str(k)[:64]: v for k, v in list(errors.items())[:16] if type(v) is int}
        if isinstance(file_list, list):
            self.file_list = [p for p in file_list[:1000] if isinstance(p, str)]
        lag_s = args.get("lag_s")
        if isinstance(lag_s, int | float) and 0 <= lag_s < 1e9:
            self.lag_s = float(lag_s)
        if type(args.get("journal_lag_entries")) is int:
            self.journal_lag_entries = args["journal_lag_entries"]
        if type(args.get("journal_lag_s")) in (int, float):
            self.journal_lag_s = float(args["journal_lag_s"])

    @property
    def catching_up(self) -> bool:
        """Connected with a backlog (by its last hello or heartbeat): it shares the window budget."""
        return self.connected and self.lag_bytes >= wire.MIN_WINDOW


class AgentRegistry(Stages):
    """Hellos, heartbeats and goodbyes; events sent to agents."""

    def remember(self, known: registry.Remembered) -> None:
        """Agents and topics seen before the restart: listed as disconnected until they speak."""
        mono, wall = time.monotonic(), time.time()
        for name, a in known.agents.items():
            seen = a.get("last_seen")
            if name in self.agents or not isinstance(seen, int | float):
                continue
            self.agents[name] = AgentInfo(
                name, address=str(a.get("address", "")), mode=str(a.get("mode", "")),
                version=str(a.get("version", "")), last_seen=mono - max(0.0, wall - seen),
                lines=int(a.get("lines", 0)), bytes=int(a.get("bytes", 0)),
                stopped=bool(a.get("stopped", False)), heard=False,
                aggregators=int(a.get("aggregators", 1)))
            self.agents[name]._last_lines = self.agents[name].lines  # no rate from the old count
        for name, t in known.topics.items():
            if name not in self.topics:
                lines = int(t.get("lines", 0))
                self.topics[name] = TopicStats(lines=lines, bytes=int(t.get("bytes", 0)), _last_lines=lines)

    def save_registry(self) -> None:
        """Save the registry now (at shutdown: on the loop thread, which has nothing else to do)."""
        self.write_registry(*self.registry_snapshot())

    def save_registry_later(self) -> asyncio.Future[None]:
        """Take the registry now and write it in a thread: its two fsyncs on the loop thread
        stopped everything (receiving, acknowledging) for as long as the disk took, every 10 s:
        hundreds of milliseconds on a disk that other writers keep busy."""
        agents, topics = self.registry_snapshot()
        return asyncio.get_running_loop().run_in_executor(None, self.write_registry, agents, topics)

    def registry_snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        mono, wall = time.monotonic(), time.time()
        agents = {a.name: {"address": a.address, "mode": a.mode, "version": a.version,
                           "last_seen": wall - (mono - a.last_seen), "lines": a.lines, "bytes": a.bytes,
                           "stopped": a.stopped, "aggregators": a.aggregators}
                  for a in self.agents.values() if a.last_seen}
        topics = {name: {"lines": t.lines, "bytes": t.bytes} for name, t in self.topics.items()}
        return agents, topics

    def write_registry(self, agents: dict[str, dict[str, Any]], topics: dict[str, dict[str, Any]]) -> None:
        try:
            registry.save(self.cfg.state_dir, agents, topics)
            self._registry_error = False
        except OSError as exc:
            if not self._registry_error:
                log.warning("cannot save %s/%s (%s): status will forget agents that are down at the "
                            "next restart; no line is at risk", self.cfg.state_dir, registry.FILE, exc)
            self._registry_error = True

    def touch_agent(self, args: dict[str, Any], peer: Any) -> AgentInfo:
        """Record a hello or heartbeat: who the agent is and where to send its acks."""
        name = args.get("agent")
        if type(name) is not str or not 0 < len(name) <= 256:
            raise ValueError("agent must be a non-empty name")
        info = self.agents.get(name)
        if info is None:
            info = self.agents[name] = AgentInfo(name)
        agent_id = args.get("agent_id")
        agent_id = agent_id if type(agent_id) is str and 0 < len(agent_id) <= 64 else ""
        now = time.monotonic()
        # Live: heard from within three of its heartbeats (5 s at least, for a loaded host), and
        # not gone with a goodbye (a host reinstalled with a new state_dir is back at once).
        live_s = min(max(3 * info.heartbeat_s, 5.0), self.cfg.agent_timeout_s)
        if agent_id and info.agent_id and agent_id != info.agent_id and info.last_seen \
                and not info.stopped and now - info.last_seen < live_s:
            self.refuse_name_clash(info, agent_id, peer.address, now)
        host = peer.address.rsplit(":", 1)[0]
        if (not agent_id and info.address and info.address.rsplit(":", 1)[0] != host
                and not info.name_clash_warned and now - info.last_seen < 2 * self.cfg.agent_timeout_s):
            # Identities are agent names: two hosts with one name take each other's acks (they
            # resend, so nothing is lost, but both crawl). Say so once.
            info.name_clash_warned = True
            log.warning("agent name %r is used from %s and from %s: give each agent its own"
                        " agent.name", name, info.address, peer.address)
        info.routing_id = peer.routing_id
        info.route = peer.sock
        info.address = peer.address
        if agent_id:
            if agent_id != info.agent_id and info.clash is not None and info.clash[1] == agent_id:
                info.clash = None  # the refused one has the name now: not a clash to tell it of
            info.agent_id = agent_id
        was_catching_up = info.catching_up
        info.take_report(args)
        info.last_seen = time.monotonic()
        info.connected = info.heard = True
        info.stopped = False
        if info.catching_up and not was_catching_up:
            # Counted at once, not at the next tick: when a whole fleet reconnects with
            # backlogs, each hello already gets a smaller share.
            self.catching_up += 1
            self.share_window()
        return info

    def say_goodbye(self, name: str, peer: Any) -> None:
        """An agent stopping cleanly: disconnected at once, its window back in the budget."""
        info = self.agents.get(name)
        if info is None or info.routing_id != peer.routing_id:
            return  # not the connection we know for that name (a clash, or a stale one)
        info.connected, info.stopped = False, True
        self.granted -= info.window
        info.window = 0
        log.info("agent %s (%s) stopped", name, info.address)

    def refuse_name_clash(self, info: AgentInfo, agent_id: str, address: str, now: float) -> None:
        """A second live agent with ``info``'s name (another id, so another host or state_dir):
        refused, told why (the error of its hello or heartbeat), and the first told in its
        replies (``warnings``) while the second keeps trying. Raises ValueError."""
        if info.clash is None or info.clash[1] != agent_id or now - info.clash[2] > 10 * info.heartbeat_s:
            log.warning("agent name %r is used by two live agents: %s (id %s, connected) and %s (id %s,"
                        " refused while the first is connected): give each agent its own agent.name",
                        info.name, info.address, info.agent_id, address, agent_id)
        info.clash = (address, agent_id, now)
        raise ValueError(f"agent name {info.name!r} is in use by another live agent at {info.address}"
                         f" (id {info.agent_id}; this agent is {agent_id}): give each agent its own"
                         " agent.name; refused while the other is connected")

    def agent_warnings(self, info: AgentInfo) -> list[str]:
        """What the aggregator tells an agent about itself in its replies."""
        clash = info.clash
        if clash is None or time.monotonic() - clash[2] > 5 * info.heartbeat_s:
            return []
        return [f"agent name {info.name!r} is also used by another agent at {clash[0]} (id {clash[1]}),"
                " refused while this one is connected: give each agent its own agent.name"]

    def tell_agents_stopping(self) -> int:
        """Tell every connected agent that this aggregator stops (after the final commit's acks,
        on the same connection, so they arrive first): agents with another aggregator move to
        it at once instead of after a heartbeat timeout. The control sockets linger on close,
        so the events go out. Returns how many agents were told. Called once, from shutdown."""
        body = wire.encode_event(wire.EVENT_STOPPING, instance=self.instance)
        told = 0
        for info in self.agents.values():
            if info.connected and info.routing_id and info.route is not None:
                self.send_event(info.name, body)
                told += 1
        if told:
            log.info("told %d connected agents that this aggregator stops", told)
        return told

    def send_event(self, agent: str, body: bytes) -> None:
        info = self.agents.get(agent)
        if info is not None and info.routing_id and self.control is not None:
            self.control.send_to(info.route, info.routing_id, body)
