"""The bare floor: the least a Python log shipper over ZeroMQ can do, to measure fleetlog against.

The sender reads the files round-robin in 1 MiB blocks, cuts at the last newline, decodes and
splits in C, and sends 2,000 lines per orjson message (a list of str lines and a little metadata)
PUSH -> PULL over loopback TCP. The receiver decodes each message and appends the lines to its
topic's file. No acknowledgements, no checkpoints, no fsync, no guarantees.

For the live workload the follower is the floor's sender: every ``--poll-ms`` it asks each file for
its size and sends what was added since, up to the last newline, as one message per file. It polls
rather than watches (no thread, no inotify): the least a Python follower can do per wake-up. It and
a receiver started with ``--expect 0`` run until they are stopped. With ``--one-message`` a poll
sends everything it found in one message, as fleetlog's agent does per read cycle: at the agent's
cadence (``--poll-ms 40``, its default latency budget) that is the least a Python shipper can spend
on a typical node for the same latency (issue 18, target 1).

    python -m bench.floor recv --bind tcp://127.0.0.1:P --out DIR --expect LINES --ready F --result F
    python -m bench.floor send --connect tcp://127.0.0.1:P --result F FILE...
    python -m bench.floor follow --connect tcp://127.0.0.1:P [--poll-ms 5] [--one-message] FILE...

Each side writes its own CPU time and peak RSS (and the receiver the time its last line was
written, on the system-wide monotonic clock) as JSON to ``--result``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import orjson
import zmq

BATCH_LINES = 2000
BLOCK_BYTES = 1024 * 1024
TOPIC = "bench"


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _peak_rss_kb() -> int:
    """VmHWM of this process. Not ru_maxrss: after fork+exec Linux carries the parent's high-water
    mark over into it, so a child of a big benchmark process would report the parent's size."""
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def _write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "wb") as fh:
        fh.write(orjson.dumps(doc))


def send(endpoint: str, paths: list[str], result: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    pos = dict.fromkeys(paths, 0)
    seq = 0
    lines_sent = 0
    topic = TOPIC.encode()
    while fds:
        for path in list(fds):
            block = os.pread(fds[path], BLOCK_BYTES, pos[path])
            cut = block.rfind(b"\n")
            if cut < 0:
                os.close(fds.pop(path))
                continue
            pos[path] += cut + 1
            lines = block[:cut].decode("utf-8", "replace").split("\n")
            for i in range(0, len(lines), BATCH_LINES):
                part = lines[i:i + BATCH_LINES]
                seq += 1
                sock.send_multipart([topic, orjson.dumps({"file": path, "seq": seq, "lines": part})])
                lines_sent += len(part)
    sock.close(linger=-1)  # deliver everything queued before exiting
    ctx.term()
    _write_json(result, {"lines": lines_sent, "cpu_s": _cpu_s(),
                         "peak_rss_kb": _peak_rss_kb()})


def follow(endpoint: str, paths: list[str], poll_s: float, one_message: bool = False) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    fds = [os.open(path, os.O_RDONLY) for path in paths]
    pos = [0] * len(fds)
    topic = TOPIC.encode()
    seq = 0
    while True:
        time.sleep(poll_s)
        found: list[str] = []
        for i, fd in enumerate(fds):
            if os.fstat(fd).st_size <= pos[i]:
                continue
            block = os.pread(fd, BLOCK_BYTES, pos[i])
            cut = block.rfind(b"\n")
            if cut < 0:
                continue
            pos[i] += cut + 1
            lines = block[:cut].decode("utf-8", "replace").split("\n")
            if one_message:
                found += lines  # each file's lines stay in order; the receiver needs no more
                continue
            seq += 1
            sock.send_multipart([topic, orjson.dumps({"file": paths[i], "seq": seq, "lines": lines})])
        if found:
            seq += 1
            sock.send_multipart([topic, orjson.dumps({"file": "", "seq": seq, "lines": found})])


def receive(endpoint: str, out_dir: str, expect: int, ready: str, result: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    fds: dict[str, int] = {}
    cpu_ready = _cpu_s()
    with open(ready, "wb"):
        pass
    lines = 0
    while lines < expect or not expect:
        topic_raw, body = sock.recv_multipart()
        doc = orjson.loads(body)
        topic = topic_raw.decode()
        fd = fds.get(topic)
        if fd is None:
            os.makedirs(os.path.join(out_dir, topic), exist_ok=True)
            fd = fds[topic] = os.open(os.path.join(out_dir, topic, f"{topic}.log"),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        data = ("\n".join(doc["lines"]) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        lines += len(doc["lines"])
    t_last = time.monotonic()
    for fd in fds.values():
        os.close(fd)
    sock.close(linger=0)
    ctx.term()
    _write_json(result, {"lines": lines, "t_last": t_last, "cpu_ready_s": cpu_ready, "cpu_s": _cpu_s(),
                         "peak_rss_kb": _peak_rss_kb()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send", help="read files and push batches")
    s.add_argument("--connect", required=True)
    s.add_argument("--result", required=True)
    s.add_argument("files", nargs="+")
    f = sub.add_parser("follow", help="follow files as they grow and push what is added")
    f.add_argument("--connect", required=True)
    f.add_argument("--poll-ms", type=float, default=5.0)
    f.add_argument("--one-message", action="store_true", help="one message per poll, not one per file")
    f.add_argument("files", nargs="+")
    r = sub.add_parser("recv", help="pull batches and append them to per-topic files")
    r.add_argument("--bind", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--expect", type=int, required=True,
                   help="exit after this many lines (0: run until stopped)")
    r.add_argument("--ready", required=True, help="created once bound")
    r.add_argument("--result", required=True)
    args = p.parse_args(argv)
    if args.role == "send":
        send(args.connect, args.files, args.result)
    elif args.role == "follow":
        follow(args.connect, args.files, args.poll_ms / 1000, args.one_message)
    else:
        receive(args.bind, args.out, args.expect, args.ready, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
