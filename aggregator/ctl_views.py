"""aggregatorctl's readable views: ``status`` (agents, topics, totals, problems) and ``top``
(rates and lag, redrawn); ``--json`` prints the status object as the daemon sends it."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson

from aggregator.ctl_client import Client, Unreachable


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _errors(errors: dict[str, int]) -> str:
    """``cut_lines=2 oversized_batches=1`` (byte counts left to --json), or ``-``."""
    shown = [f"{k}={v}" for k, v in sorted(errors.items()) if v and not k.endswith("_bytes")]
    return " ".join(shown) or "-"


def _connected(agent: dict[str, Any]) -> str:
    if agent["connected"]:
        return "yes"
    if agent.get("stopped"):
        return "stopped"
    # An agent with several aggregators may simply be on another one (the alert rules take the
    # freshest last-seen over all aggregators).
    return "not here" if (agent.get("aggregators") or 1) > 1 else "NO"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*map(str, r)).rstrip() for r in rows)]


def _output_line(s: dict[str, Any]) -> str:
    """Where the aggregator's output goes: its files and their disk, or its JetStream stream."""
    js = s.get("jetstream")
    if js:  # sink = "jetstream": no files here
        return (f"sink JetStream stream {js['stream']} (R{js['replicas']}) via "
                f"{js['connected'] or 'NOT CONNECTED'}, {js['published']} messages published, "
                f"{_size(js['queued_bytes'])} queued")
    disk = s["disk"]
    return (f"output {s['output_dir']}  disk free {_size(disk.get('output_free_bytes'))} of "
            f"{_size(disk.get('output_total_bytes'))}")


def _duplicates(s: dict[str, Any]) -> str:
    """``12 duplicates dropped (10 already in the stream)``: the total, and with JetStream the
    part the sink found in the stream (resent after a crash, or published by another aggregator)."""
    t = s["totals"]
    shown = f"{t['duplicates_dropped']} duplicates dropped"
    if s.get("jetstream"):
        shown += f" ({t.get('already_in_stream', 0)} already in the stream)"
    return shown


def _commits(s: dict[str, Any]) -> str:
    """``120 commits (interval 200 ms, 3 early)``: the interval in force, and how many commits came
    before it was up."""
    t = s["totals"]
    if s.get("commit_interval_ms") is None:  # an aggregator older than this aggregatorctl
        return f"{t['commits']} commits"
    return (f"{t['commits']} commits (interval {s['commit_interval_ms']} ms, "
            f"{t.get('early_commits', 0)} early)")


# The JetStream sink's counters the text shows when not 0 (all of them are in --json).
_SINK_COUNTERS = (("already_in", "batches already in the stream"),
                  ("already_in_lines", "lines already in the stream"),
                  ("duplicates", "answered duplicate"), ("precondition_refusals", "precondition refusals"),
                  ("resyncs", "resyncs"), ("retries", "retries"), ("reconnects", "reconnects"),
                  ("full_refusals", "refused as full"), ("split_messages", "split messages"),
                  ("cut_lines", "lines cut to max_payload"), ("reads", "subject reads"),
                  ("errors", "errors"), ("gaps_accepted", "gaps accepted (lost by the stream)"))


def _sink_counters(js: dict[str, Any]) -> str | None:
    """``jetstream: 4 batches already in the stream, 2 retries``, or None when all are 0."""
    shown = [f"{js[k]} {words}" for k, words in _SINK_COUNTERS if js.get(k)]
    return "jetstream: " + ", ".join(shown) if shown else None


