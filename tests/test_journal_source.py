"""[[journal]] sources: real journal files, written by Debian's systemd-journal-remote from export
format the tests generate, read by the agent through journalctl as the system journal is."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from harness import PY, Endpoints, Harness, Proc, check_exactly_once, free_port, output_lines, wait_for
from test_aggregator_faults import mount_tmpfs, mounts  # noqa: F401 (a fixture)
from test_ops import scrape

from agent.journal import missing_between, same_entry, text_of
from agent.journal_source import _entries_before

JOURNAL_REMOTE = next((p for p in (shutil.which("systemd-journal-remote"),
                                   "/lib/systemd/systemd-journal-remote",
                                   "/usr/lib/systemd/systemd-journal-remote")
                       if p and os.access(p, os.X_OK)), None)
needs_journal = pytest.mark.skipif(
    JOURNAL_REMOTE is None or shutil.which("journalctl") is None,
    reason="needs journalctl and systemd-journal-remote (Debian: systemd-journal-remote; make system-deps)")


class Journal:
    """Journal files in a directory, written the way journald's entries reach a collector:
    export format piped through systemd-journal-remote (which appends to an existing file)."""

    def __init__(self, directory: Path, file: str = "system", machine: str | None = None) -> None:
        self.dir = directory
        self.file = file
        directory.mkdir(exist_ok=True)
        # Every entry journald writes carries its _MACHINE_ID ("": hand-made entries without one).
        self.machine = uuid.uuid4().hex if machine is None else machine
        self.boot = uuid.uuid4().hex
        self.realtime_us = int(time.time() * 1e6) - 3_600_000_000  # an hour ago, rising per entry
        self.count = 0

    def new_boot(self) -> None:
        self.boot = uuid.uuid4().hex

    def write(self, messages: list[bytes | str], file: str | None = None, unit: str = "app.service",
              identifier: str = "app", priority: int = 5, transport: str = "journal") -> None:
        out = bytearray()
        machine = f"_MACHINE_ID={self.machine}\n" if self.machine else ""
        for msg in messages:
            self.count += 1
            self.realtime_us += 10
            out += (f"__REALTIME_TIMESTAMP={self.realtime_us}\n__MONOTONIC_TIMESTAMP={self.count * 10}\n"
                    f"_BOOT_ID={self.boot}\n{machine}_HOSTNAME=host-{self.boot[:4]}\n_SYSTEMD_UNIT={unit}\n"
                    f"SYSLOG_IDENTIFIER={identifier}\nPRIORITY={priority}\n_PID=4242\n"
                    f"_TRANSPORT={transport}\n").encode()
            body = msg.encode() if isinstance(msg, str) else msg
            if b"\n" in body or not body.isascii() or b"\0" in body:
                out += b"MESSAGE\n" + struct.pack("<Q", len(body)) + body + b"\n\n"
            else:
                out += b"MESSAGE=" + body + b"\n\n"
        assert JOURNAL_REMOTE is not None
        output = self.dir / f"{file or self.file}.journal"
        subprocess.run([JOURNAL_REMOTE, f"--output={output}", "-"], input=bytes(out), check=True,
                       capture_output=True, timeout=120)

    def write_tagged(self, tag: str, start: int, count: int, **kw: Any) -> None:
        self.write([f"{tag}#{n:08d} {'y' * 40}" for n in range(start, start + count)], **kw)


def journal_agent(h: Harness, ep: Endpoints, directory: Path, *extra: str, mode: str = "push",
                  **source: Any) -> Proc:
    fields = {"topic": "jr", "directory": str(directory), **source}
    table = ", ".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in fields.items())
    return h.agent(ep, [], f"journal=[{{{table}}}]", *extra, mode=mode)


def journal_status(h: Harness) -> dict[str, Any]:
    s = wait_for(h.agent_status, what="the agent's status")
    return s["journal"][0]  # type: ignore[no-any-return]


def agent_status_text(h: Harness, name: str = "node1") -> str:
    """What ``fleetlog-agent status`` (text) prints for agent ``name``."""
    state_dir = next(p.state_dir for p in reversed(h.procs) if p.name == f"agent-{name}" and p.state_dir)
    r = subprocess.run([PY, "-m", "agent", "status", "--timeout", "5",
                        "--set", f"agent.state_dir={state_dir}"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout


def acked_everything(h: Harness, entries: int) -> bool:
    s = h.agent_status()
    return s is not None and s["journal"][0]["entries_acked"] >= entries and s["inflight_bytes"] == 0


# ---- the pure parts ---------------------------------------------------------------------------


def test_text_of_journal_values() -> None:
    assert text_of("plain") == "plain"
    assert text_of([104, 105, 0, 255]) == "hi\x00\ufffd"       # bytes: not UTF-8 becomes U+FFFD
    assert text_of(["first", "second"]) == "first"              # a field given twice
    assert text_of([[104, 105], "x"]) == "hi"
    assert text_of(None) == ""


def test_cursor_arithmetic() -> None:
    a = "s=aa;i=10;b=bb;m=1;t=5;x=c1"
    b = "s=aa;i=1a;b=bb;m=2;t=6;x=c2"
    assert missing_between(a, b) == 9                           # seqnums 0x11 .. 0x19
    assert missing_between(a, "s=zz;i=1;b=bb;m=2;t=6;x=c2") is None
    assert same_entry(a, "s=other;i=99;b=bb;m=1;t=5;x=c1")      # one entry, another file's seqnum
    assert not same_entry(a, b)


def test_a_resync_inside_a_batch_ships_from_the_next_whole_entry() -> None:
    lines = ["ab", "caf\u00e9", "", "xyz"]                 # 3, 6, 1 and 4 bytes with newlines
    assert _entries_before(lines, 100, 100) == (0, 100)
    assert _entries_before(lines, 100, 109) == (2, 109)
    assert _entries_before(lines, 100, 110) == (3, 110)
    assert _entries_before(lines, 100, 104) == (2, 109)     # inside an entry: it was delivered


def test_check_config_names_journal_keys(short_tmp: Path) -> None:
    conf = short_tmp / "agent.toml"
    conf.write_text(f"""
