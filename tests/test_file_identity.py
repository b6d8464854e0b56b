"""Telling files apart: what happens to a file that looks like another, a name that is not
UTF-8, a symlink, a file the agent may not read, a directory that goes away.

Each test is named after what happens to the file; real files, real logrotate, a real agent and
aggregator. The rule under test (README, "Following files"): a file is the same file only if its
device and inode match *and* its first bytes and the bytes just before the acknowledged offset
are the ones shipped; anything in doubt is shipped, and said at WARNING.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from harness import Harness, append_lines, check_exactly_once, count_lines, make_lines, output_lines, wait_for
from test_tailing import agent_status, logrotate, needs_logrotate, settle

BANNER = [f"token already exists, skipping {'.' * 40} ok" for _ in range(30)]  # ~2.2 KiB, no timestamps


def write_file(path: Path, lines: list[str], mode: str = "ab") -> None:
    with open(path, mode) as fh:
        fh.write("".join(f"{line}\n" for line in lines).encode())


def latency_s(h: Harness, path: Path, topic: str, tag: str, n: int, timeout: float = 3.0) -> float:
    """Append one line and return how long it took to reach the topic's output."""
    out = h.path("out", topic, f"{topic}.log")
    before = count_lines(out)
    t0 = time.monotonic()
    append_lines(path, make_lines(tag, n, 1))
    wait_for(lambda: count_lines(out) > before, timeout=timeout, interval=0.005,
             what=f"line {tag}#{n} within {timeout}s")
    return time.monotonic() - t0


# ---- 1. the same first KiB is not the same file --------------------------------------------


