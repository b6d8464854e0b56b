"""``aggregatorctl tail TOPIC``: a topic's last lines (read by the aggregator from its files),
then its new lines live from XPUB, with an exact seam between the two."""

from __future__ import annotations

import argparse
import secrets
import sys
import time

import zmq

from aggregator.ctl_client import EXIT_FELL_BEHIND, Client, CommandFailed, Unreachable, local_endpoint
from aggregator.formats import safe_name
from aggregator.history import PROBE_PREFIX
from aggregator.proxy import SUBSCRIBER_BUFFER_BYTES, SUBSCRIBER_HWM
from fleetlog import wire


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

