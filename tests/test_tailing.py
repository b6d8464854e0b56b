"""What happens to files: rotation (with the real logrotate), truncation, restarts, odd files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from harness import (
    Harness,
    Writer,
    append_lines,
    check_exactly_once,
    count_lines,
    make_lines,
    output_lines,
    wait_for,
)

LOGROTATE = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate")
                                          else None)
needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="logrotate is not installed "
                                     "(make test installs it with apt-get on Debian when run as root)")


def logrotate(h: Harness, path: Path, *directives: str) -> None:
    conf = h.path(f"logrotate-{time.monotonic_ns()}.conf")
    body = "\n    ".join(("rotate 10", "missingok", "nocompress", *directives))
    conf.write_text(f"{path} {{\n    {body}\n}}\n")
    assert LOGROTATE is not None
    r = subprocess.run([LOGROTATE, "-f", "-s", str(h.path("logrotate.state")), str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def settle(h: Harness, topic: str, total: int, timeout: float = 30) -> list[str]:
    out = h.path("out", topic, f"{topic}.log")
    wait_for(lambda: count_lines(out) >= total, timeout=timeout, what=f"{total} lines of {topic}")
    time.sleep(0.6)  # let anything doubled arrive before checking
    return output_lines(h.path("out"), topic)


def agent_status(h: Harness, name: str = "node1") -> dict[str, object]:
    s = h.agent_status(name)
    assert s is not None, "the agent does not answer on its status socket"
    return s


def following(h: Harness, path: Path, name: str = "node1") -> None:
    """Wait until the agent follows ``path`` (created here if missing). A file created and
    rotated away before the agent ever saw it cannot be shipped; under load an agent can take
    longer to start than a test takes to rotate twice."""
    path.touch()
    st = path.stat()
    ident = f"{st.st_dev}:{st.st_ino}:"
    wait_for(lambda: (s := h.agent_status(name)) is not None
             and any(f["path"] == str(path) and f["identity"].startswith(ident) for f in s["files"]),
             what=f"the agent following {path}")


@needs_logrotate
@pytest.mark.parametrize("hold_open", [False, True], ids=["reopen-per-write", "holds-fd"])
def test_rotate_rename_create(h: Harness, hold_open: bool) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    following(h, log)
    writer = Writer({"a": log}, lines_per_tick=20, tick_s=0.003, hold_open=hold_open).start()
    for _ in range(4):
        time.sleep(0.4)
        logrotate(h, log, "create 0644")
        if hold_open:
            time.sleep(0.1)  # the application writes on into the renamed file for a moment
            writer.reopen()
        following(h, log)  # a file created and rotated away unseen is a case of its own
    counts = writer.stop()
    check_exactly_once(settle(h, "app", counts["a"]), counts)


@needs_logrotate
def test_rotate_copytruncate(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    total = 0
    for round_ in range(3):
        append_lines(log, make_lines("a", total, 500))
        total += 500
        settle(h, "app", total)
        logrotate(h, log, "copytruncate")
        assert log.stat().st_size == 0
        del round_
    append_lines(log, make_lines("a", total, 500))
    total += 500
    check_exactly_once(settle(h, "app", total), {"a": total})


@needs_logrotate
def test_copytruncate_under_load_finishes_from_the_copy(h: Harness) -> None:
    """Lines written just before the truncate, not read yet, are found in the copy (app.log.1)."""
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    following(h, log)
    writer = Writer({"a": log}, lines_per_tick=40, tick_s=0.002).start()
    for _ in range(3):
        time.sleep(0.5)
        with writer.pause():
            logrotate(h, log, "copytruncate")
    counts = writer.stop()
    check_exactly_once(settle(h, "app", counts["a"]), counts)


def test_truncate_in_place(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    append_lines(log, make_lines("a", 0, 300))
    settle(h, "app", 300)
    with open(log, "r+b") as fh:
        fh.truncate(0)
    append_lines(log, make_lines("a", 300, 100))
    check_exactly_once(settle(h, "app", 400), {"a": 400})


def test_truncated_and_rewritten_past_the_offset_while_the_agent_stalls(h: Harness) -> None:
    """The agent is stopped (SIGSTOP) while the file is cut and written again, longer than
    before: when it goes on, the size alone looks like growth. The changed head tells it to
    read the new content from 0."""
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    append_lines(log, make_lines("a", 0, 100))
    settle(h, "app", 100)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        with open(log, "wb") as fh:  # truncated, then longer than the agent's offset
            fh.write("".join(f"{line}\n" for line in make_lines("b", 0, 300)).encode())
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    check_exactly_once(settle(h, "app", 400), {"a": 100, "b": 300})


def test_rotated_while_the_agent_was_down_is_finished(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    append_lines(log, make_lines("a", 0, 1000))
    settle(h, "app", 1000)
    assert agent.stop() == 0
    append_lines(log, make_lines("a", 1000, 200))     # written after the agent stopped
    os.rename(log, h.path("logs", "app.log.1"))        # rotated away, out of the glob
    append_lines(log, make_lines("a", 1200, 300))     # the new file
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    check_exactly_once(settle(h, "app", 1500), {"a": 1500})


def test_partial_last_line_survives_kill_9(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    append_lines(log, make_lines("a", 0, 10))
    with open(log, "ab") as fh:
        fh.write(b"a#00000010 half of a line")
    settle(h, "app", 10)
    agent.kill9()
    with open(log, "ab") as fh:
        fh.write(b" and its other half\n")
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    lines = settle(h, "app", 11)
    assert lines[-1] == "a#00000010 half of a line and its other half"
    assert len(lines) == 11


def test_restart_resumes_exactly_across_rotation(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    src = [{"paths": [f"{h.path('logs')}/app.log*"], "topic": "app"}]
    agent = h.agent(ep, src)
    append_lines(log, make_lines("a", 0, 2000))
    settle(h, "app", 2000)
    agent.kill9()
    os.rename(log, h.path("logs", "app.log.1"))  # still matched by the glob
    append_lines(log, make_lines("a", 2000, 100))
    h.agent(ep, src)
    check_exactly_once(settle(h, "app", 2100), {"a": 2100})


def test_a_copy_of_a_read_file_is_not_shipped_again(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*"], "topic": "app"}])
    append_lines(log, make_lines("a", 0, 500))
    settle(h, "app", 500)
    shutil.copy(log, h.path("logs", "app.log.bak"))
    append_lines(log, make_lines("a", 500, 10))
    check_exactly_once(settle(h, "app", 510), {"a": 510})
    # The copy is known and ignored, not missed: it shows up as a copy in the agent's status.
    assert wait_for(lambda: agent_status(h)["copies_ignored"] == 1, what="copy noticed")


def test_small_files_are_shipped(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    for i in range(5):
        append_lines(h.path("logs", f"s{i}.log"), [f"s{i}#00000000 tiny"])
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    check_exactly_once(settle(h, "app", 5), {f"s{i}": 1 for i in range(5)})


def test_inode_reused_by_a_new_file_is_read_from_its_start(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    append_lines(log, make_lines("a", 0, 100))
    settle(h, "app", 100)
    assert agent.stop() == 0
    # Same inode, new content (what a reused inode looks like to the agent).
    with open(log, "r+b") as fh:
        fh.truncate(0)
        fh.write(("\n".join(make_lines("b", 0, 150)) + "\n").encode())
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    check_exactly_once(settle(h, "app", 250), {"a": 100, "b": 150})


def test_a_long_line_does_not_stop_the_file(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app", "max_line_bytes": 100_000}])
    append_lines(log, make_lines("a", 0, 5))
    with open(log, "ab") as fh:
        fh.write(b"L" * 3_000_000 + b"\n")
    append_lines(log, make_lines("a", 5, 5))
    lines = settle(h, "app", 11)
    assert lines[5] == "L" * 100_000
    check_exactly_once(lines[:5] + lines[6:], {"a": 10})
    status = agent_status(h)
    assert status["files"][0]["discarded_bytes"] == 2_900_000  # type: ignore[index]


def test_excludes_and_compressed_files_are_skipped(h: Harness) -> None:
    ep = h.endpoints()
    logs = h.path("logs")
    h.aggregator(ep)
    append_lines(logs / "keep.log", ["k#00000000 keep"])
    append_lines(logs / "skip-me.log", ["x#00000000 excluded"])
    (logs / "old.log.gz").write_bytes(b"\x1f\x8b\x08 not really gzip\n")
    (logs / "old.log.zst").write_bytes(b"zstd?\n")
    h.agent(ep, [{"paths": [f"{logs}/*"], "topic": "app", "exclude": ["skip-*"]}])
    check_exactly_once(settle(h, "app", 1), {"k": 1})


def test_files_and_directories_that_appear_later_are_found(h: Harness) -> None:
    """No watch event reaches a directory that did not exist: the periodic rescan finds it."""
    ep = h.endpoints()
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/**/*.log"], "topic": "app"}])
    time.sleep(0.5)
    deep = h.path("logs", "later", "deeper")
    deep.mkdir(parents=True)
    append_lines(deep / "new.log", make_lines("n", 0, 50))
    append_lines(h.path("logs", "top.log"), make_lines("t", 0, 50))
    check_exactly_once(settle(h, "app", 100), {"n": 50, "t": 50})


def test_force_polling(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}], "agent.force_polling=true")
    writer = Writer({"a": log}, limit=2000).start()
    wait_for(lambda: writer.total >= 2000, what="writer")
    check_exactly_once(settle(h, "app", 2000), writer.stop())


def test_many_files_with_bounded_descriptors(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    n_dirs, per_dir = 100, 100
    for d in range(n_dirs):
        sub = h.path("logs", f"d{d:03d}")
        sub.mkdir()
        for f in range(per_dir):
            (sub / f"f{f:03d}.log").write_bytes(f"d{d}f{f}#00000000 hello\n".encode())
    # The default rescan interval: the harness's 300 ms rescans 10,000 files 3 times a second,
    # which the health check at the end rightly counts as busy.
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/**/*.log"], "topic": "app"}],
                    "agent.max_open_files=200", "agent.rescan_interval_ms=5000")
    settle(h, "app", n_dirs * per_dir, timeout=120)
    fds = len(os.listdir(f"/proc/{agent.pid}/fd"))
    assert fds < 200 + 50, fds
    # One busy file among them is followed too (and does not starve the idle ones).
    append_lines(h.path("logs", "d000", "f000.log"), make_lines("d0f0", 1, 1000))
    append_lines(h.path("logs", "d099", "f099.log"), make_lines("d99f99", 1, 1))
    expected = {f"d{d}f{f}": 1 for d in range(n_dirs) for f in range(per_dir)}
    expected["d0f0"] = 1001
    expected["d99f99"] = 2
    check_exactly_once(settle(h, "app", n_dirs * per_dir + 1001, timeout=60), expected)


def test_agent_status_shows_files_and_lag(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    append_lines(log, make_lines("a", 0, 100))
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    settle(h, "app", 100)
    s = wait_for(lambda: (st := agent_status(h))["files"][0]["offset"] == log.stat().st_size and st,
                 what="offset at the end")
    f = s["files"][0]
    assert f["path"] == str(log) and f["lag_bytes"] == 0 and f["size"] == log.stat().st_size
    # The aggregator learns files and lag from the agent's heartbeats.
    agg = wait_for(lambda: (st := h.status(ep))["agents"] and st["agents"][0]["files"] == 1 and st,
                   what="agent's heartbeat in the aggregator's status")
    assert agg["agents"][0]["lag_bytes"] == 0


def test_sighup_reloads_sources_and_keeps_running_on_a_bad_file(h: Harness) -> None:
    import signal
    ep = h.endpoints()
    h.aggregator(ep)
    conf = h.path("agent.toml")

    def write_conf(globs: list[str]) -> None:
        conf.write_text(f"""