def test_two_files_with_the_same_first_kib_are_both_shipped(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    job_a, job_b = h.path("logs", "job-a.log"), h.path("logs", "job-b.log")
    write_file(job_a, BANNER + make_lines("a", 0, 50))
    settle(h, "app", 80)
    write_file(job_b, BANNER + make_lines("b", 0, 40))
    settle(h, "app", 150)
    append_lines(job_b, make_lines("b", 40, 10))  # and what it appends later
    lines = settle(h, "app", 160)
    check_exactly_once(lines, {"a": 50, "b": 50})
    assert lines.count(BANNER[0]) == 60


def test_identical_headers_with_different_lengths_are_both_shipped(h: Harness) -> None:
    """CSV files with one long header: one shorter than the other's offset, one longer."""
    ep = h.endpoints()
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.csv"], "topic": "csv"}])
    header = ["ts," + ",".join(f"column_{i:03d}" for i in range(120))]  # 1.3 KiB
    write_file(h.path("logs", "a.csv"), header + make_lines("a", 0, 200))
    settle(h, "csv", 201)
    write_file(h.path("logs", "short.csv"), header + make_lines("s", 0, 3))
    write_file(h.path("logs", "long.csv"), header + make_lines("l", 0, 400))
    lines = settle(h, "csv", 201 + 4 + 401)
    check_exactly_once(lines, {"a": 200, "s": 3, "l": 400})


def test_a_real_copy_is_still_not_shipped_again(h: Harness) -> None:
    """The rule still recognises a true copy: same head, same bytes before the offset."""
    ep = h.endpoints()
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*"], "topic": "app"}])
    log = h.path("logs", "app.log")
    write_file(log, BANNER + make_lines("a", 0, 300))
    settle(h, "app", 330)
    shutil.copy(log, h.path("logs", "app.log.bak"))
    append_lines(log, make_lines("a", 300, 10))
    check_exactly_once(settle(h, "app", 340), {"a": 310})
    wait_for(lambda: agent_status(h)["copies_ignored"] == 1, what="the copy noticed")


def test_a_file_taken_for_a_copy_that_grows_with_other_lines_is_shipped_whole(h: Harness) -> None:
    """job-b starts as an exact copy of all job-a shipped, then writes lines of its own."""
    ep = h.endpoints()
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    job_a, job_b = h.path("logs", "job-a.log"), h.path("logs", "job-b.log")
    write_file(job_a, BANNER)
    settle(h, "app", 30)
    wait_for(lambda: agent_status(h)["files"][0]["offset"] == job_a.stat().st_size,  # type: ignore[index]
             what="job-a acknowledged")
    write_file(job_b, BANNER)
    wait_for(lambda: agent_status(h)["copies_ignored"] == 1, what="job-b taken for a copy")
    write_file(job_b, make_lines("b", 0, 20))
    lines = settle(h, "app", 80)
    check_exactly_once(lines, {"b": 20})
    assert lines.count(BANNER[0]) == 60
    assert "grows with other bytes" in agent.log()


# ---- 2. truncated and written again past the offset ------------------------------------------


def test_truncated_and_rewritten_past_the_offset_is_shipped_from_zero(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    banner = [f"starting app v1.2.3 {'=' * 60}" for _ in range(18)]  # 1.5 KiB, the same each start
    write_file(log, banner + make_lines("a", 0, 20))
    settle(h, "app", 38)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        write_file(log, banner + make_lines("b", 0, 40), mode="wb")  # O_TRUNC, then longer than before
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    lines = settle(h, "app", 38 + 58)
    check_exactly_once(lines, {"a": 20, "b": 40})
    assert lines.count(banner[0]) == 36


def test_truncated_and_rewritten_while_the_agent_was_down_is_shipped_from_zero(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    src = [{"paths": [str(log)], "topic": "app"}]
    agent = h.agent(ep, src)
    write_file(log, BANNER + make_lines("a", 0, 20))
    settle(h, "app", 50)
    assert agent.stop() == 0
    write_file(log, BANNER + make_lines("b", 0, 40), mode="wb")
    h.agent(ep, src)
    lines = settle(h, "app", 50 + 70)
    check_exactly_once(lines, {"a": 20, "b": 40})


# ---- 3. a symlink and its target, overlapping globs --------------------------------------------


def test_symlink_and_target_are_one_file(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    real = h.path("logs", "app-2026-11-30.log")
    write_file(real, make_lines("a", 0, 100))
    os.symlink(real.name, h.path("logs", "current"))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*"], "topic": "app"}])
    settle(h, "app", 100)
    append_lines(real, make_lines("a", 100, 100))
    check_exactly_once(settle(h, "app", 200), {"a": 200})
    status = agent_status(h)
    assert len(status["files"]) == 1, status["files"]  # type: ignore[arg-type]
    assert "renamed" not in agent.log()


def test_overlapping_globs_ship_a_file_once(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    log = h.path("logs", "app.log")
    write_file(log, make_lines("a", 0, 100))
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"},
                 {"paths": [f"{h.path('logs')}/app*"], "topic": "app"}])
    settle(h, "app", 100)
    append_lines(log, make_lines("a", 100, 50))
    check_exactly_once(settle(h, "app", 150), {"a": 150})


# ---- 4. a rotated file that left the directory the agent looks in ----------------------------


@needs_logrotate
def test_rotated_symlink_target_finished_after_restart(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    real_dir, link_dir = h.path("logs", "real"), h.path("logs", "containers")
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "app.log"
    write_file(real, make_lines("a", 0, 100))
    os.symlink(real, link_dir / "app.log")
    src = [{"paths": [f"{link_dir}/*.log"], "topic": "app"}]
    agent = h.agent(ep, src)
    settle(h, "app", 100)
    assert agent.stop() == 0
    append_lines(real, make_lines("a", 100, 50))  # unread when the agent stopped
    logrotate(h, real, "create 0644")
    append_lines(real, make_lines("a", 150, 30))
    agent = h.agent(ep, src)
    check_exactly_once(settle(h, "app", 180), {"a": 180})
    assert "gone since the last run" not in agent.log()


@needs_logrotate
def test_rotated_into_another_directory_while_down_is_finished(h: Harness) -> None:
    """logrotate's ``olddir``: the rotated file leaves the directory the glob looks in."""
    ep = h.endpoints()
    h.aggregator(ep)
    log = h.path("logs", "app.log")
    h.path("logs", "old").mkdir()
    write_file(log, make_lines("a", 0, 100))
    src = [{"paths": [str(log)], "topic": "app"}]
    agent = h.agent(ep, src)
    settle(h, "app", 100)
    assert agent.stop() == 0
    append_lines(log, make_lines("a", 100, 50))
    logrotate(h, log, "create 0644", f"olddir {h.path('logs', 'old')}")
    assert h.path("logs", "old", "app.log.1").exists()
    append_lines(log, make_lines("a", 150, 30))
    h.agent(ep, src)
    check_exactly_once(settle(h, "app", 180), {"a": 180})


def test_moved_out_of_reach_while_down_is_a_warning_with_the_bytes(h: Harness) -> None:
    """Where the agent cannot finish a file, it says so at WARNING with the bytes it could not
    ship; a file gone while the agent was down, all it had seen shipped, is a WARNING without a
    count (lines written after the agent stopped, if any, are lost: nobody can count them)."""
    ep = h.endpoints()
    agg = h.aggregator(ep)
    log = h.path("logs", "app.log")
    write_file(log, make_lines("a", 0, 10))
    src = [{"paths": [str(log)], "topic": "app"}]
    agent = h.agent(ep, src)
    settle(h, "app", 10)
    wait_for(lambda: agent_status(h)["files"][0]["offset"] == log.stat().st_size,  # type: ignore[index]
             what="the offset acknowledged")
    assert agent.stop() == 0
    os.unlink(log)
    agent = h.agent(ep, src)
    wait_for(lambda: "ready" in agent.log(), what="the agent up")
    gone = [x for x in agent.log().splitlines() if "WARNING" in x and "gone since the last run" in x]
    assert len(gone) == 1 and "after the agent stopped" in gone[0] and " bytes" not in gone[0], gone
    write_file(log, make_lines("b", 0, 10))
    settle(h, "app", 20)
    assert agg.stop() == 0
    append_lines(log, make_lines("b", 10, 5))  # seen by the agent, never acknowledged: 5 x 72 bytes
    wait_for(lambda: agent_status(h)["files"][0]["size"] == log.stat().st_size,  # type: ignore[index]
             what="the agent sees the new lines")
    assert agent.stop() == 0
    os.rename(log, h.path("elsewhere.log"))  # out of reach
    h.aggregator(ep)
    agent = h.agent(ep, src)
    wait_for(lambda: [x for x in agent.log().splitlines() if "WARNING" in x and "360 bytes" in x],
             what="the loss said at WARNING")


# ---- 5. nothing about one file stops the agent -------------------------------------------------


def test_non_utf8_file_name_is_shipped(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep, "aggregator.format=json")
    logs = os.fsencode(h.path("logs"))
    odd = logs + b"/caf\xe9.log"
    with open(odd, "wb") as fh:
        fh.write(("\n".join(make_lines("x", 0, 20)) + "\n").encode())
    append_lines(h.path("logs", "plain.log"), make_lines("p", 0, 20))
    src = [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}]
    agent = h.agent(ep, src)
    settle(h, "app", 40)
    assert agent.alive()
    # The checkpoint, the status and the wire carry the exact bytes of the name.
    status = agent_status(h)
    odd_entry = next(f for f in status["files"] if "caf" in f["path"])  # type: ignore[union-attr]
    assert odd_entry["path"].endswith("caf\\xe9.log")
    assert os.fsencode(odd) == base64.b64decode(odd_entry["path_base64"])
    out = [orjson.loads(line) for line in h.path("out", "app", "app.log").read_text().splitlines()]
    assert any(r["path"].endswith("caf\\xe9.log") for r in out)
    assert agent.stop() == 0
    with open(odd, "ab") as fh:
        fh.write(("\n".join(make_lines("x", 20, 5)) + "\n").encode())
    h.agent(ep, src)
    records = settle(h, "app", 45)  # resumed from the checkpoint: only the 5 new lines
    check_exactly_once([orjson.loads(r)["line"] for r in records], {"x": 25, "p": 20})


# ---- 6. compress without delaycompress ---------------------------------------------------------


@needs_logrotate
def test_compress_without_delaycompress_keeps_the_descriptor(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    agent = h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    app = open(log, "ab", buffering=0)  # noqa: SIM115  the application's descriptor
    try:
        app.write(("\n".join(make_lines("a", 0, 100)) + "\n").encode())
        settle(h, "app", 100)
        logrotate(h, log, "create 0644", "compress")
        assert not h.path("logs", "app.log.1").exists()  # gzip unlinked it
        wait_for(lambda: "rotated away" in agent.log(), what="the rotation noticed")
        time.sleep(1.0)  # several rescans (300 ms) in which a released descriptor would be let go
        app.write(("\n".join(make_lines("a", 100, 5)) + "\n").encode())  # before the app reopens
    finally:
        app.close()
    append_lines(log, make_lines("a", 105, 10))
    check_exactly_once(settle(h, "app", 115), {"a": 115})


# ---- 7. copytruncate with a writer that does not append ---------------------------------------


@needs_logrotate
def test_copytruncate_nul_run_is_skipped_and_counted(h: Harness) -> None:
    ep = h.endpoints()
    log = h.path("logs", "app.log")
    h.aggregator(ep)
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)  # no O_APPEND: writes at its own offset
    try:
        n = 15_000  # 1.07 MB
        os.write(fd, ("\n".join(make_lines("a", 0, n)) + "\n").encode())
        settle(h, "app", n, timeout=60)
        written = os.lseek(fd, 0, os.SEEK_CUR)
        logrotate(h, log, "copytruncate")
        wait_for(lambda: "truncated" in "".join(p.log() for p in h.procs), what="the truncation seen")
        os.write(fd, ("\n".join(make_lines("a", n, 20)) + "\n").encode())  # at its old offset
    finally:
        os.close(fd)
    lines = settle(h, "app", n + 20, timeout=60)
    check_exactly_once(lines, {"a": n + 20})
    assert not any("\0" in line for line in lines)
    files = wait_for(lambda: (s := agent_status(h)) and s["nul_bytes_skipped"] and s, what="NULs counted")
    assert files["nul_bytes_skipped"] == written  # type: ignore[index]


# ---- 8. watching gaps ---------------------------------------------------------------------------


def test_recreated_directory_is_watched_again(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    d = h.path("logs", "app")
    d.mkdir()
    append_lines(d / "a.log", make_lines("a", 0, 1))
    h.agent(ep, [{"paths": [f"{d}/*.log"], "topic": "app"}], "agent.rescan_interval_ms=3000")
    settle(h, "app", 1)
    shutil.rmtree(d)
    d.mkdir()
    append_lines(d / "b.log", make_lines("b", 0, 1))
    wait_for(lambda: count_lines(h.path("out", "app", "app.log")) >= 2, timeout=10, what="the new file")
    worst = max(latency_s(h, d / "b.log", "app", "b", i) for i in range(1, 6))
    assert worst < 1.0, worst
    check_exactly_once(settle(h, "app", 7), {"a": 1, "b": 6})


def test_nested_source_directories_are_watched(h: Harness) -> None:
    """``/var/log/syslog`` plus ``/var/log/nginx/*.log``: both directories are watched."""
    ep = h.endpoints()
    h.aggregator(ep)
    nginx = h.path("logs", "nginx")
    nginx.mkdir()
    append_lines(h.path("logs", "syslog"), make_lines("s", 0, 1))
    append_lines(nginx / "access.log", make_lines("n", 0, 1))
    h.agent(ep, [{"paths": [str(h.path("logs", "syslog"))], "topic": "sys"},
                 {"paths": [f"{nginx}/*.log"], "topic": "nginx"}], "agent.rescan_interval_ms=3000")
    settle(h, "nginx", 1)
    settle(h, "sys", 1)
    worst = max(latency_s(h, nginx / "access.log", "nginx", "n", i) for i in range(1, 6))
    assert worst < 1.0, worst
    worst = max(latency_s(h, h.path("logs", "syslog"), "sys", "s", i) for i in range(1, 4))
    assert worst < 1.0, worst


# ---- 9. files the agent may not read -----------------------------------------------------------

SETPRIV = shutil.which("setpriv")
# Root reads any file; without these capabilities it obeys the permission bits like anyone else.
NO_DAC = [SETPRIV or "setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
          "-dac_override,-dac_read_search"]


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed")
def test_unreadable_file_warned_per_identity(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    secret = h.path("logs", "secret.log")
    append_lines(secret, make_lines("s", 0, 5))
    secret.chmod(0)
    append_lines(h.path("logs", "fine.log"), make_lines("f", 0, 5))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}], wrap=NO_DAC)
    settle(h, "app", 5)
    wait_for(lambda: agent.log().count("cannot read") == 1, what="one warning")
    status = agent_status(h)
    unreadable = status["unreadable"]
    assert [u["path"] for u in unreadable] == [str(secret)], unreadable  # type: ignore[index]
    assert "ermission" in unreadable[0]["reason"]  # type: ignore[index]
    # Rotated: the new file is another identity, with its own warning.
    os.rename(secret, h.path("logs", "secret.log.1"))
    append_lines(secret, make_lines("t", 0, 5))
    secret.chmod(0)
    wait_for(lambda: agent.log().count("cannot read") == 2, what="a warning for the new file")
    time.sleep(1.0)  # rescans (300 ms) that must not warn again
    assert agent.log().count("cannot read") == 2
    # Made readable: shipped, and no longer listed.
    secret.chmod(0o644)
    settle(h, "app", 10)
    wait_for(lambda: agent_status(h)["unreadable"] == [], what="the list empty")


# ---- more of the same kinds -------------------------------------------------------------------


def test_file_replaced_by_rename_over_is_shipped(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    log = h.path("logs", "app.log")
    write_file(log, BANNER + make_lines("a", 0, 50))
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}])
    settle(h, "app", 80)
    tmp = h.path("logs", "app.log.tmp")
    write_file(tmp, BANNER + make_lines("b", 0, 70))
    os.rename(tmp, log)
    lines = settle(h, "app", 80 + 100)
    check_exactly_once(lines, {"a": 50, "b": 70})


