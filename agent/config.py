"""The agent's configuration: a frozen dataclass tree and a pure ``load_config``."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import Any

from fleetlog import curve, wire
from fleetlog.tomlconf import (
    IPC_PATH_MAX,
    ConfigError,
    Section,
    apply_overrides,
    dir_problem,
    endpoint_problem,
    listen_problem,
    nearest_existing,
    read_toml,
)

DEFAULT_PATH = "/etc/fleetlog/agent.toml"
# Well under the aggregator's default max_message_bytes (16 MiB), JSON escaping included.
MAX_BATCH_BYTES = 6 * 1024 * 1024
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".Z")


@dataclass(frozen=True, slots=True)
class SourceConfig:
    paths: tuple[str, ...]
    topic: str
    start_at: str = "beginning"
    exclude: tuple[str, ...] = ()
    include_compressed: bool = False
    max_line_bytes: int = 1024 * 1024
    # A partial last line (no newline yet) is shipped as it is after this long.
    partial_line_timeout_ms: int = 5000
    # Multi-line records: a line matching this starts a record; others continue the previous one.
    multiline_start: str = ""
    multiline_timeout_ms: int = 1000
    multiline_max_lines: int = 500

    @property
    def topic_bytes(self) -> bytes:
        return self.topic.encode()


@dataclass(frozen=True, slots=True)
class AggregatorEndpoints:
    """One aggregator as an agent reaches it: its pull (push mode) or xsub (pub mode) endpoint,
    and its control endpoint (which also names it: the ranking hashes it)."""
    data: str
    control: str


@dataclass(frozen=True, slots=True)
class AgentConfig:
    name: str
    state_dir: str = "/var/lib/fleetlog/agent"
    mode: str = "push"
    data: str = "tcp://127.0.0.1:5555"
    control: str = "tcp://127.0.0.1:5558"
    # Several aggregators (``aggregators = [{data, control}, ...]``), instead of data/control:
    # the agent ranks them by a rendezvous hash of its name and uses one at a time (see
    # agent/failover.py). Empty: the single data/control pair.
    aggregators: tuple[AggregatorEndpoints, ...] = ()
    # Where `fleetlog-agent status` finds this agent; default ipc://<state_dir>/agent.sock.
    status_socket: str = ""
    batch_max_lines: int = 10_000
    batch_max_bytes: int = 512 * 1024
    batch_max_delay_ms: int = 5
    # Backpressure: the agent stops reading when this much is shipped but not acknowledged.
    max_inflight_bytes: int = 32 * 1024 * 1024
    ack_timeout_ms: int = 3000
    heartbeat_interval_ms: int = 1000
    checkpoint_interval_ms: int = 1000
    rescan_interval_ms: int = 5000
    # The longest a written line waits for its read cycle: the watcher hands the files that
    # changed to the read loop at most this long after the first change, and every file of one
    # hand-over is read and shipped in one cycle (one message per topic to an aggregator that
    # reads wire version 3). Larger: fewer cycles (less CPU on both sides), more latency.
    latency_budget_ms: int = 40
    # watchfiles: changes are handed over after watch_step_ms without a new one, or at the latest
    # after watch_debounce_ms. 0 (the default): from latency_budget_ms (steps of half of it, no
    # debounce of its own: a hand-over at most two steps after the first change).
    watch_debounce_ms: int = 0
    watch_step_ms: int = 0
    # After a second without a change the watcher looks every watch_idle_step_ms instead: an
    # idle agent then wakes 50 times a second rather than 333, and the first line after a quiet
    # spell waits up to twice this long.
    watch_idle_step_ms: int = 20
    force_polling: bool = False
    max_open_files: int = 1024
    idle_close_s: int = 300
    rotated_keep_s: int = 300
    shutdown_timeout_s: int = 10
    # CurveZMQ: the aggregator's public key (z85 text or .key file) and this agent's secret
    # key file (aggregatorctl keygen); both empty: plain ZeroMQ.
    curve_server_key: str = ""
    curve_secret_key: str = ""
    metrics_listen: str = ""
    log_level: str = "info"
    loop: str = "asyncio"

    @property
    def aggregator_list(self) -> tuple[AggregatorEndpoints, ...]:
        """The aggregators this agent may use, as configured (one for the single pair)."""
        return self.aggregators or (AggregatorEndpoints(self.data, self.control),)

    @property
    def status_endpoint(self) -> str:
        """``status_socket``, else ``ipc://<state_dir>/agent.sock``; where that path is too long
        for a Unix socket (about 100 bytes), a short one named after the state directory:
        ``/tmp/fleetlog-agent-<hash>/agent.sock`` (a directory of the agent's own, mode 0750,
        see agent/status.py), so that no state_dir can keep the agent from starting and the
        socket keeps file permissions (an abstract socket would be open to every local user)."""
        if self.status_socket:
            return self.status_socket
        state_dir = os.path.abspath(self.state_dir)
        path = f"{state_dir}/agent.sock"
        if len(path.encode()) < IPC_PATH_MAX:
            return f"ipc://{path}"
        digest = hashlib.sha256(os.fsencode(state_dir)).hexdigest()[:16]
        return f"ipc:///tmp/fleetlog-agent-{digest}/agent.sock"


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """One ``[[journal]]`` section: entries of the systemd journal (or of a directory of journal
    files) matching all of the given kinds of match, each kind any of its values."""
    topic: str
    units: tuple[str, ...] = ()          # _SYSTEMD_UNIT values ("nginx" means nginx.service)
    identifiers: tuple[str, ...] = ()    # SYSLOG_IDENTIFIER values
    priority: str = ""                   # entries up to this priority ("err", "4"); "": all
    matches: tuple[str, ...] = ()        # any "FIELD=value"
    start_at: str = "beginning"
    directory: str = ""                  # "": the system journal
    journalctl: str = "journalctl"       # the reader (a path, or a name on PATH)
    max_line_bytes: int = 1024 * 1024    # longer messages are cut (and counted)

    @property
    def topic_bytes(self) -> bytes:
        return self.topic.encode()

    @property
    def field_matches(self) -> tuple[str, ...]:
        """Every match as journalctl takes it: the same field ORs, different fields AND."""
        return (tuple(f"_SYSTEMD_UNIT={u}" for u in self.units)
                + tuple(f"SYSLOG_IDENTIFIER={i}" for i in self.identifiers) + self.matches)

    @property
    def key(self) -> str:
        """What identifies this source's checkpoint: a changed match is another source."""
        where = self.directory or "<system>"
        return "|".join((self.topic, where, self.priority, *sorted(self.field_matches)))


