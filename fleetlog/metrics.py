"""What both daemons' Prometheus endpoints share: the HTTP server on a private registry."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fleetlog.metrics")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9101`` for IPv6) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """prometheus-client's HTTP server (a daemon thread) on a private registry."""

    def __init__(self, listen: str, collector: Any) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        host, port = parse_listen(listen)
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics_listen {listen}: {exc.strerror}") from None
        log.info("metrics on http://%s/metrics", listen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