[agent]
state_dir = "{short_tmp}/st"

[[journal]]
topic = "journal"
units = ["nginx"]
priority = "warning"
matches = ["_TRANSPORT=kernel"]

[[journal]]
topic = "bad topic"
directory = "relative/dir"
priority = 9
matches = ["lowercase=x"]
start_at = "middle"
colour = "blue"
""")
    r = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stdout
    for key in ("journal[1].topic", "journal[1].directory", "journal[1].priority", "journal[1].matches",
                "journal[1].start_at", "journal[1].colour"):
        assert key in r.stderr, (key, r.stderr)
    assert "journal[0]" not in r.stderr
    conf.write_text(f'[agent]\nstate_dir = "{short_tmp}/st"\n'
                    '[[journal]]\ntopic = "journal"\nunits = ["nginx"]\n')
    r = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "1 journal sources" in r.stdout


# ---- real journals, real daemons ---------------------------------------------------------------


@needs_journal
@pytest.mark.parametrize("mode", ["push", "pub"])
def test_journal_entries_arrive_once_with_their_fields(h: Harness, mode: str) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 500)
    j.write([b"binary \x00\xff\xfe end", "first line\nsecond line\n\tindented third", "caf\u00e9 \u2603",
             "L" * 3_000_000])   # longer than max_line_bytes (1 MiB): cut there
    j.write_tagged("J", 500, 500)
    j.write_tagged("K", 0, 10, unit="other.service")
    h.aggregator(ep, 'aggregator.format="json"')
    journal_agent(h, ep, h.path("journal"), mode=mode, units=["app"])
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 1004, what="1004 entries")
    docs = [orjson.loads(line) for line in output_lines(h.root / "out", "jr")]
    check_exactly_once([d["line"] for d in docs], {"J": 1000})    # units = ["app"]: no K
    odd = {d["line"] for d in docs if not d["line"].startswith("J#")}
    assert odd == {"binary \x00\ufffd\ufffd end", "first line\nsecond line\n\tindented third",
                   "caf\u00e9 \u2603", "L" * 1024 * 1024}
    d = docs[0]
    assert (d["unit"], d["identifier"], d["priority"], d["pid"]) == ("app.service", "app", 5, 4242)
    assert d["hostname"] == f"host-{j.boot[:4]}" and isinstance(d["realtime_us"], int)
    assert d["path"] == f"journal:{h.path('journal')}"
    wait_for(lambda: acked_everything(h, 1004), what="everything acknowledged")
    js = journal_status(h)
    assert (js["lag_entries"], js["entries_missing"], js["reader_running"]) == (0, 0, True)
    assert js["entries_cut"] == 1
    agents = wait_for(lambda: [a for a in h.status(ep)["agents"] if a.get("journal_lag_entries") == 0],
                      what="the journal lag in aggregatorctl status")
    assert agents[0]["journal_lag_s"] == 0
    assert "journal sources" in h.ctl(ep, "status").stdout
    h.assert_quiet(ep)


@needs_journal
def test_journal_follows_new_entries_and_resumes_after_restart(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 100)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 100, what="100 entries")
    j.write_tagged("J", 100, 100)   # written while followed
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 200, what="200 entries")
    wait_for(lambda: acked_everything(h, 200), what="everything acknowledged")
    assert agent.stop() == 0
    j.write_tagged("J", 200, 100)   # written while the agent is down
    journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 300, what="300 entries")
    j.write_tagged("J", 300, 100)
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 400, what="400 entries")
    wait_for(lambda: acked_everything(h, 400), what="everything acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 400})


@needs_journal
def test_journal_start_at_end_ships_only_new_entries(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("OLD", 0, 50)
    h.aggregator(ep)
    journal_agent(h, ep, h.path("journal"), start_at="end")
    # The same through one reader of one machine (a _MACHINE_ID= match), not one per machine.
    h.agent(ep, [], f'journal=[{{topic="jm", directory="{h.path("journal")}", start_at="end", '
                    f'matches=["_MACHINE_ID={j.machine}"]}}]', name="node2")
    wait_for(lambda: h.agent_status() and journal_status(h)["cursor"], what="the agent at the journal's end")
    wait_for(lambda: (s := h.agent_status("node2")) and s["journal"][0]["cursor"], what="node2 at the end")
    j.write_tagged("J", 0, 20)
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 20, what="20 new entries")
    wait_for(lambda: len(output_lines(h.root / "out", "jm")) >= 20, what="20 new entries for node2")
    wait_for(lambda: acked_everything(h, 20), what="everything acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 20})
    check_exactly_once(output_lines(h.root / "out", "jm"), {"J": 20})


@needs_journal
def test_journal_agent_killed_mid_stream_loses_and_doubles_nothing(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 100_000)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"), "agent.batch_max_lines=200")
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 10_000, timeout=60, what="10,000 entries")
    agent.kill9()
    j.write_tagged("J", 100_000, 1000)
    journal_agent(h, ep, h.path("journal"), "agent.batch_max_lines=200")
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 101_000, timeout=120, what="101,000 entries")
    wait_for(lambda: acked_everything(h, 101_000), timeout=30, what="everything acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 101_000})


@needs_journal
def test_journal_aggregator_killed_mid_stream_loses_and_doubles_nothing(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 30_000)
    agg = h.aggregator(ep)
    journal_agent(h, ep, h.path("journal"), "agent.batch_max_lines=100")
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 3000, timeout=60, what="3,000 entries")
    agg.kill9()                         # committed or not: see test_aggregator_first_commit.py
    j.write_tagged("J", 30_000, 1000)   # while the aggregator is down
    h.aggregator(ep)
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 31_000, timeout=120, what="31,000 entries")
    wait_for(lambda: acked_everything(h, 31_000), timeout=30, what="everything acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 31_000})


@needs_journal
def test_journal_vacuumed_while_agent_down_resumes_after_it_and_warns(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("A", 0, 1000, file="old")
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 1000), what="the old file shipped")
    assert agent.stop() == 0
    j.write_tagged("A", 1000, 500, file="old")     # never read: vacuumed with its file
    j.write_tagged("B", 0, 500, file="new")
    (h.path("journal") / "old.journal").unlink()  # vacuum: the file holding the saved cursor is gone
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 1500, what="1500 entries")
    wait_for(lambda: "no longer in the journal" in agent.log(), what="the warning")
    warning = next(line for line in agent.log().splitlines() if "no longer in the journal" in line)
    assert " WARNING " in warning and "may be missing" in warning
    wait_for(lambda: acked_everything(h, 1500), what="everything acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"A": 1000, "B": 500})


@needs_journal
def test_journal_new_boot_starts_a_new_stream_and_the_old_boot_is_finished(h: Harness) -> None:
    """A reboot: the old boot's last entries (written after the agent stopped) ship before the
    new boot's, which start a new stream; a boot appended while the agent follows too."""
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 300)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 300), what="the first boot's entries")
    first = journal_status(h)["stream"]
    agent.kill9()                                   # the machine goes down
    j.write_tagged("J", 300, 100)                   # ... logging after the agent stopped
    j.new_boot()
    j.write_tagged("J", 400, 200)                   # and comes up again
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 600), what="both boots' entries")
    second = journal_status(h)["stream"]
    assert second != first
    assert "a new boot or journal writer" in agent.log()
    j.new_boot()                                    # a boot appended while followed (collected journals)
    j.write_tagged("J", 600, 100)
    wait_for(lambda: acked_everything(h, 700), what="the third boot's entries")
    third = journal_status(h)["stream"]
    assert third not in (first, second)
    assert agent.stop() == 0
    j.write_tagged("J", 700, 100)
    journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 800), what="the third boot's later entries")
    assert journal_status(h)["stream"] == third
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 800})


