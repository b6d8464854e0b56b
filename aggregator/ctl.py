"""``aggregatorctl``: ask a running aggregator how it is doing, watch it live, tail a topic,
rotate, reload, make CURVE keys."""

from __future__ import annotations

import argparse
import itertools
import secrets
import sys
import time
from typing import Any

import orjson
import zmq

from aggregator.config import load_config
from aggregator.formats import safe_name
from aggregator.history import PROBE_PREFIX
from aggregator.proxy import SUBSCRIBER_BUFFER_BYTES, SUBSCRIBER_HWM
from fleetlog import __version__, curve, wire
from fleetlog.cli import RefusalWatch, die_quietly_on_closed_pipe, nothing_listens
from fleetlog.tomlconf import ConfigError, endpoint_problem

EXIT_UNREACHABLE = 3
EXIT_FELL_BEHIND = 4


class Unreachable(Exception):
    pass


class CommandFailed(Exception):
    pass


def local_endpoint(endpoint: str, host: str = "127.0.0.1") -> str:
    """A bound endpoint as a client reaches it (``tcp://0.0.0.0:5558`` -> ``tcp://127.0.0.1:5558``)."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{host}:{endpoint[len(wildcard):]}"
    return endpoint


def find_control(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    config = load_config(args.config, check_dirs=False)
    endpoints = config.aggregator.control
    ipc = [e for e in endpoints if e.startswith("ipc://")]
    return local_endpoint(ipc[0] if ipc else endpoints[0])


class Client:
    """One DEALER to the control endpoint; every request has a deadline."""

    def __init__(self, endpoint: str, timeout_s: float,
                 curve_keys: tuple[curve.KeyPair, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve_keys = curve_keys
        self.ctx = zmq.Context()
        # An aggregator's ipc:// control endpoints never use CURVE (the file's permissions guard
        # them): the keys are then for its CURVE-only XPUB (tail), not for this socket.
        self.sock = self.socket(zmq.DEALER, secure=not endpoint.startswith("ipc://"))
        # Watched from before the connect: a refused connection is said at once, and when
        # nothing answers, what the handshakes did tells "refused" from "not running".
        self.watch = RefusalWatch(self.sock)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.ids = itertools.count(1)

    def socket(self, kind: int, secure: bool = True) -> zmq.Socket:  # type: ignore[type-arg]
        """A socket to the aggregator, with CURVE when keys were given (and ``secure``)."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve_keys is not None and secure:
            curve.as_client(sock, *self.curve_keys)
        return sock

    def call(self, command: str, **args: Any) -> Any:
        req_id = next(self.ids)
        self.sock.send(wire.encode_request(req_id, command, args))
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.watch.refused():
                raise Unreachable(f"no aggregator at {self.endpoint}: connection refused; is it running?")
            # Short polls: a refusal shows on the monitor, not on this socket.
            if not self.sock.poll(min(100, int(left * 1000) + 1)):
                continue
            reply = wire.decode_control(self.sock.recv())
            if reply.get("id") != req_id:
                continue
            if not reply.get("ok"):
                raise CommandFailed(reply.get("error", "failed"))
            return reply.get("result")
        raise Unreachable(self.why_no_answer())

    def why_no_answer(self) -> str:
        """What the connection's handshakes say about the silence, as a sentence."""
        self.watch.refused()  # reads what the monitor has left
        seen = self.watch.seen
        where, within = f"the aggregator at {self.endpoint}", f"within {self.timeout_s:g}s"
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
            return (f"{where} refused this client's CURVE key (it is in neither its authorized_keys_dir"
                    " nor its admin_keys_dir)")
        protocol = seen.get(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        if protocol == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.curve_keys is not None:
                return f"{where} does not use CURVE: leave out --curve-key and --server-key"
            return (f"{where} requires CURVE: give --curve-key and --server-key, or use its ipc://"
                    " control socket")
        if protocol is not None:
            return f"the handshake with {self.endpoint} fails (ZeroMQ protocol error {protocol:#x})"
        if zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL in seen:
            if self.curve_keys is not None:
                return (f"{where} closes the connection during the CURVE handshake: is --server-key"
                        " the aggregator's current public key?")
            return (f"{where} closes the connection during the handshake: it probably requires CURVE"
                    " (give --curve-key and --server-key, or use its ipc:// control socket)")
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
            return (f"connected to {self.endpoint}, but no answer {within}: is it an aggregator's"
                    " control endpoint, and is that aggregator responsive?")
        return f"no answer from the aggregator at {self.endpoint} {within}; is it running?"

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)
        self.ctx.term()


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
    t = s["totals"]
    out += ["", f"totals: {t['lines_written']} lines written ({_size(t['bytes_written'])}), "
                f"{t['duplicates_dropped']} duplicates dropped, {t['malformed_dropped']} malformed dropped, "
                f"{t['resyncs']} resyncs, {t['commits']} commits, {t['streams']} streams"]
    if t.get("pending_bytes") or t.get("compressions_running"):
        out.append(f"in progress: {_size(t.get('pending_bytes', 0))} not committed yet, "
                   f"{t.get('compressions_running', 0)} files being compressed")
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