@dataclass(frozen=True, slots=True)
class Config:
    agent: AgentConfig
    sources: tuple[SourceConfig, ...]
    source: str = "<built-in defaults>"
    journals: tuple[JournalConfig, ...] = ()


def glob_root(pattern: str) -> str:
    """The deepest directory of ``pattern`` without wildcards (what to watch)."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.sep


def _regex_problem(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    return None


def _parse_aggregators(s: Section) -> tuple[AggregatorEndpoints, ...]:
    """``aggregators = [{ data = "...", control = "..." }, ...]``: each entry checked like the
    single pair, which it replaces (both given is a mistake: which one would be meant?)."""
    if "aggregators" not in s.data:
        return ()
    given = [k for k in ("data", "control") if k in s.data]
    if given:
        s.problem("aggregators", f"give either aggregators or the single {' and '.join(given)} key,"
                                 " not both (aggregators lists each aggregator's data and control)")
    value = s.data["aggregators"]
    if not isinstance(value, list) or not value:
        s.tables("aggregators")  # marks the key as known
        s.problem("aggregators", "must be a non-empty list of tables like"
                                 " { data = \"tcp://agg-a:5555\", control = \"tcp://agg-a:5558\" }")
        return ()
    out: list[AggregatorEndpoints] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(s.tables("aggregators")):
        for key in ("data", "control"):
            if key not in entry.data:
                entry.problem(key, "missing (each aggregator needs its data and control endpoints)")
        item = AggregatorEndpoints(data=entry.endpoint("data", ""), control=entry.endpoint("control", ""))
        entry.finish()
        if item.control and item.control in seen:
            entry.problem("control", f"{item.control} is also aggregators[{seen[item.control]}]'s")
        seen.setdefault(item.control, i)
        out.append(item)
    return tuple(out)


def _parse_source(s: Section) -> SourceConfig:
    d = SourceConfig(paths=(), topic="")
    paths = s.str_list("paths", (), allow_empty=False)
    if "paths" not in s.data:
        s.problem("paths", "missing (a list of globs, e.g. [\"/var/log/nginx/*.log\"])")
    for p in paths:
        if not os.path.isabs(p):
            s.problem("paths", f"{p!r} is not an absolute path")
    topic = s.str("topic", "", lambda v: None if wire.valid_topic(v) else
                  "must match [A-Za-z0-9._-]{1,128} and not start with a dot")
    if "topic" not in s.data:
        s.problem("topic", "missing")
    src = SourceConfig(
        paths=paths,
        topic=topic,
        start_at=s.choice("start_at", d.start_at, ("beginning", "end")),
        exclude=s.str_list("exclude", ()),
        include_compressed=s.bool("include_compressed", d.include_compressed),
        max_line_bytes=s.int("max_line_bytes", d.max_line_bytes, 256, MAX_BATCH_BYTES),
        partial_line_timeout_ms=s.int("partial_line_timeout_ms", d.partial_line_timeout_ms, 0),
        multiline_start=s.str("multiline_start", "", _regex_problem),
        multiline_timeout_ms=s.int("multiline_timeout_ms", d.multiline_timeout_ms, 1),
        multiline_max_lines=s.int("multiline_max_lines", d.multiline_max_lines, 1),
    )
    s.finish()
    return src


PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_FIELD_RE = re.compile(r"[A-Z_][A-Z0-9_]*")


def _match_problem(value: str) -> str | None:
    field, sep, _ = value.partition("=")
    if not sep or not _FIELD_RE.fullmatch(field) or len(field) > 64:
        return f"{value!r} is not FIELD=value (FIELD in capitals, digits and underscores)"
    return None


def _parse_journal(s: Section, check_dirs: bool) -> JournalConfig:
    d = JournalConfig(topic="")
    topic = s.str("topic", "", lambda v: None if wire.valid_topic(v) else
                  "must match [A-Za-z0-9._-]{1,128} and not start with a dot")
    if "topic" not in s.data:
        s.problem("topic", "missing")
    units = tuple(u if "." in u else f"{u}.service" for u in s.str_list("units", ()))
    matches = s.str_list("matches", ())
    for m in matches:
        if (message := _match_problem(m)) is not None:
            s.problem("matches", message)
    priority = s.get("priority", (str, int), "")
    if isinstance(priority, int) and not 0 <= priority <= 7:
        s.problem("priority", f"must be 0 to 7 or one of {', '.join(PRIORITIES)}, not {priority}")
    elif isinstance(priority, str) and priority and priority not in PRIORITIES and \
            not (priority.isdigit() and int(priority) <= 7):
        s.problem("priority", f"must be 0 to 7 or one of {', '.join(PRIORITIES)}, not {priority!r}")
    directory = s.str("directory", "")
    if directory and not os.path.isabs(directory):
        s.problem("directory", f"{directory!r} is not an absolute path")
    elif directory and check_dirs:
        if not os.path.isdir(directory):
            s.problem("directory", f"{directory} is not a directory")
        elif not os.access(directory, os.R_OK | os.X_OK):
            s.problem("directory", f"{directory} is not readable by this user")
    journalctl = s.str("journalctl", d.journalctl)
    import shutil  # only for [[journal]] sections: an agent following files does not load it

    if check_dirs and shutil.which(journalctl) is None:
        s.problem("journalctl", f"{journalctl!r} not found (it comes with systemd)")
    cfg = JournalConfig(
        topic=topic, units=units, identifiers=s.str_list("identifiers", ()), priority=str(priority),
        matches=matches, start_at=s.choice("start_at", d.start_at, ("beginning", "end")),
        directory=directory.rstrip("/") if directory != "/" else directory, journalctl=journalctl,
        max_line_bytes=s.int("max_line_bytes", d.max_line_bytes, 256, MAX_BATCH_BYTES))
    s.finish()
    return cfg


def parse(data: dict[str, Any], source: str, check_dirs: bool = True) -> Config:
    problems: list[str] = []
    root = Section(data, "", problems)
    s = root.table("agent")
    d = AgentConfig(name="")
    state_dir = s.str("state_dir", d.state_dir)
    cfg = AgentConfig(
        name=s.str("name", socket.gethostname(), lambda v: None if 0 < len(v) <= 200 and v.isprintable()
                   else "must be 1 to 200 printable characters"),
        state_dir=state_dir,
        mode=s.choice("mode", d.mode, ("push", "pub")),
        data=s.endpoint("data", d.data),
        control=s.endpoint("control", d.control),
        aggregators=_parse_aggregators(s),
        # "" (the documented default) means the default socket.
        status_socket=s.str("status_socket", "", lambda v: endpoint_problem(v) if v else None),
        batch_max_lines=s.int("batch_max_lines", d.batch_max_lines, 1),
        batch_max_bytes=s.int("batch_max_bytes", d.batch_max_bytes, 1024, MAX_BATCH_BYTES),
        batch_max_delay_ms=s.int("batch_max_delay_ms", d.batch_max_delay_ms, 0, 60_000),
        max_inflight_bytes=s.int("max_inflight_bytes", d.max_inflight_bytes, wire.MIN_INFLIGHT_BYTES),
        ack_timeout_ms=s.int("ack_timeout_ms", d.ack_timeout_ms, 100),
        heartbeat_interval_ms=s.int("heartbeat_interval_ms", d.heartbeat_interval_ms, 50),
        checkpoint_interval_ms=s.int("checkpoint_interval_ms", d.checkpoint_interval_ms, 10),
        rescan_interval_ms=s.int("rescan_interval_ms", d.rescan_interval_ms, 50),
        latency_budget_ms=s.int("latency_budget_ms", d.latency_budget_ms, 2, 10_000),
        watch_debounce_ms=s.int("watch_debounce_ms", d.watch_debounce_ms, 0, 10_000),
        watch_step_ms=s.int("watch_step_ms", d.watch_step_ms, 0, 10_000),
        watch_idle_step_ms=s.int("watch_idle_step_ms", d.watch_idle_step_ms, 1, 10_000),
        force_polling=s.bool("force_polling", d.force_polling),
        max_open_files=s.int("max_open_files", d.max_open_files, 8),
        idle_close_s=s.int("idle_close_s", d.idle_close_s, 1),
        rotated_keep_s=s.int("rotated_keep_s", d.rotated_keep_s, 1),
        shutdown_timeout_s=s.int("shutdown_timeout_s", d.shutdown_timeout_s, 1, 3600),
        curve_server_key=s.str("curve_server_key", ""),
        curve_secret_key=s.str("curve_secret_key", ""),
        metrics_listen=s.str("metrics_listen", "", listen_problem),
        log_level=s.choice("log_level", d.log_level, ("debug", "info", "warning", "error")),
        loop=s.choice("loop", d.loop, ("uvloop", "asyncio")),
    )
    s.finish()
    sources = tuple(_parse_source(t) for t in root.tables("sources"))
    journals = tuple(_parse_journal(t, check_dirs) for t in root.tables("journal"))
    root.finish()
    seen: dict[str, int] = {}
    for i, j in enumerate(journals):
        if j.key in seen:
            problems.append(f"journal[{i}]: the same topic and matches as journal[{seen[j.key]}]")
        seen.setdefault(j.key, i)
    _check_keys(cfg, problems)
    if check_dirs and (message := dir_problem(cfg.state_dir, create=True)) is not None:
        problems.append(f"agent.state_dir: {message}")
    if check_dirs:
        for i, src in enumerate(sources):
            for pattern in src.paths:
                if (message := _root_problem(glob_root(pattern))) is not None:
                    problems.append(f"sources[{i}].paths: {message}")
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return Config(agent=cfg, sources=sources, source=source, journals=journals)


def _root_problem(root: str) -> str | None:
    """Why the agent could never read files under ``root``, or None. A directory that does not
    exist yet is fine (the rescan finds it when it appears); one behind a directory this user
    may not enter, or one it may not list, is not."""
    located = nearest_existing(root)
    if isinstance(located, str):
        return located
    found, st = located
    if stat.S_ISDIR(st.st_mode) and not os.access(found, os.R_OK | os.X_OK):
        return f"{found} is not readable by this user"
    return None


def _check_keys(cfg: AgentConfig, problems: list[str]) -> None:
    if bool(cfg.curve_server_key) != bool(cfg.curve_secret_key):
        problems.append("agent: curve_server_key and curve_secret_key go together")
        return
    if not cfg.curve_secret_key:
        return
    try:
        curve.load_public(cfg.curve_server_key)
    except curve.KeyError_ as exc:
        problems.append(f"agent.curve_server_key: {exc}")
    try:
        curve.load_secret(cfg.curve_secret_key)
    except curve.KeyError_ as exc:
        problems.append(f"agent.curve_secret_key: {exc}")


def load_config(path: str | None, overrides: list[str] | None = None, check_dirs: bool = True) -> Config:
    """Load ``path`` (or the default file if it exists, else built-in defaults) plus ``--set`` items."""
    data: dict[str, Any] = {}
    source = "<built-in defaults>"
    if path is not None or os.path.exists(DEFAULT_PATH):
        source = path or DEFAULT_PATH
        data = read_toml(source)
    apply_overrides(data, overrides or [])
    return parse(data, source, check_dirs=check_dirs)


__all__ = ["AgentConfig", "AggregatorEndpoints", "Config", "ConfigError", "JournalConfig", "SourceConfig",
           "load_config"]
