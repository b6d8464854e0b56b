"""``fleetlog-writer`` / ``python -m writer``: argv, logging and exit codes live here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import zmq

from fleetlog import __version__, runtime
from fleetlog.dirlock import DirectoryInUse
from fleetlog.tomlconf import ConfigError
from writer.config import Config, load_config
from writer.daemon import Writer

log = logging.getLogger("fleetlog.writer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fleetlog-writer",
        description="Reads the NATS JetStream stream that fleetlog aggregators write into and makes "
                    "the per-topic rolling files under output_dir, every line exactly once.",
        epilog="Run as a service (systemd unit fleetlog-writer). SIGTERM stops it cleanly (what it "
               "applied is committed), SIGHUP reopens its files and reloads its config. Exit status: 0 "
               "stopped cleanly, 1 could not start or failed, 2 bad config or usage. Status: "
               "aggregatorctl --control <writer control endpoint> status")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config (default /etc/fleetlog/writer.toml if it exists, else built-in"
                        " defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set writer.output_dir=/tmp/out")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version=f"fleetlog {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"fleetlog-writer: config: {problem}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"fleetlog-writer: {config.source}: ok")
        return 0
    runtime.setup_logging(config.writer.log_level)
    return runtime.run(_serve(config, args.set), loop=config.writer.loop)


async def _serve(config: Config, overrides: list[str]) -> int:
    writer = Writer(config, overrides=overrides)
    try:
        runtime.install_signals(writer.request_stop, lambda: _spawn(writer.reload()))
        await writer.serve()
    except DirectoryInUse as exc:
        log.error("cannot start: %s", exc)
        return 1
    except zmq.ZMQError as exc:
        log.error("cannot start: %s (is another writer using the control endpoint?)", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    if runtime.failed_tasks:
        log.error("stopped after a fatal error in %s", ", ".join(runtime.failed_tasks))
        return 1
    return 0


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


if __name__ == "__main__":
    sys.exit(main())
