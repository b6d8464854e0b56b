"""``fleetlog-aggregator`` / ``python -m aggregator``: argv, logging and exit codes live here."""

from __future__ import annotations

import sys

from aggregator.config import DEFAULT_PATH, load_config
from aggregator.daemon import Aggregator
from fleetlog import curve
from fleetlog.service import Service

SERVICE = Service(
    prog="fleetlog-aggregator",
    description="The central fleetlog aggregator: takes batches from agents (push or pub), "
                "writes them exactly once into per-topic rolling files under output_dir (or into "
                "NATS JetStream), and answers aggregatorctl.",
    epilog="Run as a service (systemd unit fleetlog-aggregator). SIGTERM stops it cleanly "
           "(what it holds is committed and acknowledged), SIGHUP reopens its files and "
           "reloads its config. Exit status: 0 stopped cleanly, 1 could not start or failed, "
           "2 bad config or usage. Examples: fleetlog-aggregator --check-config; "
           "fleetlog-aggregator --config /etc/fleetlog/aggregator.toml",
    default_config=DEFAULT_PATH,
    example_set="aggregator.output_dir=/tmp/out",
    load_config=load_config,
    section="aggregator",
    make=lambda config, overrides: Aggregator(config, overrides=overrides),
    busy_endpoint="is another aggregator using the endpoint?",
    start_errors=(curve.KeyError_,),
)


def main(argv: list[str] | None = None) -> int:
    return SERVICE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
