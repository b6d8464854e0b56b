"""What the aggregator's and the writer's command lines share: their options, config errors,
the serving with signals, and the exit codes (0 stopped cleanly, 1 could not start or failed,
2 bad config or usage). The agent's has subcommands of its own (agent/__main__.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from fleetlog import __version__, runtime
from fleetlog.dirlock import DirectoryInUse
from fleetlog.tomlconf import ConfigError


class Daemon(Protocol):
    async def serve(self) -> None: ...
    def request_stop(self) -> None: ...
    def reload(self) -> Coroutine[Any, Any, Any]: ...


@dataclass(frozen=True)
class Service:
    """One daemon's command line: ``prog`` (fleetlog-aggregator), its help texts, the config
    file read when --config is not given, how to load a config (path, --set items; raises
    ConfigError) and make the daemon, which section of the config holds ``log_level`` and
    ``loop``, what else means "cannot start", and what a busy endpoint suggests."""

    prog: str
    description: str
    epilog: str
    default_config: str
    example_set: str
    load_config: Callable[[str | None, list[str]], Any]
    section: str
    make: Callable[[Any, list[str]], Daemon]
    busy_endpoint: str
    start_errors: tuple[type[BaseException], ...] = ()

    def parse_args(self, argv: list[str] | None) -> argparse.Namespace:
        p = argparse.ArgumentParser(prog=self.prog, description=self.description, epilog=self.epilog)
        p.add_argument("--config", metavar="PATH",
                       help=f"TOML config (default {self.default_config} if it exists, else built-in"
                            " defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a config key, e.g. --set {self.example_set}")
        p.add_argument("--check-config", action="store_true", help="validate the config and exit")
        p.add_argument("--version", action="version", version=f"fleetlog {__version__}")
        return p.parse_args(argv)

    def main(self, argv: list[str] | None = None) -> int:
        args = self.parse_args(argv)
        try:
            config = self.load_config(args.config, args.set)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{self.prog}: config: {problem}", file=sys.stderr)
            return 2
        if args.check_config:
            print(f"{self.prog}: {config.source}: ok")
            return 0
        section = getattr(config, self.section)
        runtime.setup_logging(section.log_level)
        return runtime.run(self._serve(config, args.set), loop=section.loop)

    async def _serve(self, config: Any, overrides: list[str]) -> int:
        log = logging.getLogger(f"fleetlog.{self.section}")
        daemon = self.make(config, overrides)
        try:
            runtime.install_signals(daemon.request_stop, lambda: _spawn(daemon.reload()))
            await daemon.serve()
        except DirectoryInUse as exc:
            log.error("cannot start: %s", exc)
            return 1
        except zmq.ZMQError as exc:
            log.error("cannot start: %s (%s)", exc, self.busy_endpoint)
            return 1
        except Exception as exc:
            if not isinstance(exc, (OSError, *self.start_errors)):
                raise
            log.error("cannot start: %s", exc)
            return 1
        if runtime.failed_tasks:
            log.error("stopped after a fatal error in %s", ", ".join(runtime.failed_tasks))
            return 1
        return 0


_background: set[asyncio.Future[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a reload in the background (from a signal handler), keeping a reference to it."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
