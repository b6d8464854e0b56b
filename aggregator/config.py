"""The aggregator's configuration: a frozen dataclass tree and a pure ``load_config``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fleetlog import curve, wire
from fleetlog.tomlconf import ConfigError, Section, apply_overrides, dir_problem, listen_problem, read_toml

DEFAULT_PATH = "/etc/fleetlog/aggregator.toml"
FORMATS = ("raw", "json")
COMPRESSIONS = ("gzip", "none")


@dataclass(frozen=True, slots=True)
class TopicConfig:
    format: str = "raw"


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    output_dir: str = "/var/log/fleetlog"
    state_dir: str = "/var/lib/fleetlog/aggregator"
    pull: str = "tcp://127.0.0.1:5555"
    xsub: str = "tcp://127.0.0.1:5556"
    xpub: str = "tcp://127.0.0.1:5557"
    control: tuple[str, ...] = ("tcp://127.0.0.1:5558",)
    format: str = "raw"
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

    def topic_format(self, topic: str) -> str:
        t = self.topics.get(topic)
        return t.format if t is not None else self.format


@dataclass(frozen=True, slots=True)
class Config:
    aggregator: AggregatorConfig
    source: str = "<built-in defaults>"


def parse_output(s: Section) -> dict[str, Any]:
    """The output keys of ``s`` (format, [topics.NAME], rotation, compression, retention, fsync)
    as AggregatorConfig fields: fleetlog-writer takes the same keys and writes the same files."""
    d = AggregatorConfig()
    topics: dict[str, TopicConfig] = {}
    topics_section = s.table("topics")
    for name in list(topics_section.data):
        t = topics_section.table(name)
        if not wire.valid_topic(name):
            t.problem("", "not a valid topic name ([A-Za-z0-9._-]{1,128}, not starting with a dot)")
        topics[name] = TopicConfig(format=t.choice("format", "raw", FORMATS))
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


__all__ = ["AggregatorConfig", "Config", "ConfigError", "TopicConfig", "load_config"]