@needs_journal
def test_journal_metrics_show_the_lag_until_acknowledged(h: Harness) -> None:
    ep = h.endpoints()
    port = free_port()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 200)
    journal_agent(h, ep, h.path("journal"), f"agent.metrics_listen=127.0.0.1:{port}")
    # No aggregator yet: the entries are read, shipped to nobody, not acknowledged.
    lag = 'fleetlog_agent_journal_lag_entries{topic="jr"}'
    wait_for(lambda: (x := _scrape_or_none(port)) is not None and x.get(lag) == 200,
             what="a lag of 200 entries")
    h.aggregator(ep)
    m = wait_for(lambda: (x := scrape(port))[lag] == 0 and x, what="no lag once acknowledged")
    assert m['fleetlog_agent_journal_entries_acked_total{topic="jr"}'] == 200
    assert m['fleetlog_agent_journal_entries_missing_total{topic="jr"}'] == 0
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 200})


def _scrape_or_none(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None


@needs_journal
def test_journal_directory_empty_at_start_is_read_once_files_appear(h: Harness) -> None:
    ep = h.endpoints()
    h.path("journal").mkdir()
    h.aggregator(ep)
    journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: (s := h.agent_status()) is not None and s["journal"][0]["reader_running"],
             what="journalctl following the empty directory")
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 100)
    wait_for(lambda: acked_everything(h, 100), what="the entries, once there")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 100})


