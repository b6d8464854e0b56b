"""Reading TOML config files into typed values, collecting every problem with its key path.

Both daemons' ``config.py`` use this so that ``--check-config`` reports all mistakes at once
(``agent.mode: must be one of push, pub``), unknown keys included, and never a traceback.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")

_ENDPOINT_RE = re.compile(r"^(tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}|ipc://.+|inproc://.+)$")
IPC_PATH_MAX = 100


class ConfigError(Exception):
    """Raised by ``load_config`` with every problem found, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def endpoint_problem(value: str) -> str | None:
    """Why ``value`` is not a ZeroMQ endpoint we can use, or None."""
    if not _ENDPOINT_RE.match(value):
        return f"{value!r} is not an endpoint like tcp://host:port or ipc:///path"
    if value.startswith("tcp://"):
        port = int(value.rsplit(":", 1)[1])
        if not 0 < port < 65536:
            return f"port {port} out of range"
    if value.startswith("ipc://") and len(value[6:].encode()) >= IPC_PATH_MAX:
        return f"ipc path longer than {IPC_PATH_MAX - 1} bytes"
    return None


def listen_problem(value: str) -> str | None:
    """Why ``value`` is not empty (off) or ``HOST:PORT`` for an HTTP listener, or None."""
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{value!r} is not HOST:PORT"
    return None


class Section:
    """One TOML table: typed getters that record problems instead of raising."""

    def __init__(self, data: Any, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        if not isinstance(data, dict):
            self.problem("", f"must be a table, not {type(data).__name__}")
            data = {}
        self.data = dict(data)
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name) if name else self.where}: {message}")

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T,
            check: Callable[[Any], str | None] | None = None) -> T:
        self._seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a config that says `port = true` is a mistake.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.problem(name, f"must be {names}, not {type(value).__name__} {value!r}")
            return default
        if check is not None and (message := check(value)) is not None:
            self.problem(name, message)
            return default
        return cast(T, value)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        return self.str(name, default, lambda v: None if v in choices
                        else f"must be one of {', '.join(choices)}, not {v!r}")

    def endpoint(self, name: str, default: str) -> str:
        return self.str(name, default, endpoint_problem)

    def endpoints(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        self._seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            self.problem(name, "must be an endpoint or a non-empty list of endpoints")
            return default
        bad = [p for v in items if (p := endpoint_problem(v))]
        for message in bad:
            self.problem(name, message)
        return default if bad else tuple(items)

    def str_list(self, name: str, default: tuple[str, ...], allow_empty: bool = True) -> tuple[str, ...]:
        self._seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(name, "must be a list of non-empty strings")
            return default
        if not value and not allow_empty:
            self.problem(name, "must not be empty")
            return default
        return tuple(value)

    def table(self, name: str) -> Section:
        self._seen.add(name)
        return Section(self.data.get(name, {}), self.key(name), self.problems)

    def tables(self, name: str) -> list[Section]:
        self._seen.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list):
            self.problem(name, "must be an array of tables ([[...]])")
            return []
        return [Section(item, f"{self.key(name)}[{i}]", self.problems) for i, item in enumerate(value)]

    def finish(self) -> None:
        """Report the keys nobody asked for: a typo must not pass silently, and the nearest
        known key is suggested (``agent.rescan_intervall_ms: unknown key; did you mean
        rescan_interval_ms?``)."""
        for name in sorted(set(self.data) - self._seen):
            import difflib  # only for a misspelt key: not loaded by a daemon whose config is right

            near = difflib.get_close_matches(name, sorted(self._seen), n=1, cutoff=0.7)
            self.problem(name, f"unknown key; did you mean {near[0]}?" if near else "unknown key")

    # Last in the class: below them, these names would stand for the methods, not the types,
    # in every annotation (for mypy).
    def int(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        def check(value: int) -> str | None:
            if value < minimum:
                return f"must be at least {minimum}, not {value}"
            if maximum is not None and value > maximum:
                return f"must be at most {maximum}, not {value}"
            return None
        return self.get(name, int, default, check)

    def bool(self, name: str, default: bool) -> bool:
        return self.get(name, bool, default)

    def str(self, name: str, default: str, check: Callable[[Any], str | None] | None = None) -> str:
        return self.get(name, str, default, check)


def nearest_existing(path: str) -> tuple[str, os.stat_result] | str:
    """``path`` or its nearest ancestor that exists, with its stat; or why that cannot be known
    (a directory on the way is closed to this user)."""
    current = path
    while True:
        try:
            return current, os.stat(current)
        except FileNotFoundError:
            parent = os.path.dirname(current) or "."
            if parent == current:
                return f"{path}: no existing directory above it"
            current = parent
        except PermissionError:
            return f"{path} cannot be reached by this user (a directory above it is closed to it)"
        except OSError as exc:
            return f"{path}: {exc.strerror}"


def dir_problem(path: str, *, create: bool) -> str | None:
    """Whether a directory can be used (created if missing when ``create``)."""
    located = nearest_existing(path)
    if isinstance(located, str):
        return located
    found, st = located
    if found == path:
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    if not create:
        return f"{path} does not exist"
    if not stat.S_ISDIR(st.st_mode) or not os.access(found, os.W_OK | os.X_OK):
        return f"{path} does not exist and cannot be created under {found}"
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``--set KEY=VALUE`` options into a loaded config.

    VALUE is TOML (``5``, ``true``, ``["a", "b"]``, ``[{paths=["x/*.log"], topic="x"}]``); anything
    that does not parse as TOML is taken as a string, so ``--set agent.name=web-01`` works.
    """
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        try:
            patch = tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError:
            try:
                patch = tomllib.loads(f"{key} = {_toml_string(value)}")
            except tomllib.TOMLDecodeError:
                problems.append(f"--set {item!r}: {key!r} is not a key")
                continue
        _merge(data, patch)
    if problems:
        raise ConfigError(problems)
    return data


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