LOOP_OK = shutil.which("losetup") is not None and shutil.which("mkfs.ext4") is not None and os.geteuid() == 0


@pytest.mark.skipif(not LOOP_OK, reason="needs root, losetup and mkfs.ext4")
def test_device_number_changes_across_a_remount(h: Harness) -> None:
    """The same ext4 image mounted through another loop device: same inodes and bytes, another
    device number. The agent resumes at its offset instead of shipping the file again."""
    image = h.path("fs.img")
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mnt = h.path("logs", "mnt")
    mnt.mkdir()
    loops: list[str] = []

    def mount() -> None:
        r = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no loop device: {r.stderr.strip()}")
        loops.append(r.stdout.strip())
        subprocess.run(["mount", loops[-1], str(mnt)], check=True)

    def umount() -> None:
        subprocess.run(["umount", str(mnt)], check=True)

    mount()
    try:
        # The same image through a second loop device: mounted from there, another device number.
        second = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if second.returncode != 0:
            pytest.skip(f"no second loop device: {second.stderr.strip()}")
        loops.append(second.stdout.strip())
        ep = h.endpoints()
        h.aggregator(ep)
        log = mnt / "app.log"
        write_file(log, make_lines("a", 0, 100))
        src = [{"paths": [str(log)], "topic": "app"}]
        agent = h.agent(ep, src)
        settle(h, "app", 100)
        dev1 = log.stat().st_dev
        assert agent.stop() == 0
        umount()
        subprocess.run(["mount", loops[1], str(mnt)], check=True)
        assert log.stat().st_dev != dev1
        append_lines(log, make_lines("a", 100, 20))
        agent = h.agent(ep, src)
        check_exactly_once(settle(h, "app", 120), {"a": 120})
        assert agent.stop() == 0
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_file_that_breaks_handling_does_not_stop_the_others(h: Harness) -> None:
    """A FIFO, a directory named like a log, and a file vanishing between glob and open: none
    stops the agent, and the plain file next to them ships."""
    ep = h.endpoints()
    h.aggregator(ep)
    os.mkfifo(h.path("logs", "fifo.log"))
    h.path("logs", "dir.log").mkdir()
    append_lines(h.path("logs", "ok.log"), make_lines("o", 0, 10))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    settle(h, "app", 10)
    for i in range(20):
        p = h.path("logs", f"flash{i}.log")
        append_lines(p, make_lines(f"f{i}", 0, 1))
        p.unlink()
    append_lines(h.path("logs", "ok.log"), make_lines("o", 10, 10))
    lines = settle(h, "app", 20)
    assert agent.alive()
    check_exactly_once([x for x in lines if x.startswith("o#")], {"o": 20})
    assert output_lines(h.path("out"), "app")