def journalctl_of(agent: Proc) -> int | None:
    """The pid of the agent's journalctl child, if it runs."""
    for tid in os.listdir(f"/proc/{agent.pid}/task"):
        try:
            kids = Path(f"/proc/{agent.pid}/task/{tid}/children").read_text().split()
        except FileNotFoundError:
            continue
        for kid in kids:
            try:
                if Path(f"/proc/{kid}/comm").read_text().strip() == "journalctl":
                    return int(kid)
            except FileNotFoundError:
                continue
    return None


@needs_journal
def test_journal_reader_killed_is_started_again_from_the_last_entry_read(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 500)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 500), what="the first entries")
    first = wait_for(lambda: journalctl_of(agent), what="journalctl running")
    os.kill(first, signal.SIGKILL)
    j.write_tagged("J", 500, 500)
    wait_for(lambda: acked_everything(h, 1000), what="the entries after journalctl was killed")
    assert journalctl_of(agent) not in (None, first)
    assert agent.log().count("journalctl exited") == 1
    assert journal_status(h)["reader_restarts"] == 1
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 1000})


@needs_journal
def test_journal_matches_select_entries(h: Harness) -> None:
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("A", 0, 50, unit="a.service")
    j.write_tagged("N", 0, 50, unit="a.service", priority=7)          # debug: above "info"
    j.write_tagged("B", 0, 50, unit="b.service", identifier="bee")
    j.write_tagged("C", 0, 50, unit="c.service")
    j.write_tagged("T", 0, 50, unit="c.service", transport="kernel")
    h.aggregator(ep)
    journal_agent(h, ep, h.path("journal"), units=["a", "b.service"], priority="info")
    d = h.path("journal")
    h.agent(ep, [], f'journal=[{{topic="jt", directory="{d}", matches=["_TRANSPORT=kernel"]}}, '
                    f'{{topic="ji", directory="{d}", identifiers=["bee"]}}]', name="node2")
    wait_for(lambda: len(output_lines(h.root / "out", "jr")) >= 100, what="a and b entries")
    wait_for(lambda: len(output_lines(h.root / "out", "jt")) >= 50, what="kernel entries")
    wait_for(lambda: len(output_lines(h.root / "out", "ji")) >= 50, what="bee entries")
    wait_for(lambda: acked_everything(h, 100), what="everything acknowledged")
    # The text status names each source's whole selection (units, identifiers, matches and the
    # priority filter), as --json does.
    text = agent_status_text(h)
    row = next(line for line in text.splitlines() if "[jr]" in line)
    assert "_SYSTEMD_UNIT=a.service _SYSTEMD_UNIT=b.service priority info or more urgent" in row, text
    assert "[jt] _TRANSPORT=kernel  " in agent_status_text(h, "node2")
    assert "[ji] SYSLOG_IDENTIFIER=bee  " in agent_status_text(h, "node2")
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"A": 50, "B": 50})
    check_exactly_once(output_lines(h.root / "out", "jt"), {"T": 50})
    check_exactly_once(output_lines(h.root / "out", "ji"), {"B": 50})


