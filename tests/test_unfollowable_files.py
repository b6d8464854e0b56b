"""Globs that match things that are not log files: FIFOs, sockets, devices, directories, /proc
files. Each is said once (what it is, and that it is skipped), the agent never blocks or loops on
it, and the other files are followed as ever."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

from harness import PY, Harness, append_lines, check_exactly_once, make_lines, output_lines, wait_for


def said(log: str, text: str) -> int:
    return sum(1 for line in log.splitlines() if text in line)


def test_fifo_socket_device_and_directory_in_a_glob_are_skipped_and_said_once(h: Harness) -> None:
    ep = h.endpoints()
    logs = h.path("logs")
    append_lines(logs / "a.log", make_lines("a", 0, 100))
    os.mkfifo(logs / "pipe.log")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(logs / "sock.log"))
    os.symlink("/dev/null", logs / "stdout.log")  # as nginx images point access.log at /dev/stdout
    (logs / "dir.log").mkdir()
    # An application writing to the FIFO all along (both ends held here: nothing blocks).
    pipe = os.open(logs / "pipe.log", os.O_RDWR | os.O_NONBLOCK)
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.01):
            os.write(pipe, b"to the pipe\n")
            os.read(pipe, 4096)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        h.aggregator(ep)
        agent = h.agent(ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
        wait_for(lambda: len(h.lines()) >= 100, what="a.log's lines")
        wait_for(lambda: "stdout.log is a character device" in agent.log(), what="the skips said")
        # Several full rescans later (a new file makes one), each is still said once.
        for n in range(3):
            append_lines(logs / f"b{n}.log", make_lines(f"b{n}", 0, 10))
            wait_for(lambda n=n: f"b{n}#00000009" in "".join(h.lines()), what=f"b{n}.log's lines")
        append_lines(logs / "a.log", make_lines("a", 100, 50))
        wait_for(lambda: len(h.lines()) >= 180, what="a.log's new lines")
        said_by = agent.log()
        for name, what, level in [("pipe.log", "a named pipe (FIFO)", "WARNING"),
                                  ("sock.log", "a socket", "WARNING"),
                                  ("stdout.log", "a character device, through a symlink to /dev/null",
                                   "WARNING"),
                                  ("dir.log", "a directory", "DEBUG")]:
            text = f"{logs / name} is {what}: not followed"
            assert said(said_by, text) == 1, (text, said_by)
            assert f"{level} fleetlog.agent: {text}" in said_by
        status = h.agent_status()
        assert status is not None
        assert {s["path"] for s in status["skipped"]} == {str(logs / n) for n in
                                                         ("pipe.log", "sock.log", "stdout.log")}
        assert sorted(f["path"] for f in status["files"]) == sorted(
            str(logs / n) for n in ("a.log", "b0.log", "b1.log", "b2.log"))
        # The text form says it too (it listed only the files followed).
        text = subprocess.run([PY, "-m", "agent", "status", "--set",
                               f"agent.state_dir={h.root / 'st-node1'}"],
                              capture_output=True, text=True, timeout=30)
        assert text.returncode == 0, text.stderr
        skipped_line = f"skipped (not a log file): {logs / 'pipe.log'}: a named pipe (FIFO)"
        assert skipped_line in text.stdout, text.stdout
        wait_for(h.all_acknowledged, what="every line acknowledged")
        h.assert_quiet(ep)  # the FIFO's writes make no rescan loop
        check_exactly_once(h.lines(), {"a": 150, "b0": 10, "b1": 10, "b2": 10})
    finally:
        stop.set()
        feeder.join(timeout=5)
        os.close(pipe)
        sock.close()


def test_proc_files_in_a_glob_are_skipped_and_the_log_beside_them_followed(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    append_lines(log, make_lines("a", 0, 100))
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": ["/proc/uptime", "/proc/loadavg", str(log)], "topic": "app"}])
    wait_for(lambda: len(h.lines()) >= 100, what="app.log's lines")
    append_lines(log, make_lines("a", 100, 50))
    wait_for(lambda: len(h.lines()) >= 150, what="app.log's new lines")
    wait_for(h.all_acknowledged, what="every line acknowledged")
    h.assert_quiet(ep)  # /proc/uptime changes all the time: no "truncated" or read error in a loop
    said_by = agent.log()
    for name in ("/proc/uptime", "/proc/loadavg"):
        text = f"{name} is a file of the proc pseudo-filesystem"
        assert said(said_by, text) == 1, said_by
        assert f"WARNING fleetlog.agent: {text}" in said_by
        assert f"reading {name} failed" not in said_by and f"{name} was truncated" not in said_by
    check_exactly_once(h.lines(), {"a": 150})
    assert len(output_lines(h.path("out"), "app")) == 150  # nothing of /proc shipped
