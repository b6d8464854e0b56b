"""The aggregator's configuration: a frozen dataclass tree and a pure ``load_config``."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aggregator.formats import FORMATS, safe_name
from fleetlog import curve, wire
from fleetlog.tomlconf import ConfigError, Section, apply_overrides, dir_problem, listen_problem, read_toml

DEFAULT_PATH = "/etc/fleetlog/aggregator.toml"
COMPRESSIONS = ("gzip", "none")
SINKS = ("files", "jetstream")


@dataclass(frozen=True, slots=True)
class TopicConfig:
    # None: the aggregator's own setting.
    format: str | None = None
    split_by_agent: bool | None = None


@dataclass(frozen=True, slots=True)
class JetStreamConfig:
    """``[aggregator.jetstream]``: where ``sink = "jetstream"`` publishes (JETSTREAM-FORMAT.md)."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    stream: str = "FLEETLOG"             # created when missing, checked (WARNING) when it differs
    subject_prefix: str = "fleetlog"     # subjects <prefix>.<topic>.<agent>.<stream>
    replicas: int = 1                    # 3 for a 3-node cluster
    credentials: str = ""                # a NATS .creds file (JWT + NKey seed), optional
    # JetStream's dedup window (its own default, 2 minutes): a retry inside it is answered
    # "duplicate"; after it the expected-sequence precondition still refuses a second copy.
    duplicate_window_s: float = 120.0
    publish_timeout_s: float = 5.0       # one publish's wait for JetStream's answer
    max_bytes: int = 0                   # stream limit when created; 0: none (the servers' disk)
    max_age_s: int = 0                   # stream limit when created; 0: keep forever
    discard: str = "new"                 # "new": a full stream refuses (no ack, no loss)


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    output_dir: str = "/var/log/fleetlog"
    state_dir: str = "/var/lib/fleetlog/aggregator"
    pull: str = "tcp://127.0.0.1:5555"
    xsub: str = "tcp://127.0.0.1:5556"
    xpub: str = "tcp://127.0.0.1:5557"
    control: tuple[str, ...] = ("tcp://127.0.0.1:5558",)
    format: str = "raw"
    # Each agent's lines in a file of its own: <output_dir>/<topic>/<agent>/<topic>.log.
    split_by_agent: bool = False
    topics: dict[str, TopicConfig] = field(default_factory=dict)
    # Group commit: how long written lines may wait for fsync+ack, and how many bytes.
    commit_interval_ms: int = 200
    commit_max_bytes: int = 4 * 1024 * 1024
    # false: commits are journaled and acknowledged without fsync (benchmarks, throwaway data):
    # a crash of the machine (not of the process) can then lose acknowledged lines.
    fsync: bool = True
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    # Flow control: what all agents together may have shipped and not yet had acknowledged,
    # shared out equally among those catching up (at least wire.MIN_WINDOW each). It bounds the
    # memory of the aggregator's receive queues when a fleet catches up at once. 0: agents use
    # their own max_inflight_bytes.
    window_budget_bytes: int = 64 * 1024 * 1024
    # Rolling output files.
    rotate_max_bytes: int = 256 * 1024 * 1024
    rotate_interval_s: int = 86400
    compress: str = "gzip"
    retain_files: int = 30
    retain_days: int = 0
    # Streams (agent file incarnations) forgotten after this long without a batch.
    stream_ttl_s: int = 30 * 86400
    agent_timeout_s: int = 30
    # Agents that should be connected: status lists those that are not (never seen, or down).
    expected_agents: tuple[str, ...] = ()
    shutdown_timeout_s: int = 10
    metrics_listen: str = ""
    # CurveZMQ: the aggregator's secret key file (aggregatorctl keygen); empty runs open.
    curve_secret_key: str = ""
    authorized_keys_dir: str = ""
    admin_keys_dir: str = ""
    log_level: str = "info"
    loop: str = "uvloop"
    # Where committed batches go: the local rolling files, or NATS JetStream ([aggregator.jetstream]).
    sink: str = "files"
    jetstream: JetStreamConfig = field(default_factory=JetStreamConfig)

    def topic_format(self, topic: str) -> str:
        t = self.topics.get(topic)
        return t.format if t is not None and t.format is not None else self.format

    def topic_split(self, topic: str) -> bool:
        """Whether the topic's lines go to one file per agent."""
        t = self.topics.get(topic)
        return t.split_by_agent if t is not None and t.split_by_agent is not None else self.split_by_agent

    def file_key(self, topic: str, agent: str) -> str:
        """The files sink's key of ``agent``'s lines of ``topic`` (their directory under
        output_dir): the topic, or ``<topic>/<agent's safe name>`` (formats.safe_name) when the
        topic is split by agent. The aggregator's files sink and fleetlog-writer both place
        lines by it."""
        return f"{topic}/{safe_name(agent)}" if self.topic_split(topic) else topic