def cmd_tail(client: Client, args: argparse.Namespace) -> int:
    """Print the topic's last ``-n`` lines (from the aggregator's files), then its lines live
    from XPUB until interrupted (or ``--count`` new lines).

    A subscriber that does not keep up (its output blocked) is cut off by the aggregator past
    proxy.SUBSCRIBER_BUFFER_BYTES; a stream's next batch then starts after where the last one
    ended, and tail says so and exits EXIT_FELL_BEHIND (with --lossy: says so and goes on).
    """
    if not wire.valid_topic(args.topic):
        print(f"aggregatorctl: not a topic name: {args.topic!r}", file=sys.stderr)
        return 2
    if args.lines < 0 or (args.count is not None and args.count < 0):
        print("aggregatorctl: -n and --count take a number of lines, 0 or more", file=sys.stderr)
        return 2
    where = client.call("tail", topic=args.topic)
    xpub = where["xpub"]
    if where.get("curve") and client.curve_keys is None:
        print(f"aggregatorctl: the aggregator publishes on {xpub} with CURVE only: give --curve-key "
              "(an authorised key) and --server-key (the aggregator's public key)", file=sys.stderr)
        return 2
    if where.get("known") is False and not args.wait:
        known = ", ".join(where.get("topics") or []) or "none yet"
        print(f"aggregatorctl: no topic {args.topic!r} (topics: {known}); --wait to wait for its "
              "first lines", file=sys.stderr)
        return 1
    host = client.endpoint[len("tcp://"):].rsplit(":", 1)[0] if client.endpoint.startswith("tcp://") \
        else "127.0.0.1"
    sub = client.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    # Our own memory stays bounded too when stdout blocks: the rest waits in the aggregator.
    sub.setsockopt(zmq.RCVHWM, SUBSCRIBER_HWM)
    # Prefix filtering would also match "nginx-errors" for "nginx": filter exactly below.
    sub.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
    probe = secrets.token_hex(8)
    if args.lines and where.get("sink") == "jetstream":
        print("aggregatorctl: this aggregator writes no files (sink = jetstream): no past lines to"
              " show, only new ones (the past lines are in the fleetlog-writers' files)", file=sys.stderr)
        args.lines = 0
    if args.lines:
        # After the topic's: once the aggregator sees this one, it has the topic's (history.py).
        sub.setsockopt(zmq.SUBSCRIBE, PROBE_PREFIX + probe.encode())
    sub.connect(local_endpoint(xpub, host))
    args.format = where.get("format")
    try:
        return _follow(client, sub, args, probe)
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close(linger=0)


def _history(client: Client, args: argparse.Namespace, probe: str) -> dict[tuple[str, str], int]:
    """Print the last ``args.lines`` lines; return each stream's offset where they end."""
    deadline = time.monotonic() + client.timeout_s
    while True:
        try:
            reply = client.call("history", topic=args.topic, lines=args.lines, probe=probe)
        except CommandFailed as exc:
            if "unknown command" not in str(exc):
                raise
            print("aggregatorctl: this aggregator cannot send a topic's last lines (it is older than"
                  " this aggregatorctl): new lines only", file=sys.stderr)
            return {}
        if reply.get("subscribed"):
            break
        if time.monotonic() > deadline:
            raise Unreachable(f"the subscription to {args.topic!r} did not reach the aggregator within "
                              f"{client.timeout_s:g}s (is its xpub endpoint reachable from here?)")
        time.sleep(0.02)
    if reply.get("truncated"):
        print(f"aggregatorctl: only the last {len(reply['lines'])} lines fit in one answer "
              f"({reply.get('max_bytes', 0) >> 20} MiB)", file=sys.stderr)
    if reply["lines"]:
        sys.stdout.write("\n".join(reply["lines"]) + "\n")
        sys.stdout.flush()
    return {(agent, stream): int(end) for agent, stream, end in reply["cut"]}


