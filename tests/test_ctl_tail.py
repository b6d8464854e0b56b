"""``aggregatorctl tail TOPIC -n N``: the last N lines as tail(1) prints them, then the live ones,
with nothing missed or doubled at the seam; real daemons, real files (rotated, compressed).

(tests/test_tail.py is the agent's file tailer.)
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import Harness, append_lines, count_lines, make_lines, output_lines, wait_for
from test_security import Keys, agent_keys, secure_aggregator

from aggregator import history
from fleetlog import curve


def ctl_tail(h: Harness, control: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``aggregatorctl [--curve-key K --server-key S] --control C tail ARGS``."""
    opts: list[str] = []
    if "--curve-key" in args:
        i = args.index("--curve-key")
        opts, args = list(args[i:i + 4]), args[:i] + args[i + 4:]
    return subprocess.run([sys.executable, "-m", "aggregator.ctl", *opts, "--control", control, "tail",
                           *args], capture_output=True, text=True, timeout=timeout)


# ---- the reader, on real files -----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 7, 50])
def test_history_reads_the_last_lines_across_rotated_and_compressed_files(tmp_path: Path, n: int) -> None:
    older = tmp_path / "t.20260101T000000Z.log.gz"
    older.write_bytes(gzip.compress(b"a1\na2\na3\n"))
    old = tmp_path / "t.20260102T000000Z.log"
    old.write_bytes(b"b1\nb2\n")
    active = tmp_path / "t.log"
    active.write_bytes(b"c1\nc2\nwritten after the snapshot\n")
    fd = os.open(active, os.O_RDONLY)
    snap = history.Snapshot(fd=fd, size=len(b"c1\nc2\n"), rotated=[str(old), str(older)])
    lines, cut = history.read_history(snap, n)
    every = [b"a1", b"a2", b"a3", b"b1", b"b2", b"c1", b"c2"]
    assert lines == (every[-n:] if n else [])
    assert not cut
    assert snap.fd == -1  # closed


def test_history_of_long_lines_crosses_read_chunks_and_stops_at_its_byte_bound(tmp_path: Path) -> None:
    active = tmp_path / "t.log"
    lines = [(f"{i:03d}" * 30_000).encode() for i in range(8)]  # 90 kB each: over a 64 KiB read
    active.write_bytes(b"\n".join(lines) + b"\n")
    fd = os.open(active, os.O_RDONLY)
    got, cut = history.read_history(history.Snapshot(fd=fd, size=active.stat().st_size), 3)
    assert got == lines[-3:] and not cut
    fd = os.open(active, os.O_RDONLY)
    got, cut = history.read_history(history.Snapshot(fd=fd, size=active.stat().st_size), 8,
                                    max_bytes=250_000)
    assert got == lines[-2:] and cut


# ---- aggregatorctl against real daemons ------------------------------------------------------------


def test_tail_n_prints_the_last_lines_then_follows_with_nothing_missed_or_doubled(h: Harness) -> None:
    """Two files keep writing while tail starts: what it prints is one unbroken stretch of the
    topic's output file (the history's end and the live feed's start meet exactly)."""
    ep = h.endpoints()
    logs = [h.path("logs", "a.log"), h.path("logs", "b.log")]
    for log in logs:
        append_lines(log, make_lines(log.stem, 0, 100))
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(h.path("logs", "*.log"))], "topic": "app"}])
    out = h.path("out")
    wait_for(lambda: len(output_lines(out, "app")) == 200, timeout=30, what="the first lines written")
    stop = threading.Event()
    counts = dict.fromkeys(logs, 100)

    def write() -> None:
        while not stop.is_set():
            for log in logs:
                append_lines(log, make_lines(log.stem, counts[log], 3))
                counts[log] += 3
            time.sleep(0.003)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        runs = [ctl_tail(h, ep.control, "app", "-n", "40", "--count", "500") for _ in range(3)]
    finally:
        stop.set()
        writer.join(timeout=10)
    written = sum(counts.values())
    wait_for(lambda: len(output_lines(out, "app")) == written, timeout=30, what="every line written")
    file_lines = output_lines(out, "app")
    for r in runs:
        assert r.returncode == 0, r.stderr
        printed = r.stdout.splitlines()
        assert len(printed) == 540
        start = file_lines.index(printed[0])
        assert printed == file_lines[start:start + 540]


