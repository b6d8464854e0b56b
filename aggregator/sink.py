"""Where accepted batches go: the sink interface.

A sink receives each accepted batch with its identity, ``Accepted`` (topic, agent, stream, the
byte range of the source stream it covers, its lines) and, at each group commit, says which of
them are durable; only those are acknowledged to the agents. Two sinks implement it:

* ``files`` (aggregator/files.py, the embedded default): per-topic rolling files. A batch is
  durable once its file is fsynced and the commit journal (aggregator/journal.py) records the
  file's length and the stream's end offset (aggregator/commit.py does both). The journal is
  the acceptance table: after a restart it says where each stream stands.
* ``jetstream`` (aggregator/jetstream/): a NATS JetStream stream shared by several
  aggregators. A batch is durable once JetStream acknowledged its publish; the stream itself is
  the acceptance table (a precondition on each subject's last sequence refuses a batch another
  aggregator already published), so a batch may come back as "resend from here" (resync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Accepted:
    """One batch the acceptance stage took: it continues its stream exactly.

    ``start``/``end`` are byte offsets of the source stream (for a journal source, entry
    counts); ``lines`` counts the lines in ``text``; ``text`` is the output bytes (the files
    sink: formatted as the topic's format says; the JetStream sink: the raw lines, each ending in
    a newline, and the writer formats them). ``received`` is when the aggregator took it (epoch
    seconds); ``fields`` the journal entries' fields, one object per line, or None; ``base`` the
    offset the stream started at (wire.Batch.base).
    """

    topic: str
    agent: str
    stream: str
    start: int
    end: int
    lines: int
    text: bytes
    path: str
    received: float
    fields: list[dict[str, Any]] | None = None
    base: int = 0  # where the stream began (the agent's word): what an empty subject must start at


class Sink(Protocol):
    def add(self, batch: Accepted) -> None:
        """Take ``batch`` (raises files.SinkError, with nothing taken, if it cannot)."""
        ...