def _follow(client: Client, sub: zmq.Socket, args: argparse.Namespace,  # type: ignore[type-arg]
            probe: str) -> int:
    # (agent, stream) -> end offset of what was printed last: the history's cut, then each batch.
    ends = _history(client, args, probe) if args.lines else {}
    fmt = args.format
    cut = dict(ends)
    want = args.topic.encode()
    printed = 0
    while args.count is None or printed < args.count:
        frames = sub.recv_multipart()
        if frames[0] != want:
            continue
        try:
            batch = wire.decode_batch(frames)
        except wire.WireError:
            continue
        key = (batch.agent, batch.stream)
        if batch.end <= cut.get(key, -1):
            continue  # published before the history was taken: printed with it
        last = ends.get(key)
        ends[key] = batch.end
        if last is not None and batch.start > last:
            print(f"aggregatorctl: tail fell behind: {batch.start - last} bytes of {batch.agent}:"
                  f"{batch.path} were dropped (a subscriber that does not keep up is cut off past "
                  f"{SUBSCRIBER_BUFFER_BYTES >> 20} MiB queued)", file=sys.stderr)
            if not args.lossy:
                return EXIT_FELL_BEHIND
        prefix = safe_name(batch.agent) + " " if fmt == "raw_agent" else ""
        for line in batch.line_list():
            sys.stdout.write(prefix + line.replace("\n", "\n" + prefix) + "\n")
            printed += 1
            if args.count is not None and printed >= args.count:
                break
        sys.stdout.flush()
    return 0


def cmd_rotate(client: Client, args: argparse.Namespace) -> int:
    result = client.call("rotate", **({"topic": args.topic} if args.topic else {}))
    for name in result["rotated"]:
        # Compression runs after the reply: until it ends, `ls` shows the name without .gz.
        print(f"rotated to {name}" + (" (compressing)" if name.endswith(".gz") else ""))
    if not result["rotated"]:
        print("nothing to rotate (empty active files)")
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = client.call("reload")
    if not result["reloaded"]:
        for problem in result["problems"]:
            print(f"aggregatorctl: reload refused: {problem}", file=sys.stderr)
        return 1
    print("reloaded" + (f"; restart needed for {', '.join(result['restart_needed'])}"
                        if result["restart_needed"] else ""))
    return 0


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    pong = client.call("ping")
    print(f"aggregator {pong['instance']} (fleetlog {pong.get('version', '?')}) at {client.endpoint}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="aggregatorctl",
        description="Ask a running fleetlog aggregator how it is doing, follow a topic live, rotate "
                    "its files, reload its config, or make CURVE keys.",
        epilog="The aggregator is found from --control, else from --config (its ipc:// control "
               "socket if it has one), else from /etc/fleetlog/aggregator.toml, else "
               "tcp://127.0.0.1:5558. Exit status: 0 ok, 1 the command failed, 2 bad usage or "
               "config, 3 no aggregator answered. Examples: aggregatorctl status; aggregatorctl "
               "status --json | jq .totals; aggregatorctl tail nginx; aggregatorctl rotate nginx; "
               "aggregatorctl keygen web-01 --dir /etc/fleetlog/keys")
    p.add_argument("--version", action="version", version=f"aggregatorctl (fleetlog) {__version__}")
    p.add_argument("--control", metavar="ENDPOINT",
                   help="the aggregator's control endpoint, e.g. tcp://logs.example:5558 or "
                        "ipc:///run/fleetlog/control.sock")
    p.add_argument("--config", metavar="PATH", help="find the control endpoint in this aggregator config")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to wait for an answer (default 3)")
    p.add_argument("--curve-key", metavar="FILE", help="this client's secret key file (CURVE over tcp)")
    p.add_argument("--server-key", metavar="KEY", help="the aggregator's public key (z85 or .key file)")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="write a CURVE key pair NAME.key and NAME.key_secret (0600)")
    k.add_argument("name")
    k.add_argument("--dir", default=".", help="where to write them (default: here)")
    k.set_defaults(func=None)
    s = sub.add_parser("status", help="agents, topics, totals")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_status)
    top = sub.add_parser("top", help="live view of rates and lag, redrawn every --interval seconds")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="default 1")
    top.add_argument("--iterations", type=int, default=None, metavar="N", help="stop after N screens")
    top.set_defaults(func=cmd_top)
    t = sub.add_parser(
        "tail", help="print a topic's last lines, then its new lines as they come",
        description="Print the last N lines of TOPIC's output (its active file, then its rotated "
                    "files, compressed or not, if the active one holds fewer), read by the "
                    "aggregator, then follow its new lines live, like tail -n N -f.",
        epilog="The seam between the last lines and the live ones is exact: none missing, none "
               "twice, unless tail falls behind (see --lossy). Lines of a json topic are shown "
               "as the agents wrote them, as are the live ones.")
    t.add_argument("topic")
    t.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                   help="print the last N lines first (default 10; 0: only new lines)")
    t.add_argument("--count", type=int, default=None, metavar="N",
                   help="exit after N new lines (not counting the last lines of -n)")
    t.add_argument("--wait", action="store_true", help="a topic that has no line yet: wait for it")
    t.add_argument("--lossy", action="store_true",
                   help="when it falls behind (lines dropped), say so and go on instead of exiting 4")
    t.set_defaults(func=cmd_tail)
    r = sub.add_parser("rotate", help="roll a topic's file (or all) over now")
    r.add_argument("topic", nargs="?")
    r.set_defaults(func=cmd_rotate)
    sub.add_parser("reload", help="reload the aggregator's config").set_defaults(func=cmd_reload)
    sub.add_parser("ping", help="is it there").set_defaults(func=cmd_ping)
    return p.parse_args(argv)