@needs_journal
def test_journal_reader_missing_for_a_while_is_started_again_and_says_so_once(h: Harness) -> None:
    """journalctl gone (a package upgrade midway): ERROR once, retried with backoff, nothing
    lost when it is back."""
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 100)
    wrapper = h.path("journalctl")
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('journalctl')} \"$@\"\n")
    wrapper.chmod(0o755)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"), journalctl=str(wrapper))
    wait_for(lambda: acked_everything(h, 100), what="the first entries")
    wrapper.rename(h.path("journalctl.away"))
    os.kill(wait_for(lambda: journalctl_of(agent), what="journalctl running"), signal.SIGKILL)
    wait_for(lambda: "cannot start" in agent.log(), what="the error")
    j.write_tagged("J", 100, 100)
    h.path("journalctl.away").rename(wrapper)
    wait_for(lambda: acked_everything(h, 200), timeout=30, what="the entries once journalctl is back")
    errors = [line for line in agent.log().splitlines() if "cannot start" in line]
    assert len(errors) == 1 and " ERROR " in errors[0], errors
    assert "runs again" in agent.log()
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 200})


def saved_cursors(h: Harness, name: str = "node1") -> dict[str, str]:
    """The journal cursors in the agent's checkpoints file, by machine."""
    try:
        doc = orjson.loads((h.root / f"st-{name}" / "checkpoints.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}
    return {j.get("machine", ""): j["cursor"] for j in doc.get("journal", []) if j.get("cursor")}


def warnings_of(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]


@needs_journal
def test_journals_of_three_machines_in_one_directory_ship_exactly_once_through_kills(h: Harness) -> None:
    """A collector's directory: three machines' journals, their entries interleaved in time (two
    machines in one file, as systemd-journal-remote --split-mode=none writes them, the third in a
    file of its own; the third appears only while the agent follows). Each machine's entries
    ship exactly once and in its journal's order through kill -9 of the agent and of the
    aggregator, none waits on another, and no position is said to be gone."""
    ep = h.endpoints()
    d = h.path("journal")
    machines = {"A": Journal(d, file="remote-all"), "B": Journal(d, file="remote-all"),
                "C": Journal(d, file="remote-c")}
    sent = dict.fromkeys(machines, 0)

    def write_round(tags: str, count: int) -> None:
        for _ in range(count // 100):       # interleaved: 100 of each machine in turn
            for tag in tags:
                machines[tag].write_tagged(tag, sent[tag], 100)
                sent[tag] += 100

    def shipped() -> int:
        return len(output_lines(h.root / "out", "jr"))

    write_round("AB", 2000)
    agg = h.aggregator(ep)
    extra = ("agent.batch_max_lines=37",)   # batches end inside the machines' runs
    agent = journal_agent(h, ep, d, *extra)
    wait_for(lambda: shipped() >= 1500, what="1500 entries")
    wait_for(lambda: saved_cursors(h), what="a cursor saved")
    agent.kill9()
    logs = agent.log()
    write_round("AB", 500)                  # while the agent is down
    agent = journal_agent(h, ep, d, *extra)
    wait_for(lambda: shipped() >= 4000, what="4000 entries")
    write_round("ABC", 1000)                # the third machine's journal appears while followed
    wait_for(lambda: shipped() >= 5000, what="5000 entries")
    agg.kill9()
    write_round("ABC", 500)                 # while the aggregator is down
    h.aggregator(ep)
    total = sum(sent.values())
    wait_for(lambda: shipped() >= total, timeout=60, what=f"{total} entries")
    wait_for(lambda: acked_everything(h, total), timeout=30, what="everything acknowledged")
    js = journal_status(h)
    assert (js["lag_entries"], js["entries_missing"]) == (0, 0)
    check_exactly_once(output_lines(h.root / "out", "jr"), sent)  # per machine: once, in order
    warnings = warnings_of(logs + agent.log())
    assert not warnings, warnings
    h.assert_quiet(ep)


INTERLEAVED = "has two writers interleaved"


@needs_journal
def test_cloned_machines_with_one_machine_id_ship_at_full_rate_exactly_once_through_kills(h: Harness) -> None:
    """Two cloned VMs with one /etc/machine-id (systemd issue 31368), collected by
    systemd-journal-remote into two files: one machine id, two seqnum ids and boot ids, their
    entries interleaved one by one in time, so the one journalctl of that machine id hands them
    over alternating. Each lineage ships as its own stream without waiting for the other's
    acknowledgements (the old reader shipped one-entry batches, each after the previous one's
    ack: ~5 entries/s); every entry arrives once and in order per lineage through kill -9 of the
    agent and of the aggregator, and each agent says once at WARNING that the id is shared."""
    ep = h.endpoints()
    d = h.path("journal")
    a = Journal(d, file="remote-clone-a")
    b = Journal(d, file="remote-clone-b", machine=a.machine)
    b.realtime_us = a.realtime_us + 5               # B's entries fall between A's
    sent = {"A": 0, "B": 0}

    def write_both(count: int) -> None:
        a.write_tagged("A", sent["A"], count)
        b.write_tagged("B", sent["B"], count)
        sent["A"] += count
        sent["B"] += count

    def write_in_time_order(count: int, chunk: int) -> None:
        # While journalctl follows, entries must arrive in time order: it places a file's new
        # entries by time, and skips those older than what it has shown (see README).
        for _ in range(count // chunk):
            for tag, j in (("A", a), ("B", b)):
                j.realtime_us = max(a.realtime_us, b.realtime_us)
                j.write_tagged(tag, sent[tag], chunk)
                sent[tag] += chunk

    def shipped() -> int:
        return len(output_lines(h.root / "out", "jr"))

    write_both(1000)
    agg = h.aggregator(ep)
    extra = ("agent.batch_max_lines=50",)
    agent = journal_agent(h, ep, d, *extra)
    began = time.monotonic()
    # Bounded waits the old reader misses by far: 4,000 entries at ~5/s take ~13 minutes.
    wait_for(lambda: shipped() >= 600, timeout=30, what="600 entries")
    wait_for(lambda: saved_cursors(h), timeout=10, what="a cursor saved")
    agent.kill9()
    logs = [agent.log()]
    write_both(500)                                 # while the agent is down
    agent = journal_agent(h, ep, d, *extra)
    wait_for(lambda: shipped() >= 1800, timeout=30, what="1800 entries")
    agg.kill9()
    write_in_time_order(500, 50)                    # while the aggregator is down
    h.aggregator(ep)
    wait_for(lambda: acked_everything(h, 4000), timeout=60, what="all 4000 entries acknowledged")
    took_s = time.monotonic() - began
    logs.append(agent.log())
    check_exactly_once(output_lines(h.root / "out", "jr"), sent)  # per lineage: once, in order
    js = journal_status(h)
    assert (js["lag_entries"], js["entries_missing"]) == (0, 0)
    assert len(saved_cursors(h)) == 1               # one machine id: one reader, one cursor
    for log in logs:                                # each agent says it once, naming the id
        said = [w for w in warnings_of(log) if INTERLEAVED in w]
        assert len(said) == 1 and a.machine in said[0] and str(d) in said[0], said
        assert not [w for w in warnings_of(log) if INTERLEAVED not in w], warnings_of(log)
    assert took_s < 150, took_s
    h.assert_quiet(ep)


@needs_journal
def test_journal_machine_vacuumed_while_agent_down_warns_for_that_machine_with_the_count(
        h: Harness, mounts: list[Path]) -> None:  # noqa: F811 (the fixture)
    """Two machines' journals in one directory; while the agent is down, machine A's oldest file
    (holding its saved cursor) is vacuumed. The agent says so once, at WARNING, for A, with the
    number of A's entries lost (A's files rotate in one seqnum lineage, as journald's and
    systemd-journal-remote's do: on a 16 MiB tmpfs they rotate every ~1500 entries); machine B
    resumes after its own cursor, silently; a later restart without vacuum says nothing."""
    ep = h.endpoints()
    d = h.path("journal")
    mount_tmpfs(d, "16m")
    mounts.append(d)
    a, b = Journal(d, file="remote-a"), Journal(d, file="remote-b")
    for n in range(0, 1000, 100):                   # interleaved
        a.write_tagged("A", n, 100)
        b.write_tagged("B", n // 2, 50)
    h.aggregator(ep)
    agent = journal_agent(h, ep, d)
    wait_for(lambda: acked_everything(h, 1500), what="both machines' first entries")
    assert agent.stop() == 0
    assert len(saved_cursors(h)) == 2
    a.write_tagged("A", 1000, 3000)                 # rotates A's file twice
    b.write_tagged("B", 500, 500)
    archived = sorted(p.name for p in d.glob("remote-a@*.journal"))
    assert len(archived) >= 2, archived             # head seqnums (hex) in the names, oldest first
    heads = [int(name.split("-")[-2], 16) for name in archived]
    (d / archived[0]).unlink()                      # A's entries with seqnums 1 .. heads[1]-1
    lost = heads[1] - 1 - 1000                      # A's entries after its saved cursor, never read
    agent = journal_agent(h, ep, d)
    expected = 1000 + 1000 + 3000 - lost
    wait_for(lambda: acked_everything(h, expected), what=f"{expected} entries")
    gone = [line for line in agent.log().splitlines() if "no longer in the journal" in line]
    assert len(gone) == 1 and " WARNING " in gone[0] and f"up to {lost} entries" in gone[0], gone
    assert a.machine in gone[0]
    assert journal_status(h)["entries_missing"] == lost
    assert not [w for w in warnings_of(agent.log()) if w not in gone]
    lines = output_lines(h.root / "out", "jr")
    check_exactly_once([line for line in lines if line.startswith("B#")], {"B": 1000})
    got_a = [int(line.split(" ")[0][2:]) for line in lines if line.startswith("A#")]
    assert got_a == list(range(1000)) + list(range(heads[1] - 1, 4000))
    assert agent.stop() == 0                        # and again, nothing vacuumed: nothing said
    a.write_tagged("A", 4000, 10)
    agent = journal_agent(h, ep, d)
    wait_for(lambda: acked_everything(h, expected + 10), what="the entries after")
    assert not warnings_of(agent.log()), warnings_of(agent.log())
    h.assert_quiet(ep)


@needs_journal
def test_journal_machine_id_match_ships_one_machine_of_a_collected_directory(h: Harness) -> None:
    """matches = ["_MACHINE_ID=..."] on a directory of several machines (one file, interleaved):
    that machine's entries only, once and in order, resumed after a restart."""
    ep = h.endpoints()
    d = h.path("journal")
    a, b = Journal(d, file="remote-all"), Journal(d, file="remote-all")
    for n in range(0, 500, 50):
        a.write_tagged("A", n, 50)
        b.write_tagged("B", n, 50)
    h.aggregator(ep)
    agent = journal_agent(h, ep, d, matches=[f"_MACHINE_ID={b.machine}"])
    wait_for(lambda: acked_everything(h, 500), what="machine B's entries")
    assert agent.stop() == 0
    for n in range(500, 800, 50):
        b.write_tagged("B", n, 50)
        a.write_tagged("A", n, 50)
    agent = journal_agent(h, ep, d, matches=[f"_MACHINE_ID={b.machine}"])
    wait_for(lambda: acked_everything(h, 800), what="machine B's later entries")
    assert journal_status(h)["machine"] == ""       # one reader: the match names the machine
    assert not warnings_of(agent.log()), warnings_of(agent.log())
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"B": 800})


@needs_journal
def test_journal_directory_without_machine_ids_is_read_as_one_journal(h: Harness) -> None:
    """Hand-made export format without _MACHINE_ID: no machine to list, read as one journal,
    resumed after its cursor."""
    ep = h.endpoints()
    j = Journal(h.path("journal"), machine="")
    j.write_tagged("J", 0, 100)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 100), what="the first entries")
    assert "reading it as one journal" in agent.log()
    assert agent.stop() == 0
    j.write_tagged("J", 100, 100)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 200), what="the entries written while down")
    assert not warnings_of(agent.log()), warnings_of(agent.log())
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 200})


