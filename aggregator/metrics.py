"""Prometheus metrics of the aggregator, served on ``metrics_listen`` (HOST:PORT; empty = off).

Nothing is counted for Prometheus on the hot path: a custom collector reads the daemon's own
counters (the ones ``aggregatorctl status`` shows) when a scrape comes, from the HTTP server's
thread. Only plain reads and C-level copies of dicts happen there (``list(d.items())`` holds the
GIL for the whole copy), so the event loop is never locked or slowed. prometheus-client is only
imported when metrics are turned on.

Metrics (all prefixed ``fleetlog_aggregator_``):

    lines_total{topic}, bytes_total{topic}          written to the topic's files (bytes as written)
    agent_lines_total{agent}, agent_bytes_total{agent}
    agent_lag_bytes{agent}                          what the agent has not had acknowledged (heartbeats)
    agent_lag_seconds{agent}                        how old its oldest unacknowledged line is
    agent_connected{agent}, agent_last_seen_seconds{agent}
    dropped_lines_total{reason="duplicate"}         resent lines already committed, or already in
                                                    the JetStream stream (sink = "jetstream")
    dropped_messages_total{reason}                  malformed frames, by reason
    refusals_total{reason}                          clients refused (CURVE): unknown_key, revoked_key,
                                                    no_curve, bad_server_key, protocol
    refused_peer_total{address, key, reason}        the same per peer (the last 1000 distinct ones)
    resyncs_total, write_errors_total, batches_total, commits_total
    early_commits_total                             commits before commit_interval_ms was up
    commit_interval_seconds                         commit_interval_ms in force
    commit_seconds (histogram)                      fsync of the files + journal record (or publish)
    pending_bytes                                   accepted, not yet committed
    agent_window_bytes{agent}                       flow control: the window granted to each agent
    window_share_bytes, agents_catching_up          each catching-up agent's share of the budget
    rotations_total, retention_removed_total        rotated files made, and removed by retention
    journal_bytes                                   the commit journal's size
    output_used_bytes, output_total_bytes           the output_dir file system
    active_file_bytes{topic}, loop_stall_seconds, compressions_running, streams
    output_free_bytes, output_writable              disk of output_dir
    info{instance, version}                         (fleetlog_aggregator_info)

With ``sink = "jetstream"`` (instead of journal_bytes and the output_* disk gauges):

    jetstream_connected, jetstream_healthy          connected to a server; 0 while last_error is set
    jetstream_queued_bytes, jetstream_queued_batches   accepted, not yet acknowledged by JetStream
    jetstream_max_message_bytes                     the largest message the server and stream take
    jetstream_published_total (messages), jetstream_published_bytes_total,
    jetstream_published_lines_total
    jetstream_duplicates_total (messages answered "duplicate"), jetstream_precondition_refusals_total
    jetstream_already_in_batches_total, jetstream_already_in_lines_total,
    jetstream_already_in_bytes_total                what the stream held already: dropped (the lines
                                                    are in dropped_lines_total{reason="duplicate"} too)
    jetstream_resyncs_total, jetstream_retries_total, jetstream_full_refusals_total,
    jetstream_split_messages_total, jetstream_cut_lines_total, jetstream_cut_bytes_total,
    jetstream_reads_total (a subject's last message read), jetstream_errors_total,
    jetstream_gaps_accepted_total, jetstream_reconnects_total
                                                    the sink's counters, as in aggregatorctl status
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fleetlog import __version__
from fleetlog.metrics import MetricsServer

if TYPE_CHECKING:
    from aggregator.daemon import Aggregator

log = logging.getLogger("fleetlog.aggregator.metrics")

PREFIX = "fleetlog_aggregator_"


class LatencyHistogram:
    """Cumulative-bucket histogram without locks or imports: one bisect per observation."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), list(self.counts), strict=True):
            running += count
            out.append((bound, running))
        return out