[agent]
name = "node1"
state_dir = "{h.path('st-node1')}"
data = "{ep.pull}"
control = "{ep.control}"
rescan_interval_ms = 300

[[sources]]
paths = {orjson.dumps(globs).decode()}
topic = "app"
""")
    write_conf([str(h.path("logs", "one.log"))])
    append_lines(h.path("logs", "one.log"), make_lines("one", 0, 10))
    append_lines(h.path("logs", "two.log"), make_lines("two", 0, 20))
    agent = h._proc("agent-node1", [sys.executable, "-m", "agent", "--config", str(conf)]).start()
    settle(h, "app", 10)
    write_conf([str(h.path("logs", "one.log")), str(h.path("logs", "two.log"))])
    agent.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    check_exactly_once(settle(h, "app", 30), {"one": 10, "two": 20})
    conf.write_text("[agent\nbroken")
    agent.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: "reload refused" in agent.log(), what="the refusal logged")
    append_lines(h.path("logs", "two.log"), make_lines("two", 20, 5))
    check_exactly_once(settle(h, "app", 35), {"one": 10, "two": 25})
    assert agent.alive()


def test_multiline_records_ship_whole(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep, "aggregator.format=json")
    h.agent(ep, [{"paths": [str(log)], "topic": "app", "multiline_start": r"^\d{4}-\d\d-\d\d ",
                  "multiline_timeout_ms": 300}])
    with open(log, "ab") as fh:
        fh.write(b"2026-11-22 ERROR boom\n  at a(x.py:1)\n  at b(x.py:2)\n2026-11-22 INFO fine\n")
    time.sleep(0.2)
    with open(log, "ab") as fh:
        fh.write(b"2026-11-22 WARN last\n  continued\n")  # the last record: shipped after the timeout
    out = h.path("out", "app", "app.log")
    wait_for(lambda: count_lines(out) >= 3, what="three records")
    records = [orjson.loads(line)["line"] for line in out.read_text().splitlines()]
    assert records == ["2026-11-22 ERROR boom\n  at a(x.py:1)\n  at b(x.py:2)", "2026-11-22 INFO fine",
                       "2026-11-22 WARN last\n  continued"]