def test_tail_n_reaches_into_rotated_compressed_files(h: Harness) -> None:
    """The active file holds fewer than N lines: the rest comes from the rotated files, gzip'd or
    not; ``--count 0`` prints the history and exits."""
    ep = h.endpoints()
    log = h.path("logs", "a.log")
    h.aggregator(ep, "aggregator.compress=\"gzip\"")
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    out = h.path("out")
    n = 0
    for _ in range(3):
        append_lines(log, make_lines("r", n, 30))
        n += 30
        wait_for(lambda: len(output_lines(out, "app")) == 30, timeout=30, what="lines written")
        assert h.ctl(ep, "rotate", "app").returncode == 0
    wait_for(lambda: len(list((out / "app").glob("*.log.gz"))) == 3, timeout=30,
             what="rotated files compressed")
    append_lines(log, make_lines("r", n, 5))
    n += 5
    wait_for(lambda: len(output_lines(out, "app")) == 5, timeout=30, what="lines in the new active file")
    every = output_lines(out, "app", include_rotated=True)
    assert every == make_lines("r", 0, n)
    r = ctl_tail(h, ep.control, "app", "-n", "72", "--count", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == every[-72:]
    r = ctl_tail(h, ep.control, "app", "-n", "1000", "--count", "0")  # more than there is: all
    assert r.stdout.splitlines() == every


def test_tail_n_0_prints_only_new_lines(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("old", 0, 20))
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    wait_for(lambda: len(output_lines(h.path("out"), "app")) == 20, timeout=30, what="old lines written")
    proc = subprocess.Popen([sys.executable, "-m", "aggregator.ctl", "--control", ep.control, "tail", "app",
                             "-n", "0", "--count", "3"], stdout=subprocess.PIPE, text=True)
    try:
        n = 0
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            append_lines(log, make_lines("new", n, 1))  # until the subscription has reached XPUB
            n += 1
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert len(out.splitlines()) == 3 and all(x.startswith("new#") for x in out.splitlines())


def test_tail_n_of_a_json_topic_prints_the_lines_as_written(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("j", 0, 10))
    h.aggregator(ep, "aggregator.format=\"json\"")
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    wait_for(lambda: len(output_lines(h.path("out"), "app")) == 10, timeout=30, what="lines written")
    r = ctl_tail(h, ep.control, "app", "-n", "4", "--count", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == make_lines("j", 6, 4)


@pytest.fixture
def keys(h: Harness) -> Keys:
    """As test_security's: the aggregator's, an agent's (web-01) and an admin's key pairs."""
    k = Keys(h.path("keys", "private"), h.path("keys", "agents"), h.path("keys", "admins"))
    for name in ("aggregator", "web-01", "admin"):
        curve.generate(str(k.private), name)
    k.agents.mkdir()
    k.admins.mkdir()
    shutil.copy(k.public("web-01"), k.agents)
    shutil.copy(k.public("admin"), k.admins)
    return k


def test_tail_n_under_curve_is_a_read_only_command_for_any_authorised_key(h: Harness, keys: Keys) -> None:
    """The history comes over the control connection from the aggregator (it may be on another
    host), allowed where tail is: an agent's key over tcp, not only an admin's or ipc://."""
    tcp, local_ep = secure_aggregator(h, keys)
    log = h.path("logs", "a.log")
    append_lines(log, make_lines("s", 0, 12))
    h.agent(tcp, [{"paths": [str(log)], "topic": "sec"}], *agent_keys(keys))
    wait_for(lambda: len(output_lines(h.path("out"), "sec")) == 12, timeout=30, what="lines written")
    r = ctl_tail(h, tcp.control, "sec", "-n", "5", "--count", "0", "--curve-key", keys.secret("web-01"),
                 "--server-key", keys.public("aggregator"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == make_lines("s", 7, 5)
    # On the aggregator's own host, over its ipc:// control socket (no CURVE there) as the README
    # says: the keys are for the CURVE-only XPUB.
    local = ctl_tail(h, local_ep.control, "sec", "-n", "2", "--count", "0", "--curve-key",
                     keys.secret("web-01"), "--server-key", keys.public("aggregator"))
    assert local.returncode == 0, local.stderr
    assert local.stdout.splitlines() == make_lines("s", 10, 2)
    status = h.ctl(local_ep, "--curve-key", keys.secret("web-01"), "--server-key",
                   keys.public("aggregator"), "status")
    assert status.returncode == 0, status.stderr


def test_tail_n_of_a_topic_split_by_agent_prints_each_agents_last_lines(h: Harness) -> None:
    """Files split by agent hold no order across agents: the last N lines of each agent's
    files, agent after agent (named by the raw_agent format), then the live lines."""
    ep = h.endpoints()
    h.aggregator(ep, "aggregator.split_by_agent=true", "aggregator.format=\"raw_agent\"")
    for name, tag in (("web-01", "w"), ("db-01", "d")):
        log = h.path("logs", f"{name}.log")
        append_lines(log, make_lines(tag, 0, 8))
        h.agent(ep, [{"paths": [str(log)], "topic": "app"}], name=name)
    out = h.path("out", "app")
    wait_for(lambda: all(count_lines(out / n / "app.log") == 8 for n in ("web-01", "db-01")), timeout=30,
             what="both agents' lines")
    r = ctl_tail(h, ep.control, "app", "-n", "2", "--count", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"db-01 {x}" for x in make_lines("d", 6, 2)] + \
        [f"web-01 {x}" for x in make_lines("w", 6, 2)]
    # `aggregatorctl rotate app` rolls every agent's file over; the history then comes from them.
    r2 = h.ctl(ep, "rotate", "app")
    assert r2.returncode == 0, r2.stderr
    assert sorted(x.rsplit("/", 1)[0] for x in r2.stdout.splitlines()) == \
        ["rotated to app/db-01", "rotated to app/web-01"], r2.stdout
    wait_for(lambda: all(count_lines(out / n / "app.log") == 0 and list((out / n).glob("app.*.log*"))
                         for n in ("web-01", "db-01")), timeout=30, what="both agents' files rotated")
    again = ctl_tail(h, ep.control, "app", "-n", "2", "--count", "0")
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr


@pytest.mark.parametrize(("n", "max_bytes"), [(5, 1 << 20), (30_000, 1 << 20), (30_000, 100_000), (10, 5)])
def test_history_of_a_gzip_file_keeps_the_last_lines_within_its_bounds(tmp_path: Path, n: int,
                                                                        max_bytes: int) -> None:
    lines = [f"{i:06d} {'y' * (i % 50)}".encode() for i in range(50_000)]
    gz = tmp_path / "t.20260101T000000Z.log.gz"
    gz.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    for path in (str(gz), None):
        if path is None:  # the same, uncompressed, read backwards
            plain = tmp_path / "t.log"
            plain.write_bytes(b"\n".join(lines) + b"\n")
            got, cut = history.read_history(history.Snapshot(fd=os.open(plain, os.O_RDONLY),
                                                              size=plain.stat().st_size), n, max_bytes)
        else:
            got, cut = history.read_history(history.Snapshot(rotated=[path]), n, max_bytes)
        fit = 0
        total = 0
        for line in reversed(lines[-n:]):
            total += len(line) + 1
            if total > max_bytes:
                break
            fit += 1
        assert got == (lines[-fit:] if fit else [])
        assert cut == (fit < n)
