"""``fleetlog-writer`` / ``python -m writer``: argv, logging and exit codes live here."""

from __future__ import annotations

import sys

from fleetlog.service import Service
from writer.config import DEFAULT_PATH, load_config
from writer.daemon import Writer

SERVICE = Service(
    prog="fleetlog-writer",
    description="Reads the NATS JetStream stream that fleetlog aggregators write into and makes "
                "the per-topic rolling files under output_dir, every line exactly once.",
    epilog="Run as a service (systemd unit fleetlog-writer). SIGTERM stops it cleanly (what it "
           "applied is committed), SIGHUP reopens its files and reloads its config. Exit status: 0 "
           "stopped cleanly, 1 could not start or failed, 2 bad config or usage. Status: "
           "aggregatorctl --control <writer control endpoint> status",
    default_config=DEFAULT_PATH,
    example_set="writer.output_dir=/tmp/out",
    load_config=load_config,
    section="writer",
    make=lambda config, overrides: Writer(config, overrides=overrides),
    busy_endpoint="is another writer using the control endpoint?",
)


def main(argv: list[str] | None = None) -> int:
    return SERVICE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