@dataclass(frozen=True, slots=True)
class Config:
    aggregator: AggregatorConfig
    source: str = "<built-in defaults>"


def parse_output(s: Section) -> dict[str, Any]:
    """The output keys of ``s`` (format, [topics.NAME], rotation, compression, retention, fsync,
    split_by_agent)
    as AggregatorConfig fields: fleetlog-writer takes the same keys and writes the same files."""
    d = AggregatorConfig()
    topics: dict[str, TopicConfig] = {}
    topics_section = s.table("topics")
    for name in list(topics_section.data):
        t = topics_section.table(name)
        if not wire.valid_topic(name):
            t.problem("", "not a valid topic name ([A-Za-z0-9._-]{1,128}, not starting with a dot)")
        topics[name] = TopicConfig(
            format=t.choice("format", "raw", FORMATS) if "format" in t.data else None,
            split_by_agent=t.bool("split_by_agent", False) if "split_by_agent" in t.data else None)
        t.finish()
    return {
        "format": s.choice("format", d.format, FORMATS),
        "topics": topics,
        "fsync": s.bool("fsync", d.fsync),
        "rotate_max_bytes": s.int("rotate_max_bytes", d.rotate_max_bytes, 0),
        "rotate_interval_s": s.int("rotate_interval_s", d.rotate_interval_s, 0),
        "compress": s.choice("compress", d.compress, COMPRESSIONS),
        "retain_files": s.int("retain_files", d.retain_files, 0),
        "retain_days": s.int("retain_days", d.retain_days, 0),
        "split_by_agent": s.bool("split_by_agent", d.split_by_agent),
    }


def parse(data: dict[str, Any], source: str, check_dirs: bool = True) -> Config:
    problems: list[str] = []
    root = Section(data, "", problems)
    s = root.table("aggregator")
    d = AggregatorConfig()
    cfg = AggregatorConfig(
        output_dir=s.str("output_dir", d.output_dir),
        state_dir=s.str("state_dir", d.state_dir),
        pull=s.endpoint("pull", d.pull),
        xsub=s.endpoint("xsub", d.xsub),
        xpub=s.endpoint("xpub", d.xpub),
        control=s.endpoints("control", d.control),
        **parse_output(s),
        commit_interval_ms=s.int("commit_interval_ms", d.commit_interval_ms, 1, 10_000),
        commit_max_bytes=s.int("commit_max_bytes", d.commit_max_bytes, 4096),
        max_message_bytes=s.int("max_message_bytes", d.max_message_bytes, 1024, 1 << 30),
        window_budget_bytes=s.int("window_budget_bytes", d.window_budget_bytes, 0),
        stream_ttl_s=s.int("stream_ttl_s", d.stream_ttl_s, 60),
        agent_timeout_s=s.int("agent_timeout_s", d.agent_timeout_s, 1),
        expected_agents=s.str_list("expected_agents", d.expected_agents),
        shutdown_timeout_s=s.int("shutdown_timeout_s", d.shutdown_timeout_s, 1, 3600),
        metrics_listen=s.str("metrics_listen", d.metrics_listen,
                             listen_problem),
        curve_secret_key=s.str("curve_secret_key", d.curve_secret_key),
        authorized_keys_dir=s.str("authorized_keys_dir", d.authorized_keys_dir),
        admin_keys_dir=s.str("admin_keys_dir", d.admin_keys_dir),
        log_level=s.choice("log_level", d.log_level, ("debug", "info", "warning", "error")),
        loop=s.choice("loop", d.loop, ("uvloop", "asyncio")),
        sink=s.choice("sink", d.sink, SINKS),
        jetstream=_jetstream(s.table("jetstream")),
    )
    s.finish()
    root.finish()
    _check_keys(cfg, problems)
    if check_dirs:
        for key in ("output_dir", "state_dir"):
            if (message := dir_problem(getattr(cfg, key), create=True)) is not None:
                problems.append(f"aggregator.{key}: {message}")
    bound = [cfg.pull, cfg.xsub, cfg.xpub, *cfg.control]
    dupes = {e for e in bound if bound.count(e) > 1}
    if dupes:
        problems.append(f"aggregator: endpoints used twice: {', '.join(sorted(dupes))}")
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return Config(aggregator=cfg, source=source)