def keygen(name: str, directory: str) -> int:
    if not name or "/" in name or name.startswith("."):
        print(f"aggregatorctl: {name!r} is not a usable key name", file=sys.stderr)
        return 2
    try:
        public, secret = curve.generate(directory, name)
    except (curve.KeyError_, OSError) as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return 1
    print(f"public key  {public}")
    print(f"secret key  {secret}  (mode 0600: it never leaves this host)")
    print("Where they go, depending on whose key this is:")
    print(f"  an agent's key:       {public} into the aggregator's authorized_keys_dir;")
    print(f"                        agent.curve_secret_key = \"{secret}\" on the agent")
    print(f"  the aggregator's key: aggregator.curve_secret_key = \"{secret}\";")
    print(f"                        agent.curve_server_key = \"{public}\" on every agent")
    print(f"  an admin's key:       {public} into the aggregator's admin_keys_dir;")
    print(f"                        aggregatorctl --curve-key {secret} --server-key AGGREGATOR.key")
    return 0


def main(argv: list[str] | None = None) -> int:
    die_quietly_on_closed_pipe()
    args = parse_args(argv)
    if args.command == "keygen":
        return keygen(args.name, args.dir)
    try:
        endpoint = find_control(args)
        if (problem := endpoint_problem(endpoint)) is not None:
            print(f"aggregatorctl: --control: {problem}", file=sys.stderr)
            return 2
        keys = None
        if args.curve_key or args.server_key:
            if not (args.curve_key and args.server_key):
                print("aggregatorctl: --curve-key and --server-key go together", file=sys.stderr)
                return 2
            keys = (curve.load_secret(args.curve_key), curve.load_public(args.server_key))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"aggregatorctl: config: {problem}", file=sys.stderr)
        return 2
    except curve.KeyError_ as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return 2
    if (absent := nothing_listens(endpoint)) is not None:
        print(f"aggregatorctl: no aggregator at {endpoint}: {absent}; is it running?", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        client = Client(endpoint, args.timeout, keys)
    except zmq.ZMQError as exc:
        print(f"aggregatorctl: cannot connect to {endpoint}: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(client, args))
    except Unreachable as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