class AggregatorCollector:
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        agg = self.agg
        t = agg.totals
        topics = list(agg.topics.items())
        agents = list(agg.agents.values())
        files = list(agg.sink.files.items())

        def counter(name: str, doc: str, labels: list[str] | None = None) -> Any:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str] | None = None, value: float | None = None) -> Any:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels, value=value)

        # InfoMetricFamily appends _info itself: fleetlog_aggregator_info.
        yield InfoMetricFamily(PREFIX.rstrip("_"), "The running aggregator",
                               value={"instance": agg.instance, "version": __version__})
        lines = counter("lines", "Lines written, per topic", ["topic"])
        nbytes = counter("bytes", "Bytes written (as formatted), per topic", ["topic"])
        for name, s in topics:
            lines.add_metric([name], s.lines)
            nbytes.add_metric([name], s.bytes)
        yield lines
        yield nbytes

        now = time.monotonic()
        a_lines = counter("agent_lines", "Lines written, per agent", ["agent"])
        a_bytes = counter("agent_bytes", "Bytes written (as formatted), per agent", ["agent"])
        a_lag = gauge("agent_lag_bytes", "Bytes an agent has not shipped yet (from its heartbeats)",
                      ["agent"])
        a_conn = gauge("agent_connected", "1 if the agent was heard from within agent_timeout_s",
                       ["agent"])
        a_seen = gauge("agent_last_seen_seconds", "Seconds since the agent was last heard from",
                       ["agent"])
        a_lag_s = gauge("agent_lag_seconds", "How old the agent's oldest unacknowledged line is (heartbeats)",
                        ["agent"])
        a_window = gauge("agent_window_bytes", "The in-flight window last granted to the agent", ["agent"])
        for a in agents:
            a_lag_s.add_metric([a.name], a.lag_s)
            a_window.add_metric([a.name], a.window)
            a_lines.add_metric([a.name], a.lines)
            a_bytes.add_metric([a.name], getattr(a, "bytes", 0))
            a_lag.add_metric([a.name], a.lag_bytes)
            a_conn.add_metric([a.name], 1 if a.connected else 0)
            if a.last_seen:
                a_seen.add_metric([a.name], round(now - a.last_seen, 3))
        yield from (a_lines, a_bytes, a_lag, a_conn, a_seen, a_lag_s, a_window)

        js = agg.stream_sink.status() if agg.stream_sink is not None else None
        dup = counter("dropped_lines", "Lines dropped, by reason (duplicate: resent, already committed"
                      " or already in the JetStream stream)", ["reason"])
        dup.add_metric(["duplicate"], t.duplicates_dropped + (js["already_in_lines"] if js else 0))
        yield dup
        bad = counter("dropped_messages", "Malformed messages dropped, by reason", ["reason"])
        for reason, n in sorted(dict(t.malformed).items()):
            bad.add_metric([reason], n)
        yield bad
        refusals = agg.guard.refusals
        by_reason = counter("refusals", "Clients refused (CURVE: unknown or revoked key, no CURVE, a"
                            " stale server key), by reason", ["reason"])
        # Every known reason from the start (at 0), so that rates and alerts have a series.
        known = dict.fromkeys(("unknown_key", "revoked_key", "no_curve", "bad_server_key", "protocol"), 0)
        for reason, n in sorted((known | dict(refusals.by_reason)).items()):
            by_reason.add_metric([reason], n)
        yield by_reason
        peers = counter("refused_peer", "Refusals per peer address, key and reason (the last"
                        " 1000 distinct ones)", ["address", "key", "reason"])
        for r in list(refusals.peers.values()):
            peers.add_metric([r.address, r.key, r.reason], r.count)
        yield peers
        yield from (
            _value(counter("resyncs", "Batches refused because they did not continue their stream"),
                   t.resyncs),
            _value(counter("write_errors", "Writes to the output that failed"), t.write_errors),
            _value(counter("batches", "Batches accepted"), t.batches),
            _value(counter("commits", "Group commits (fsync + journal record)"), t.commits),
            _value(counter("early_commits", "Group commits before commit_interval_ms was up"
                           " (commit_max_bytes, an agent's window half uncommitted, a resend)"),
                   t.early_commits),
            _value(counter("rotations", "Active files rolled over"), t.rotations),
            _value(counter("retention_removed", "Rotated files removed by retention"), t.retention_removed),
        )

        hist = agg.commit_latency
        buckets = hist.cumulative()
        yield HistogramMetricFamily(PREFIX + "commit_seconds",
                                    "Time to make a group commit durable (fsync files + journal)",
                                    buckets=buckets, sum_value=hist.sum)

        yield gauge("commit_interval_seconds", "The group commit interval in force (commit_interval_ms)",
                    value=agg.cfg.commit_interval_ms / 1000)
        yield gauge("pending_bytes", "Bytes accepted but not committed yet", value=agg.pending_bytes)
        if agg.window is not None:
            yield gauge("window_share_bytes", "Each catching-up agent's share of window_budget_bytes",
                        value=agg.window)
        yield gauge("agents_catching_up", "Agents with at least 1 MiB of lag, sharing the window budget",
                    value=agg.catching_up)
        active = gauge("active_file_bytes", "Size of each topic's active file", ["topic"])
        for name, tf in files:
            active.add_metric([name], tf.size)
        yield active
        yield gauge("loop_stall_seconds", "The event loop's longest stall in the last 10-20 s (how late"
                    " its timers fired)", value=max(agg.loop_stall_windows))
        yield gauge("compressions_running", "Rotated files being compressed",
                    value=len(agg._compressions))
        yield gauge("streams", "Streams (agent file incarnations) known", value=len(agg.accepted))
        yield gauge("output_writable", "0 while writes to the output fail (nothing is acknowledged)",
                    value=0 if agg.disk_error else 1)
        if js is not None:
            yield from _jetstream_metrics(js, counter, gauge)
            return
        with contextlib.suppress(OSError):
            yield gauge("journal_bytes", "Size of the commit journal",
                        value=os.path.getsize(agg.journal.journal_path))
        try:
            usage = shutil.disk_usage(agg.cfg.output_dir)
        except OSError:
            return
        yield gauge("output_free_bytes", "Free space on the output_dir file system", value=usage.free)
        yield gauge("output_used_bytes", "Used space on the output_dir file system", value=usage.used)
        yield gauge("output_total_bytes", "Size of the output_dir file system", value=usage.total)


