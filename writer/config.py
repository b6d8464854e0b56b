"""fleetlog-writer's configuration: a frozen dataclass tree and a pure ``load_config``.

The output keys (format, ``[writer.topics.NAME]``, rotation, compression, retention, fsync) are
the aggregator's, parsed by the aggregator's own code (``aggregator.config.parse_output``), so a
writer and an aggregator given the same values write the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from aggregator.config import (
    AggregatorConfig,
    TopicConfig,
    nats_url_problem,
    parse_output,
    stream_name_problem,
    subject_prefix_problem,
)
from fleetlog.tomlconf import ConfigError, Section, apply_overrides, dir_problem, listen_problem, read_toml

DEFAULT_PATH = "/etc/fleetlog/writer.toml"

@dataclass(frozen=True, slots=True)
class WriterConfig:
    output_dir: str = "/var/log/fleetlog"
    state_dir: str = "/var/lib/fleetlog/writer"
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    stream: str = "FLEETLOG"
    subject_prefix: str = "fleetlog"
    control: tuple[str, ...] = ("tcp://127.0.0.1:5559",)
    credentials: str = ""           # a NATS .creds file; empty: none
    # The aggregator's output keys.
    format: str = "raw"
    topics: dict[str, TopicConfig] = field(default_factory=dict)
    fsync: bool = True
    rotate_max_bytes: int = 256 * 1024 * 1024
    rotate_interval_s: int = 86400
    compress: str = "gzip"
    retain_files: int = 30
    retain_days: int = 0
    split_by_agent: bool = False    # true: <topic>/<agent>/<topic>.log, a file per agent
    # Group commit: messages applied since the last commit wait at most this long, or this many bytes.
    commit_interval_ms: int = 200
    commit_max_bytes: int = 4 * 1024 * 1024
    # Messages asked for per pull from the stream.
    fetch_batch: int = 1000
    # (agent, stream) end offsets forgotten after this long without a message.
    stream_ttl_s: int = 30 * 86400
    shutdown_timeout_s: int = 10
    metrics_listen: str = ""
    log_level: str = "info"
    loop: str = "uvloop"

    def files(self) -> AggregatorConfig:
        """The output part as the aggregator's config type, for the code both daemons share
        (rolling, retention, formats)."""
        return AggregatorConfig(
            output_dir=self.output_dir, state_dir=self.state_dir, control=self.control,
            format=self.format, topics=self.topics, fsync=self.fsync,
            rotate_max_bytes=self.rotate_max_bytes, rotate_interval_s=self.rotate_interval_s,
            compress=self.compress, retain_files=self.retain_files, retain_days=self.retain_days,
            split_by_agent=self.split_by_agent,
            commit_interval_ms=self.commit_interval_ms, commit_max_bytes=self.commit_max_bytes,
            stream_ttl_s=self.stream_ttl_s, shutdown_timeout_s=self.shutdown_timeout_s,
            metrics_listen=self.metrics_listen, log_level=self.log_level, loop=self.loop)


@dataclass(frozen=True, slots=True)
class Config:
    writer: WriterConfig
    source: str = "<built-in defaults>"


def parse(data: dict[str, Any], source: str, check_dirs: bool = True) -> Config:
    problems: list[str] = []
    root = Section(data, "", problems)
    s = root.table("writer")
    d = WriterConfig()
    servers = s.str_list("servers", d.servers, allow_empty=False)
    for server in servers:
        if (message := nats_url_problem(server)) is not None:
            s.problem("servers", message)
    credentials = s.str("credentials", d.credentials)
    if credentials and not os.access(credentials, os.R_OK):
        s.problem("credentials", f"{credentials} is not a readable file")
    cfg = WriterConfig(
        output_dir=s.str("output_dir", d.output_dir),
        state_dir=s.str("state_dir", d.state_dir),
        servers=servers,
        stream=s.str("stream", d.stream, stream_name_problem),
        subject_prefix=s.str("subject_prefix", d.subject_prefix, subject_prefix_problem),
        control=s.endpoints("control", d.control),
        credentials=credentials,
        **parse_output(s),
        commit_interval_ms=s.int("commit_interval_ms", d.commit_interval_ms, 1, 10_000),
        commit_max_bytes=s.int("commit_max_bytes", d.commit_max_bytes, 4096),
        fetch_batch=s.int("fetch_batch", d.fetch_batch, 1, 100_000),
        stream_ttl_s=s.int("stream_ttl_s", d.stream_ttl_s, 60),
        shutdown_timeout_s=s.int("shutdown_timeout_s", d.shutdown_timeout_s, 1, 3600),
        metrics_listen=s.str("metrics_listen", d.metrics_listen, listen_problem),
        log_level=s.choice("log_level", d.log_level, ("debug", "info", "warning", "error")),
        loop=s.choice("loop", d.loop, ("uvloop", "asyncio")),
    )
    s.finish()
    root.finish()
    if check_dirs:
        for key in ("output_dir", "state_dir"):
            if (message := dir_problem(getattr(cfg, key), create=True)) is not None:
                problems.append(f"writer.{key}: {message}")
    if os.path.realpath(cfg.output_dir) == os.path.realpath(cfg.state_dir):
        problems.append("writer.state_dir: must not be output_dir (topic directories live there)")
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return Config(writer=cfg, source=source)


def load_config(path: str | None, overrides: list[str] | None = None, check_dirs: bool = True) -> Config:
    """Load ``path`` (or the default file if it exists, else built-in defaults) plus ``--set`` items."""
    data: dict[str, Any] = {}
    source = "<built-in defaults>"
    if path is not None or os.path.exists(DEFAULT_PATH):
        source = path or DEFAULT_PATH
        data = read_toml(source)
    apply_overrides(data, overrides or [])
    return parse(data, source, check_dirs=check_dirs)


__all__ = ["Config", "ConfigError", "WriterConfig", "load_config"]
