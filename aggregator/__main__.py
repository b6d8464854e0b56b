"""``fleetlog-aggregator`` / ``python -m aggregator``: argv, logging and exit codes live here."""

from __future__ import annotations

import argparse
import logging
import sys

import zmq

from aggregator.config import load_config
from aggregator.daemon import Aggregator
from fleetlog import __version__, curve, runtime
from fleetlog.dirlock import DirectoryInUse
from fleetlog.tomlconf import ConfigError

log = logging.getLogger("fleetlog.aggregator")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fleetlog-aggregator",
        description="The central fleetlog aggregator: takes batches from agents (push or pub), "
                    "writes them exactly once into per-topic rolling files under output_dir, and "
                    "answers aggregatorctl.",
        epilog="Run as a service (systemd unit fleetlog-aggregator). SIGTERM stops it cleanly "
               "(what it holds is committed and acknowledged), SIGHUP reopens its files and "
               "reloads its config. Exit status: 0 stopped cleanly, 1 could not start or failed, "
               "2 bad config or usage. Examples: fleetlog-aggregator --check-config; "
               "fleetlog-aggregator --config /etc/fleetlog/aggregator.toml")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config (default /etc/fleetlog/aggregator.toml if it exists, "
                        "else built-in loopback defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set aggregator.output_dir=/tmp/out")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version=f"fleetlog {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"fleetlog-aggregator: config: {problem}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"fleetlog-aggregator: {config.source}: ok")
        return 0
    runtime.setup_logging(config.aggregator.log_level)
    return runtime.run(_serve(config, args.set), loop=config.aggregator.loop)


async def _serve(config, overrides: list[str]) -> int:  # type: ignore[no-untyped-def]
    agg = Aggregator(config, overrides=overrides)
    try:
        runtime.install_signals(agg.request_stop, lambda: _spawn(agg.reload()))
        await agg.serve()
    except DirectoryInUse as exc:
        log.error("cannot start: %s", exc)
        return 1
    except zmq.ZMQError as exc:
        log.error("cannot start: %s (is another aggregator using the endpoint?)", exc)
        return 1
    except (OSError, curve.KeyError_) as exc:
        log.error("cannot start: %s", exc)
        return 1
    if runtime.failed_tasks:
        log.error("stopped after a fatal error in %s", ", ".join(runtime.failed_tasks))
        return 1
    return 0


_background: set = set()  # type: ignore[type-arg]


def _spawn(coro) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


if __name__ == "__main__":
    sys.exit(main())
