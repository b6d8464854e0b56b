"""Prometheus metrics of the agent, served on ``agent.metrics_listen`` (HOST:PORT; empty = off).

As in the aggregator, nothing is counted for Prometheus on the hot path: a custom collector
reads the agent's own counters when a scrape comes, from the HTTP server's thread, using only
plain reads and C-level copies of its dicts and sets. prometheus-client is only imported when
metrics are turned on.

Metrics (all prefixed ``fleetlog_agent_``):

    lines_shipped_total               lines acknowledged as durable by the aggregator
    lines_sent_total, batches_shipped_total, bytes_shipped_total   sent, resends included
    resends_total                     batches shipped again (no ack in time, resync, reconnect)
    unacked_bytes                     shipped, not yet acknowledged as durable (bounded by
                                      window_bytes: the agent stops reading there)
    window_bytes                      max_inflight_bytes, or the aggregator's smaller share
    lag_bytes{topic}                  in the files, not yet acknowledged
    lag_seconds                       how old the oldest line not yet acknowledged is
    files{topic}, open_files, copies_ignored
    journal_lag_entries{topic}        [[journal]] sources: entries not acknowledged yet (read, or
                                      in the journal and not handed over by journalctl)
    journal_lag_seconds{topic}        journal time between the newest entry and the last acknowledged
    journal_entries_acked_total{topic}, journal_entries_missing_total{topic}
                                      (missing: vacuumed before they were read, see the README)
    nul_bytes_skipped_total           runs of NULs where a line starts (copytruncate holes), skipped
    connected                         1 once the aggregator answered the hello
    aggregator_switches_total         moves to another aggregator (several configured)
    info{agent, mode, version}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent.tail import Tailer
from fleetlog import __version__
from fleetlog.metrics import MetricsServer

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("fleetlog.agent.metrics")

PREFIX = "fleetlog_agent_"


class AgentCollector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        a = self.agent
        tailers = list(a.tailers.values())
        unacked = list(a.unacked)
        transport = a.transport

        def one(family: Any, value: float) -> Any:
            family.add_metric([], value)
            return family

        # InfoMetricFamily appends _info itself: fleetlog_agent_info.
        yield InfoMetricFamily(PREFIX.rstrip("_"), "The running agent",
                               value={"agent": a.cfg.name, "mode": a.cfg.mode, "version": __version__})
        yield one(CounterMetricFamily(PREFIX + "lines_shipped", "Lines acknowledged as durable"),
                  a.lines_shipped)
        yield one(CounterMetricFamily(PREFIX + "lines_sent", "Lines sent (resends included)"), a.lines_sent)
        yield one(CounterMetricFamily(PREFIX + "batches_shipped", "Batches shipped (resends included)"),
                  a.batches_shipped)
        yield one(CounterMetricFamily(PREFIX + "bytes_shipped", "Bytes of batch bodies sent"),
                  transport.sent_bytes if transport is not None else 0)
        yield one(CounterMetricFamily(PREFIX + "resends", "Times batches were shipped again"), a.resends)
        inflight = getattr(a, "inflight", None)
        if inflight is None:
            inflight = sum(t.ship_pos - t.acked for t in unacked)
        yield one(GaugeMetricFamily(PREFIX + "unacked_bytes",
                                    "Bytes shipped but not acknowledged as durable yet"), inflight)
        yield one(GaugeMetricFamily(PREFIX + "window_bytes",
                                    "In-flight window: max_inflight_bytes or the aggregator's share"),
                  a.window)
        lag = GaugeMetricFamily(PREFIX + "lag_bytes", "Bytes in the files not acknowledged yet, per topic",
                                labels=["topic"])
        files = GaugeMetricFamily(PREFIX + "files", "Files followed, per topic", labels=["topic"])
        per_topic: dict[str, list[int]] = {}
        for t in tailers:
            entry = per_topic.setdefault(t.source.topic, [0, 0])
            entry[0] += t.lag_bytes
            entry[1] += 1
        for topic, (lag_bytes, count) in sorted(per_topic.items()):
            lag.add_metric([topic], lag_bytes)
            files.add_metric([topic], count)
        yield lag
        yield files
        yield one(GaugeMetricFamily(PREFIX + "lag_seconds",
                                    "How old the oldest line not yet acknowledged is (0: none)"), a.lag_s)
        yield one(GaugeMetricFamily(PREFIX + "open_files", "Followed files with an open descriptor"),
                  sum(1 for t in tailers if t.fd is not None))
        yield one(GaugeMetricFamily(PREFIX + "copies_ignored", "Copies of followed files not shipped"),
                  len(a.shadows))
        yield one(CounterMetricFamily(PREFIX + "nul_bytes_skipped", "NUL runs where a line starts, skipped"),
                  Tailer.nul_bytes_total)
        yield one(GaugeMetricFamily(PREFIX + "connected", "1 once the aggregator answered the hello"),
                  1 if transport is not None and transport.instance else 0)
        yield one(CounterMetricFamily(PREFIX + "aggregator_switches",
                                      "Moves to another aggregator (several configured)"),
                  transport.failover.switches if transport is not None else 0)
        yield from journal_metrics(a)


def journal_metrics(a: Agent) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    journals = getattr(a, "journals", None)
    sources = list(journals.sources) if journals is not None else []
    labels = ["topic"]
    lag = GaugeMetricFamily(PREFIX + "journal_lag_entries", "Journal entries not acknowledged yet",
                            labels=labels)
    lag_s = GaugeMetricFamily(PREFIX + "journal_lag_seconds",
                              "Journal time between the newest entry and the last acknowledged",
                              labels=labels)
    acked = CounterMetricFamily(PREFIX + "journal_entries_acked", "Journal entries acknowledged",
                                labels=labels)
    missing = CounterMetricFamily(PREFIX + "journal_entries_missing",
                                  "Journal entries vacuumed or rotated away before they were read",
                                  labels=labels)
    # A section over a directory of several machines has a source per machine: one row per topic.
    totals: dict[str, list[float]] = {}
    for src in sources:
        entries, seconds = src.last_lag  # computed on the event loop (the ring is not ours to walk)
        t = totals.setdefault(src.cfg.topic, [0, 0.0, 0, 0])
        t[0] += entries
        t[1] = max(t[1], seconds)
        t[2] += src.entries_acked
        t[3] += src.entries_missing
    for topic, (entries, seconds, n_acked, n_missing) in totals.items():
        lag.add_metric([topic], entries)
        lag_s.add_metric([topic], seconds)
        acked.add_metric([topic], n_acked)
        missing.add_metric([topic], n_missing)
    yield from (lag, lag_s, acked, missing)


def serve(agent: Agent) -> MetricsServer | None:
    listen = getattr(agent.cfg, "metrics_listen", "")
    if not listen:
        return None
    return MetricsServer(listen, AgentCollector(agent))