# ---- pure parts: names that are not UTF-8 round-trip ---------------------------------------------


def test_non_utf8_name_round_trips_in_checkpoints_and_on_the_wire(tmp_path: Path) -> None:
    from agent import batch
    from agent.config import SourceConfig
    from agent.offsets import Checkpoint, CheckpointStore
    from agent.tail import Chunk, Tailer, name_from_base64, shown
    from fleetlog import wire

    name = os.fsdecode(b"/var/log/caf\xe9-\xff.log")  # Latin-1 and a byte no encoding has
    store = CheckpointStore(str(tmp_path))
    store.save([Checkpoint("s1", "app", name, 1, 2, "fp", 1024, 0, 10, 1, real_path=name)])
    raw = (tmp_path / "checkpoints.json").read_bytes()
    assert b"caf\\\\xe9-\\\\xff.log" in raw  # readable, and valid JSON
    [cp] = store.load().values()
    assert cp.path == name and cp.real_path == name

    t = Tailer(source=SourceConfig(paths=("/var/log/*",), topic="app"), path=name, stream="s1", dev=1,
               ino=2, fp="fp", fp_len=1024, base=0, acked=0)
    frames = batch.frames_for("node1", t, Chunk(0, 6, "hello\n", 1), v2=True)
    body = orjson.loads(frames[1])
    assert body["path"] == shown(name) == "/var/log/caf\\xe9-\\xff.log"
    assert os.fsencode(name_from_base64(body["path_base64"])) == b"/var/log/caf\xe9-\xff.log"
    assert wire.decode_batch(frames).path == body["path"]  # an aggregator reads it as before
    plain = batch.frames_for("node1", Tailer(source=t.source, path="/var/log/café.log", stream="s2", dev=1,
                                             ino=3, fp="fp", fp_len=1024, base=0, acked=0),
                             Chunk(0, 6, "hello\n", 1), v2=True)
    assert "path_base64" not in orjson.loads(plain[1])  # a UTF-8 name is just itself