# The JetStream sink's counters (JetStreamSink.status()) as metrics: (counter field, metric name
# without the prefix and _total, help). Every counter the sink keeps is here (a test checks it);
# the names exported before (published, duplicates: messages) stay as they were.
JETSTREAM_COUNTERS = (
    ("published", "jetstream_published", "Messages JetStream acknowledged"),
    ("published_bytes", "jetstream_published_bytes", "Bytes (headers excluded) of the messages JetStream"
     " acknowledged"),
    ("published_lines", "jetstream_published_lines", "Lines in the messages JetStream acknowledged"),
    ("duplicates", "jetstream_duplicates", "Publishes JetStream answered as duplicates (inside"
     " its window)"),
    ("precondition_refusals", "jetstream_precondition_refusals", "Publishes refused by the"
     " expected-last-subject-sequence precondition"),
    ("already_in", "jetstream_already_in_batches", "Batches the stream held already (resent after a"
     " crash, or published by another aggregator): dropped, acknowledged"),
    ("already_in_lines", "jetstream_already_in_lines", "Lines the stream held already (in"
     " dropped_lines_total{reason=\"duplicate\"} too)"),
    ("already_in_bytes", "jetstream_already_in_bytes", "Bytes the stream held already"),
    ("resyncs", "jetstream_resyncs", "Streams an agent was asked to resend from the stream's end"),
    ("retries", "jetstream_retries", "Publishes and reads retried after a timeout or no responders"),
    ("full_refusals", "jetstream_full_refusals", "Publishes refused because the stream is full"),
    ("split_messages", "jetstream_split_messages", "Messages cut from a batch over the server's"
     " max_payload"),
    ("cut_lines", "jetstream_cut_lines", "Lines cut because alone they exceed the server's max_payload"),
    ("cut_bytes", "jetstream_cut_bytes", "Bytes dropped from the lines cut"),
    ("reads", "jetstream_reads", "Reads of a subject's last message (to reconcile)"),
    ("errors", "jetstream_errors", "Refusals and foreign messages that stop a subject"),
    ("gaps_accepted", "jetstream_gaps_accepted", "Stream gaps accepted (the stream lost bytes the"
     " agent can no longer send)"),
    ("reconnects", "jetstream_reconnects", "Connections to NATS regained after a loss"),
)


def _jetstream_metrics(js: dict[str, Any], counter: Any, gauge: Any) -> Iterator[Any]:
    """sink = "jetstream": the publisher's state and counters (aggregator/jetstream/)."""
    yield gauge("jetstream_connected", "1 while connected to a NATS server",
                value=1 if js["connected"] else 0)
    yield gauge("jetstream_queued_bytes", "Accepted bytes not yet acknowledged by JetStream",
                value=js["queued_bytes"])
    yield gauge("jetstream_queued_batches", "Accepted batches not yet acknowledged by JetStream",
                value=js["queued_batches"])
    if js["max_payload"] is not None:
        yield gauge("jetstream_max_message_bytes", "The largest message the server and the stream take"
                    " (headers included)", value=js["max_payload"])
    yield gauge("jetstream_healthy", "0 while the sink has an error (last_error: not connected, stream"
                " full, refusals)", value=0 if js["last_error"] else 1)
    for field, name, doc in JETSTREAM_COUNTERS:
        yield _value(counter(name, doc), js[field])


def _value(family: Any, value: float) -> Any:
    family.add_metric([], value)
    return family


def serve(agg: Aggregator) -> MetricsServer | None:
    listen = getattr(agg.cfg, "metrics_listen", "")
    if not listen:
        return None
    return MetricsServer(listen, AggregatorCollector(agg))