def nats_url_problem(value: str) -> str | None:
    parsed = urllib.parse.urlsplit(value if "://" in value else f"nats://{value}")
    if parsed.scheme not in ("nats", "tls", "ws", "wss"):
        return f"{value!r}: a NATS server URL is nats://HOST:PORT (or tls://, ws://, wss://)"
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if not parsed.hostname or port == -1:
        return f"{value!r}: a NATS server URL is nats://HOST:PORT"
    return None


def stream_name_problem(value: str) -> str | None:
    # JetStream refuses these in a stream name (and a name is part of API subjects).
    if not value or any(c in value for c in " \t.*>/\\") or not value.isprintable():
        return f"{value!r}: a stream name is non-empty, without spaces, '.', '*', '>', '/' or '\\'"
    return None


def subject_prefix_problem(value: str) -> str | None:
    if not all(t and all(c.isascii() and (c.isalnum() or c in "_-") for c in t) for t in value.split(".")):
        return f"{value!r}: a subject prefix is dot-separated tokens of [A-Za-z0-9_-] (no wildcards)"
    return None


def _jetstream(t: Section) -> JetStreamConfig:
    d = JetStreamConfig()
    servers = t.str_list("servers", d.servers, allow_empty=False)
    for problem in filter(None, map(nats_url_problem, servers)):
        t.problem("servers", problem)
    credentials = t.str("credentials", d.credentials)
    if credentials and not os.access(credentials, os.R_OK):
        t.problem("credentials", f"{credentials} is not a readable file")
    cfg = JetStreamConfig(
        servers=servers,
        stream=t.str("stream", d.stream, stream_name_problem),
        subject_prefix=t.str("subject_prefix", d.subject_prefix, subject_prefix_problem),
        replicas=t.int("replicas", d.replicas, 1, 5),
        credentials=credentials,
        duplicate_window_s=float(t.get("duplicate_window_s", (int, float), d.duplicate_window_s,
                                       lambda v: None if 0 < v <= 86400 * 7 else
                                       f"must be more than 0 and at most a week, not {v}")),
        publish_timeout_s=float(t.get("publish_timeout_s", (int, float), d.publish_timeout_s,
                                      lambda v: None if 0.1 <= v <= 120 else
                                      f"must be between 0.1 and 120, not {v}")),
        max_bytes=t.int("max_bytes", d.max_bytes, 0),
        max_age_s=t.int("max_age_s", d.max_age_s, 0),
        discard=t.choice("discard", d.discard, ("new", "old")),
    )
    if cfg.max_age_s and cfg.duplicate_window_s > cfg.max_age_s:
        t.problem("duplicate_window_s", f"must not exceed max_age_s ({cfg.max_age_s}); JetStream refuses it")
    t.finish()
    return cfg


def _check_keys(cfg: AggregatorConfig, problems: list[str]) -> None:
    if not cfg.curve_secret_key:
        for key in ("authorized_keys_dir", "admin_keys_dir"):
            if getattr(cfg, key):
                problems.append(f"aggregator.{key}: needs aggregator.curve_secret_key")
        return
    try:
        curve.load_secret(cfg.curve_secret_key)
    except curve.KeyError_ as exc:
        problems.append(f"aggregator.curve_secret_key: {exc}")
    if not cfg.authorized_keys_dir:
        problems.append("aggregator.authorized_keys_dir: needed with curve_secret_key (who may connect)")
    for key in ("authorized_keys_dir", "admin_keys_dir"):
        directory = getattr(cfg, key)
        if directory and not os.path.isdir(directory):
            problems.append(f"aggregator.{key}: {directory} is not a directory")


def load_config(path: str | None, overrides: list[str] | None = None, check_dirs: bool = True) -> Config:
    """Load ``path`` (or the default file if it exists, else built-in defaults) plus ``--set`` items."""
    data: dict[str, Any] = {}
    source = "<built-in defaults>"
    if path is not None or os.path.exists(DEFAULT_PATH):
        source = path or DEFAULT_PATH
        data = read_toml(source)
    apply_overrides(data, overrides or [])
    return parse(data, source, check_dirs=check_dirs)


__all__ = ["AggregatorConfig", "Config", "ConfigError", "JetStreamConfig", "TopicConfig", "load_config"]
