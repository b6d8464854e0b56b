"""Prometheus metrics of fleetlog-writer on ``metrics_listen`` (HOST:PORT; empty = off).

As the aggregator's (aggregator/metrics.py): a collector reads the daemon's own counters when a
scrape comes, from the HTTP server's thread; nothing is counted for Prometheus on the hot path.

Metrics (all prefixed ``fleetlog_writer_``):

    lag_messages                    stream last sequence - last applied
    lag_seconds                     age of the oldest message not applied yet
    discarded_unwritten_total       stream messages discarded (limits, deletes) before this writer wrote them
    discarded_alarm                 1 from such a discard until the writer has caught up
    applied_sequence, stream_last_sequence
    lines_total{topic}, bytes_total{topic}
    dropped_lines_total{reason="duplicate"}, malformed_messages_total{reason}
    stream_gaps_total, messages_total, commits_total, rotations_total, retention_removed_total,
    consumers_total, commit_seconds (histogram), output_writable, nats_connected
    info{instance, version}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fleetlog import __version__
from fleetlog.metrics import MetricsServer

if TYPE_CHECKING:
    from writer.daemon import Writer

PREFIX = "fleetlog_writer_"


class WriterCollector:
    def __init__(self, writer: Writer) -> None:
        self.w = writer

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        w = self.w
        t = w.totals

        def counter(name: str, doc: str, value: float | None = None, labels: list[str] | None = None) -> Any:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            if value is not None:
                family.add_metric([], value)
            return family

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        yield InfoMetricFamily(PREFIX.rstrip("_"), "The running writer",
                               value={"instance": w.instance, "version": __version__})
        yield gauge("lag_messages", "Messages in the stream not applied yet", w.lag_messages)
        if w.lag_s is not None:
            yield gauge("lag_seconds", "Age of the oldest message not applied yet", w.lag_s)
        yield counter("discarded_unwritten", "Stream messages discarded before this writer wrote them",
                      t.discarded_unwritten)
        yield gauge("discarded_alarm", "1 from a discard of unwritten messages until caught up",
                    1 if w.alarm is not None else 0)
        yield gauge("applied_sequence", "The last stream sequence applied to the files", w.applied_seq)
        yield gauge("stream_last_sequence", "The stream's last sequence", w.stream.last_seq)
        lines = counter("lines", "Lines written, per topic", labels=["topic"])
        nbytes = counter("bytes", "Bytes written (as formatted), per topic", labels=["topic"])
        for name, s in list(w.applier.topics.items()):
            lines.add_metric([name], s.lines)
            nbytes.add_metric([name], s.bytes)
        yield lines
        yield nbytes
        dup = counter("dropped_lines", "Lines dropped, by reason (duplicate: already written)",
                      labels=["reason"])
        dup.add_metric(["duplicate"], t.duplicates_dropped)
        yield dup
        bad = counter("malformed_messages", "Messages that are not fleetlog v1, by reason", labels=["reason"])
        for reason, n in sorted(dict(t.malformed).items()):
            bad.add_metric([reason], n)
        yield bad
        yield counter("stream_gaps", "Messages starting past their (agent, stream)'s end", t.stream_gaps)
        yield counter("messages", "Messages applied", t.messages_applied)
        yield counter("commits", "Group commits (fsync + journal record)", t.commits)
        yield counter("rotations", "Active files rolled over", t.rotations)
        yield counter("retention_removed", "Rotated files removed by retention", t.retention_removed)
        yield counter("consumers", "Consumers made (starts, reconnects, gaps read again)", t.consumers_made)
        hist = w.commit_latency
        yield HistogramMetricFamily(PREFIX + "commit_seconds", "Time to make a group commit durable",
                                    buckets=hist.cumulative(), sum_value=hist.sum)
        yield gauge("output_writable", "0 while writes to the output fail", 0 if w.disk_error else 1)
        yield gauge("nats_connected", "1 while connected to a NATS server", 1 if w.source.connected else 0)


def serve(writer: Writer) -> MetricsServer | None:
    listen = writer.wcfg.metrics_listen
    if not listen:
        return None
    return MetricsServer(listen, WriterCollector(writer))