def _totals(s: dict[str, Any]) -> list[str]:
    """The totals line, the JetStream sink's counters that are not 0, what is in progress."""
    t, js = s["totals"], s.get("jetstream")
    # With JetStream lines_written counts the lines taken into the sink; some may be found in
    # the stream already (duplicates), so what went into the stream is said beside it.
    written = (f"{t['lines_written']} lines taken ({_size(t['bytes_written'])}), "
               f"{js.get('published_lines', 0)} published" if js else
               f"{t['lines_written']} lines written ({_size(t['bytes_written'])})")
    out = [f"totals: {written}, {_duplicates(s)}, {t['malformed_dropped']} malformed dropped, "
           f"{t['resyncs']} resyncs, {_commits(s)}, {t['streams']} streams"]
    if js and (counted := _sink_counters(js)):
        out.append(counted)
    if t.get("pending_bytes") or t.get("compressions_running"):
        out.append(f"in progress: {_size(t.get('pending_bytes', 0))} not committed yet, "
                   f"{t.get('compressions_running', 0)} files being compressed")
    return out


def render_status(s: dict[str, Any]) -> str:
    if s.get("kind") == "writer":  # a fleetlog-writer's control endpoint answers the same commands
        from writer.status import render
        return render(s)
    js = s.get("jetstream")
    out = [f"aggregator {s['instance']} (fleetlog {s.get('version', '?')})  up {_age(s['uptime_s'])}"
           f"  {_output_line(s)}"]
    if js and js.get("last_error") and js["last_error"] not in (s.get("disk_error") or ""):
        out.append(f"!! JetStream: {js['last_error']}")
    if s.get("disk_error"):
        what = "cannot publish" if js else "output not writable"
        out.append(f"!! {what}, nothing is being acknowledged: {s['disk_error']}")
    out.append("")
    agents = s["agents"]
    out.append(f"agents ({len(agents)})")
    if agents:
        out += _table(["name", "address", "mode", "version", "connected", "last seen", "lines/s", "lag",
                       "lag age", "window", "files", "errors"],
                      [[a["name"], a["address"] or "-", a["mode"] or "-", a.get("version") or "-",
                        _connected(a), _age(a["last_seen_s"]) + (" ago" if a["last_seen_s"] else ""),
                        f"{a['lines_per_s']:.0f}", _size(a["lag_bytes"]), _age(a.get("lag_s")),
                        _size(a.get("window_bytes")), a["files"], _errors(a.get("errors") or {})]
                       for a in agents])
    if s.get("expected_missing"):
        out.append("!! expected but not connected: " + ", ".join(s["expected_missing"]))
    journals = [a for a in agents if a.get("journal_lag_entries") is not None]
    if journals:
        out += ["", "journal sources (lag: entries read and not acknowledged, seconds behind)"]
        out += _table(["agent", "lag entries", "lag"],
                      [[a["name"], a["journal_lag_entries"], f"{a['journal_lag_s'] or 0:.1f}s"]
                       for a in journals])
    out.append("")
    topics = s["topics"]
    out.append(f"topics ({len(topics)})")
    if topics:
        out += _table(["name", "lines", "bytes", "lines/s", "active file"],
                      [[t["name"], t["lines"], _size(t["bytes"]), f"{t['lines_per_s']:.0f}",
                        _size(t["file_bytes"])] for t in topics])
    out += ["", *_totals(s)]
    flow = s.get("flow") or {}
    if flow.get("agents_catching_up"):
        out.append(f"catching up: {flow['agents_catching_up']} agents, a share of "
                   f"{_size(flow.get('agent_window_bytes'))} each ({_size(flow.get('granted_bytes'))} "
                   f"granted of {_size(flow.get('window_budget_bytes'))})")
    if s.get("malformed"):
        out.append("malformed by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(s["malformed"].items())))
    refusals = s.get("refusals") or {}
    if refusals.get("total"):
        out.append(f"refused clients: {refusals['total']} ("
                   + ", ".join(f"{k}={v}" for k, v in sorted(refusals["by_reason"].items())) + "); latest: "
                   + ", ".join(f"{p['address'] or '?'} {p['key'] or '(no key)'} {p['reason']}"
                               for p in refusals["peers"][:3]))
    for a in agents:
        for problem in a.get("problems") or []:
            out.append(f"!! agent {a['name']}: {problem}")
    return "\n".join(out)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = client.call("status")
    if args.json:
        sys.stdout.write(orjson.dumps(status).decode() + "\n")
    else:
        print(render_status(status))
    return 0


def _rates(s: dict[str, Any], prev: dict[str, Any] | None, dt: float,
           kind: str) -> dict[str, tuple[float, float]]:
    """(lines/s, bytes/s) per topic or agent: from two snapshots, else the server's smoothed rate."""
    before = {x["name"]: x for x in prev[kind]} if prev is not None else {}
    out = {}
    for x in s[kind]:
        p = before.get(x["name"])
        if p is not None and dt > 0:
            out[x["name"]] = (max(0, x["lines"] - p["lines"]) / dt,
                              max(0, x.get("bytes", 0) - p.get("bytes", 0)) / dt)
        else:
            out[x["name"]] = (x["lines_per_s"], -1.0)
    return out


def render_top(s: dict[str, Any], prev: dict[str, Any] | None, dt: float, endpoint: str) -> str:
    """One screen of ``aggregatorctl top``: rates and lag, busiest first."""
    topics = _rates(s, prev, dt, "topics")
    agents = _rates(s, prev, dt, "agents")
    t = s["totals"]
    total_lines = sum(r[0] for r in topics.values())
    total_bytes = sum(r[1] for r in topics.values() if r[1] >= 0)
    out = [f"fleetlog top  {time.strftime('%H:%M:%S')}  aggregator {s['instance']} at {endpoint}  "
           f"up {_age(s['uptime_s'])}  free {_size(s['disk'].get('output_free_bytes'))}",
           f"in  {total_lines:,.0f} lines/s  {_size(total_bytes)}/s   written {t['lines_written']:,}  "
           f"dup {t['duplicates_dropped']:,}  malformed {t['malformed_dropped']:,}  "
           f"resyncs {t['resyncs']:,}  pending {_size(t.get('pending_bytes'))}"]
    if s.get("disk_error"):
        out.append(f"!! output not writable, nothing is being acknowledged: {s['disk_error']}")
    out.append("")
    rows = sorted(s["topics"], key=lambda x: (-topics[x["name"]][0], x["name"]))
    out += _table(["TOPIC", "LINES/S", "BYTES/S", "LINES", "ACTIVE FILE"],
                  [[x["name"], f"{topics[x['name']][0]:,.0f}",
                    _size(topics[x["name"]][1]) + "/s" if topics[x["name"]][1] >= 0 else "-",
                    f"{x['lines']:,}", _size(x["file_bytes"])] for x in rows])
    out.append("")
    rows = sorted(s["agents"], key=lambda x: (-x["lag_bytes"], -agents[x["name"]][0], x["name"]))
    out += _table(["AGENT", "MODE", "CONNECTED", "LAST SEEN", "LINES/S", "LAG", "FILES"],
                  [[x["name"], x["mode"] or "-", "yes" if x["connected"] else "NO", _age(x["last_seen_s"]),
                    f"{agents[x['name']][0]:,.0f}", _size(x["lag_bytes"]), x["files"]] for x in rows])
    return "\n".join(out)


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    """Redraw rates and lag every --interval seconds until Ctrl-C (or --iterations N)."""
    tty = sys.stdout.isatty()
    prev: dict[str, Any] | None = None
    prev_at = 0.0
    shown = 0
    if tty:
        sys.stdout.write("\x1b[?25l")  # hide the cursor while redrawing
    try:
        while True:
            at = time.monotonic()
            try:
                s = client.call("status")
            except Unreachable as exc:
                if prev is None:
                    raise
                screen = f"fleetlog top  {time.strftime('%H:%M:%S')}  {exc}; retrying"
            else:
                screen = render_top(s, prev, at - prev_at, client.endpoint)
                prev, prev_at = s, at
            # Home + clear on a terminal; plain frames separated by a blank line otherwise.
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + screen + ("\n" if tty else "\n\n"))
            sys.stdout.flush()
            shown += 1
            if args.iterations is not None and shown >= args.iterations:
                break
            time.sleep(max(0.0, args.interval - (time.monotonic() - at)))
    except KeyboardInterrupt:
        pass
    finally:
        if tty:
            sys.stdout.write("\x1b[?25h")
            sys.stdout.flush()
    return 0

