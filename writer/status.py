"""fleetlog-writer's status: the JSON object ``aggregatorctl --control <writer> status --json``
prints, and the readable summary ``aggregatorctl status`` shows for it (``kind == "writer"``).

Besides the writer's own fields it has the keys DESIGN.md promises of every status (``topics``,
``totals`` with ``lines_written``/``duplicates_dropped``/``malformed_dropped``, ``agents``: none
here), so tools reading an aggregator's status read a writer's too.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from aggregator.files import key_topic
from fleetlog import __version__

if TYPE_CHECKING:
    from writer.daemon import Writer
    from writer.reading import Alarm


def _alarm(a: Alarm | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"since": round(a.since, 3), "messages": a.messages, "first_seq": a.first_seq,
            "last_seq": a.last_seq}


def _file_bytes(w: Writer, topic: str) -> int | None:
    """The topic's active file size, or its agents' together (split by agent); None if none is open."""
    sizes = [tf.size for key, tf in w.sink.files.items() if key_topic(key) == topic]
    return sum(sizes) if sizes else None


def status(w: Writer) -> dict[str, Any]:
    now = time.monotonic()
    cfg = w.wcfg
    try:
        usage = shutil.disk_usage(cfg.output_dir)
        disk = {"output_free_bytes": usage.free, "output_total_bytes": usage.total,
                "output_used_bytes": usage.used}
    except OSError:
        disk = {}
    t = w.totals
    nc = w.source.nc
    try:
        journal_bytes: int | None = os.path.getsize(w.journal.journal_path)
    except OSError:
        journal_bytes = None
    return {
        "kind": "writer",
        "instance": w.instance,
        "version": __version__,
        "uptime_s": round(now - w.started, 1),
        "output_dir": cfg.output_dir,
        "state_dir": cfg.state_dir,
        "disk": disk,
        "disk_error": w.disk_error,
        "journal_bytes": journal_bytes,
        "nats": {"servers": list(cfg.servers), "connected": w.source.connected,
                 "connected_url": (f"{nc.connected_url.scheme}://{nc.connected_url.netloc}"
                                   if nc is not None and nc.connected_url and w.source.connected else None),
                 "problem": w.source_problem, "consumer": w.source.consumer},
        "stream": {"name": cfg.stream, "subject_prefix": cfg.subject_prefix,
                   "first_seq": w.stream.first_seq, "last_seq": w.stream.last_seq,
                   "messages": w.stream.messages, "bytes": w.stream.bytes, "created": w.stream.created},
        "applied_seq": w.applied_seq,
        "committed_seq": w.committed_seq,
        "lag_messages": w.lag_messages,
        "lag_s": None if w.lag_s is None else round(w.lag_s, 3),
        "discarded": {"alarm": w.alarm is not None, "unwritten_total": t.discarded_unwritten,
                      "current": _alarm(w.alarm), "last": _alarm(w.last_discard)},
        "agents": [],
        "topics": [
            {"name": name, "lines": s.lines, "bytes": s.bytes, "file_bytes": _file_bytes(w, name)}
            for name, s in sorted(w.applier.topics.items())
        ],
        "totals": {
            "lines_written": t.lines_written, "bytes_written": t.bytes_written,
            "messages_applied": t.messages_applied, "duplicates_dropped": t.duplicates_dropped,
            "duplicate_messages": t.duplicate_messages, "malformed_dropped": t.malformed_dropped,
            "stream_gaps": t.stream_gaps, "overlaps": t.overlaps,
            "discarded_unwritten": t.discarded_unwritten, "stream_rewritten": t.stream_rewritten,
            "consumers_made": t.consumers_made,
            "commits": t.commits, "write_errors": t.write_errors, "rotations": t.rotations,
            "retention_removed": t.retention_removed, "streams": len(w.applier.ends),
            "pending_bytes": w.pending_bytes, "compressions_running": len(w._compressions),
        },
        "malformed": dict(t.malformed),
        "control": {"messages_received": w.control.messages_received if w.control else 0,
                    "commands": dict(w.control.commands) if w.control else {}},
    }


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def render(s: dict[str, Any]) -> str:
    """The readable summary of a writer's status."""
    nats, stream, t = s["nats"], s["stream"], s["totals"]
    out = [f"writer {s['instance']} (fleetlog {s.get('version', '?')})  up {s['uptime_s']:.0f}s  "
           f"output {s['output_dir']}  disk free {_size(s['disk'].get('output_free_bytes'))}"]
    where = nats["connected_url"] or "not connected (" + ", ".join(nats["servers"]) + ")"
    out.append(f"stream {stream['name']} on {where}: sequences {stream['first_seq']}-{stream['last_seq']}, "
               f"applied {s['applied_seq']} (committed {s['committed_seq']})")
    lag = f"lag: {s['lag_messages']} messages"
    if s["lag_messages"] and s["lag_s"] is not None:
        lag += f", the oldest unapplied one {s['lag_s']:.1f}s old"
    out.append(lag)
    if nats.get("problem"):
        out.append(f"!! {nats['problem']}")
    if s.get("disk_error"):
        out.append(f"!! output not writable, reading stopped: {s['disk_error']}")
    d = s["discarded"]
    if d["alarm"]:
        c = d["current"]
        out.append(f"!! the stream discarded {c['messages']} messages (sequences {c['first_seq']}-"
                   f"{c['last_seq']}) before this writer wrote them")
    if d["unwritten_total"]:
        out.append(f"discarded before written, in total: {d['unwritten_total']} messages")
    out += ["", f"topics ({len(s['topics'])})"]
    rows = [["name", "lines", "bytes", "active file"]] + [
        [x["name"], str(x["lines"]), _size(x["bytes"]), _size(x["file_bytes"])] for x in s["topics"]]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out += ["", f"totals: {t['lines_written']} lines written ({_size(t['bytes_written'])}) from "
                f"{t['messages_applied']} messages, {t['duplicates_dropped']} duplicate lines dropped "
                f"({t['duplicate_messages']} messages), {t['malformed_dropped']} malformed dropped, "
                f"{t['stream_gaps']} stream gaps, {t['commits']} commits, {t['streams']} streams"]
    if s.get("malformed"):
        out.append("malformed by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(s["malformed"].items())))
    return "\n".join(out)