def test_non_utf8_directory_name_is_shipped_and_the_agent_lives(h: Harness) -> None:
    """A directory name that is not UTF-8 reaches the heartbeats' file list and the watcher too:
    neither may stop the agent (nor flood its log)."""
    ep = h.endpoints()
    h.aggregator(ep)
    odd_dir = os.fsencode(h.path("logs")) + b"/caf\xe9"
    os.mkdir(odd_dir)
    with open(odd_dir + b"/x.log", "wb") as fh:
        fh.write(("\n".join(make_lines("x", 0, 10)) + "\n").encode())
    (h.path("logs", "ok")).mkdir()
    append_lines(h.path("logs", "ok", "ok.log"), make_lines("o", 0, 10))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*/*.log"], "topic": "app"}])
    settle(h, "app", 20)
    # Heartbeats (with the file list) went out, and lines written later still ship.
    wait_for(lambda: any(a["file_list"] for a in h.status(ep)["agents"]), what="the file list heard")
    append_lines(h.path("logs", "ok", "ok.log"), make_lines("o", 10, 10))
    records = settle(h, "app", 30)
    assert agent.alive()
    check_exactly_once(records, {"x": 10, "o": 20})
    h.assert_quiet(ep)


def test_descriptor_limit_below_max_open_files_ships_every_file(h: Harness) -> None:
    """An agent under a low descriptor limit (a shell's 1024, or less) keeps its followed files
    below it, with a reserve for its sockets and checkpoints, and ships every file."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is needed")
    ep = h.endpoints()
    h.aggregator(ep)
    for i in range(150):
        append_lines(h.path("logs", f"f{i:03d}.log"), make_lines(f"f{i:03d}", 0, 3))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}],
                    "agent.rescan_interval_ms=5000", wrap=["prlimit", "--nofile=100", "--"])
    records = settle(h, "app", 450, timeout=60)
    check_exactly_once(records, {f"f{i:03d}": 3 for i in range(150)})
    assert "descriptor limit" in agent.log() and "cannot save checkpoints" not in agent.log()
    h.assert_quiet(ep)


def test_short_lived_files_whose_inodes_are_reused_are_each_shipped_whole(h: Harness) -> None:
    """Many small files, each written once and deleted half a second later (a job's per-run
    logs; replayed from elastic/beats #2236 with rsyslog #2659's inode reuse): once the agent
    lets a deleted file go, the next new file often gets its inode number. It is another file
    (another head), shipped from 0 — not the old one renamed, followed from the old offset
    (582 of 4,500 lines were never shipped that way)."""
    ep = h.endpoints()
    h.aggregator(ep)
    logs = h.path("logs")
    h.agent(ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
    wait_for(lambda: (s := h.agent_status()) is not None and s["aggregator"] is not None,
             what="the agent connected")
    written: list[tuple[float, Path]] = []
    counts: dict[str, int] = {}
    for i in range(1500):
        path = logs / f"short{i}.log"
        tag = f"s{i}"
        append_lines(path, make_lines(tag, 0, 3))
        counts[tag] = 3
        written.append((time.monotonic(), path))
        while written and time.monotonic() - written[0][0] > 0.5:
            written.pop(0)[1].unlink()
        time.sleep(0.0005 if i % 20 else 0.01)
    time.sleep(0.5)
    for _, path in written:
        path.unlink()
    wait_for(lambda: count_lines(h.path("out", "app", "app.log")) >= 4500, timeout=60,
             what="every line of the 1,500 files")
    check_exactly_once(output_lines(h.path("out"), "app"), counts)


def test_inotify_queue_overflow_is_said_and_every_file_still_shipped(h: Harness) -> None:
    """The kernel's inotify queue overflows (fs.inotify.max_queued_events, per watcher, taken
    when the agent starts: 8 here) while hundreds of files appear: the agent says so at INFO and
    rescans, and every line of every file is shipped once (replayed from fluent-bit #2197)."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    if os.geteuid() != 0 or not os.access(knob, os.W_OK):
        pytest.skip("needs root to lower fs.inotify.max_queued_events")
    ep = h.endpoints()
    h.aggregator(ep)
    logs = h.path("logs")
    before = knob.read_text().strip()
    knob.write_text("8")
    try:
        agent = h.agent(ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
        wait_for(lambda: " ready: " in agent.log(), what="the agent watching")
    finally:
        # The agent's queue keeps its 8. (An agent of another test started in this second gets
        # 8 too: it rescans on each overflow, which loses nothing.)
        knob.write_text(before)
    wait_for(lambda: (s := h.agent_status()) is not None and s["aggregator"] is not None,
             what="the agent connected")
    counts = {}
    for i in range(300):
        append_lines(logs / f"burst{i}.log", make_lines(f"b{i}", 0, 3))
        counts[f"b{i}"] = 3
    wait_for(lambda: count_lines(h.path("out", "app", "app.log")) >= 900, timeout=60,
             what="every line of the 300 files")
    check_exactly_once(output_lines(h.path("out"), "app"), counts)
    assert "the inotify queue overflowed" in agent.log()


def test_file_held_without_a_descriptor_rewritten_with_another_head_is_shipped_from_zero(h: Harness) -> None:
    """Past max_open_files the agent keeps quiet, fully shipped files without a descriptor. One
    of them truncated and written again with other lines (same inode, another head) is a new
    content: shipped from 0 within seconds, not left to the once-a-minute full scan."""
    ep = h.endpoints()
    h.aggregator(ep)
    for i in range(24):
        append_lines(h.path("logs", f"q{i:02d}.log"), make_lines(f"q{i:02d}", 0, 3))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}], "agent.max_open_files=8")
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="the 24 files shipped")
    status = h.agent_status()
    assert status is not None
    target = h.path("logs", "q00.log")
    with open(target, "wb") as fh:  # same inode, another head, shorter than the offset
        fh.write(b"new#00000000 other content\n")
    wait_for(lambda: any(line.startswith("new#") for line in h.lines()), timeout=20,
             what="the rewritten file's line")
    assert "Traceback" not in agent.log()