@needs_journal
def test_journal_checkpoint_from_before_machines_resumes_its_one_machine(h: Harness) -> None:
    """A checkpoint written before directories were read per machine (no "machine" key): a
    directory of one machine resumes after its cursor, in its streams, nothing twice."""
    ep = h.endpoints()
    j = Journal(h.path("journal"))
    j.write_tagged("J", 0, 300)
    h.aggregator(ep)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 300), what="the first entries")
    stream = journal_status(h)["stream"]
    assert agent.stop() == 0
    path = h.root / "st-node1" / "checkpoints.json"
    doc = orjson.loads(path.read_bytes())
    for cp in doc["journal"]:
        del cp["machine"]
    path.write_bytes(orjson.dumps(doc))
    j.write_tagged("J", 300, 100)
    agent = journal_agent(h, ep, h.path("journal"))
    wait_for(lambda: acked_everything(h, 400), what="the entries written while down")
    assert journal_status(h)["stream"] == stream
    assert not warnings_of(agent.log()), warnings_of(agent.log())
    h.assert_quiet(ep)
    check_exactly_once(output_lines(h.root / "out", "jr"), {"J": 400})


def test_system_journal_without_files_is_a_problem_said(tmp_path: Path) -> None:
    """A [[journal]] section on the system journal of a host without journald (no journal file
    under /var/log/journal or /run/log/journal) says so instead of 'reading' in silence."""
    from agent.journal_sources import system_journal_problem
    persistent, volatile = tmp_path / "var", tmp_path / "run"
    persistent.mkdir()
    problem = system_journal_problem((str(persistent), str(volatile)))
    assert problem is not None and "is systemd-journald running" in problem
    machine = volatile / "0123456789abcdef0123456789abcdef"
    machine.mkdir(parents=True)
    (machine / "system.journal").write_bytes(b"")
    assert system_journal_problem((str(persistent), str(volatile))) is None
