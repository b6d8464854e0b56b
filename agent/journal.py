"""Reading the systemd journal: ``journalctl`` as a child process, one JSON object per entry.

Why journalctl and not the systemd Python bindings or a reader of our own: journalctl is the
journal's own, well-kept reader (it follows rotation, vacuuming, compression and the file format
as systemd changes it), it is on every systemd machine, and it needs nothing compiled into the
agent (python3-systemd is a Debian package outside the virtualenv; the PyPI build needs
libsystemd headers). Vector and Filebeat read the journal the same way. The costs are known and
handled here:

* ``--output=json`` writes a field that is not printable UTF-8 as an array of byte values, and a
  field that occurs more than once as an array of values: ``text_of`` turns both into text
  (undecodable bytes become U+FFFD, as for files). ``--all`` keeps long and unprintable fields
  that journalctl would otherwise replace by a placeholder.
* ``--follow`` never writes its position anywhere (``--cursor-file`` is not updated while
  following), so every entry's ``__CURSOR`` is read from its JSON and the checkpoint is ours.
* ``--after-cursor`` together with matches skips the first matching entry even when the cursor's
  own entry is gone (fixed only in systemd 255), and ``--follow`` with ``--cursor`` sometimes
  starts after the cursor's entry, sometimes at it (systemd 252), and stops after 10 entries
  unless told ``--no-tail``. So the reader starts with ``--cursor --no-tail`` and skips the first
  entry itself, only if it is the saved one; and whether the saved entry still exists is asked
  once, before following, without ``--follow`` (``probe``): when it does not, it was vacuumed
  or rotated away, and the caller is told how many entries may be missing.
* ``--follow`` without ``--merge`` shows only the newest boot (systemd 252 implies ``--boot``):
  after a reboot, the entries the old boot wrote after the agent stopped would be skipped, and
  a new boot appended to a directory while following would not be seen. Every journal is read
  with ``--merge``; the system journal adds a match on this machine's ``_MACHINE_ID``, so that
  it stays this machine's journal (``--merge`` also opens other machines' journals, such as
  containers' or systemd-journal-remote's under /var/log/journal). The one-shot calls (no
  ``--follow``) read this machine's journal without ``--merge``. A directory of several
  machines' journals is read with one journalctl per machine, each with a match on its
  ``_MACHINE_ID`` (``machine``; see journal_sources.py), the probe too: journalctl seeks a
  cursor by sequence number only in its own writer's files, and another machine's entry of the
  same microsecond is not the next one of this journal.
* journalctl exits when its stdout closes, so a killed agent leaves no reader behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import orjson

from agent.config import JournalConfig

log = logging.getLogger("fleetlog.agent.journal")

# The journal fields an entry's batch carries, by the names they have on the wire.
FIELDS = (("_SYSTEMD_UNIT", "unit"), ("SYSLOG_IDENTIFIER", "identifier"), ("PRIORITY", "priority"),
          ("_HOSTNAME", "hostname"), ("_PID", "pid"), ("__REALTIME_TIMESTAMP", "realtime_us"))
_INT_FIELDS = frozenset(("priority", "pid", "realtime_us"))
_TEXT_FIELDS = tuple((name, key) for name, key in FIELDS if key not in _INT_FIELDS)
_NUMBER_FIELDS = tuple((name, key) for name, key in FIELDS if key in _INT_FIELDS)
# What journalctl prints besides the cursor and timestamps (it always prints those).
OUTPUT_FIELDS = "MESSAGE," + ",".join(name for name, _ in FIELDS if not name.startswith("__"))
READ_BYTES = 1 << 20


@dataclass(slots=True)
class Entry:
    line: str                 # the MESSAGE as text
    fields: dict[str, Any]
    cursor: str
    epoch: str                # "<seqnum id>:<boot id>": the journal writer's incarnation
    size: int                 # bytes the entry takes in its stream: the line's UTF-8 and a newline
    cut: bool = False         # the message was longer than max_line_bytes and was cut


def text_of(value: Any) -> str:
    """A journal field as journalctl's JSON gives it, as text: a string; bytes (an array of
    numbers); or, for a field given more than once, an array of those (the first is taken)."""
    if type(value) is str:
        return value
    if type(value) is list and value:
        if all(type(b) is int and 0 <= b < 256 for b in value):
            return bytes(value).decode("utf-8", "replace")
        return text_of(value[0])
    return "" if value is None or value == [] else str(value)


def parse_cursor(cursor: str) -> dict[str, str]:
    """``s=..;i=..;b=..;m=..;t=..;x=..`` as a dict (unknown parts kept, malformed ones dropped)."""
    out = {}
    for part in cursor.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out[key] = value
    return out


def same_entry(a: str, b: str) -> bool:
    """Whether two cursors name one entry. The boot id, monotonic and realtime timestamps and the
    hash of the entry's fields identify it; the seqnum part may differ between copies of a file."""
    if a == b:
        return True
    pa, pb = parse_cursor(a), parse_cursor(b)
    keys = ("b", "m", "t", "x")
    return all(k in pa for k in keys) and all(pa.get(k) == pb.get(k) for k in keys)


def seqnum_distance(a: str, b: str) -> int | None:
    """``b``'s sequence number minus ``a``'s, for two cursors of one journal writer; None when
    they come from different writers (a new seqnum id: the distance cannot be known)."""
    pa, pb = parse_cursor(a), parse_cursor(b)
    if pa.get("s") != pb.get("s") or "s" not in pa:
        return None
    try:
        return int(pb["i"], 16) - int(pa["i"], 16)
    except (KeyError, ValueError):
        return None


def missing_between(saved: str, found: str) -> int | None:
    """How many entries lie between two cursors of one journal writer, or None (see above)."""
    d = seqnum_distance(saved, found)
    return None if d is None else max(0, d - 1)


def realtime_of(cursor: str) -> int | None:
    """The entry's realtime timestamp (microseconds since the epoch) from its cursor."""
    try:
        return int(parse_cursor(cursor)["t"], 16)
    except (KeyError, ValueError):
        return None


def decode(raw: bytes, max_line_bytes: int = 1 << 20) -> Entry | None:
    """One line of ``journalctl --output=json``; None if it is not an entry with a cursor. A
    message longer than ``max_line_bytes`` (UTF-8) is cut there (``Entry.cut``)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return None
    cursor = doc.get("__CURSOR")
    if type(cursor) is not str:
        return None
    line = text_of(doc.get("MESSAGE"))
    size = (len(line) if line.isascii() else len(line.encode())) + 1
    cut = size - 1 > max_line_bytes
    if cut:  # as a file's over-long line: the rest would make a batch no aggregator takes
        line = line.encode()[:max_line_bytes].decode("utf-8", "ignore")
        size = len(line.encode()) + 1
    fields: dict[str, Any] = {}
    for name, key in _TEXT_FIELDS:
        value = doc.get(name)
        if value is not None:
            fields[key] = value if type(value) is str else text_of(value)
    for name, key in _NUMBER_FIELDS:
        value = doc.get(name)
        if value is not None:
            try:
                fields[key] = int(value if type(value) is str else text_of(value))
            except ValueError:
                pass
    # The cursor is "s=<seqnum id>;i=<seqnum>;b=<boot id>;m=...".
    parts = cursor.split(";", 3)
    if len(parts) > 2 and parts[0][:2] == "s=" and parts[2][:2] == "b=":
        epoch = parts[0][2:] + ":" + parts[2][2:]
    else:
        epoch = _epoch_of(cursor)
    return Entry(line, fields, cursor, epoch, size, cut)


def _epoch_of(cursor: str) -> str:
    parts = parse_cursor(cursor)
    return f"{parts.get('s', '')}:{parts.get('b', '')}"


def local_machine_match(cfg: JournalConfig) -> list[str]:
    """For the system journal: a match on this machine's id (see ``--merge`` above)."""
    if cfg.directory or any(m.startswith("_MACHINE_ID=") for m in cfg.field_matches):
        return []
    try:
        with open("/etc/machine-id") as fh:
            machine = fh.read().strip()
    except OSError:
        return []
    return [f"_MACHINE_ID={machine}"] if machine else []


def machine_match(cfg: JournalConfig, machine: str) -> list[str]:
    """The match that keeps a reader to one machine's journal: ``machine`` (one machine of a
    directory of several, see journal_source.py), else this machine for the system journal."""
    return [f"_MACHINE_ID={machine}"] if machine else local_machine_match(cfg)


def command(cfg: JournalConfig, cursor: str | None, follow: bool = True, machine: str = "") -> list[str]:
    """journalctl's argv: every entry from ``cursor`` (itself included), or from the start."""
    argv = [cfg.journalctl, "--output=json", "--all", "--no-pager", "--quiet", "--merge",
            f"--output-fields={OUTPUT_FIELDS}"]
    if cfg.directory:
        argv.append(f"--directory={cfg.directory}")
    if cfg.priority:
        argv.append(f"--priority={cfg.priority}")
    if follow:
        argv.append("--follow")
    if cursor:
        argv.append(f"--cursor={cursor}")
    argv.append("--no-tail")
    return argv + list(cfg.field_matches) + machine_match(cfg, machine)


async def machines(cfg: JournalConfig) -> tuple[list[str] | None, str]:
    """The ``_MACHINE_ID`` values of the entries in ``cfg.directory`` (journalctl reads them from
    the files' field tables, not entry by entry), or None and why journalctl failed."""
    argv = [cfg.journalctl, "--no-pager", "--quiet", "--field=_MACHINE_ID", f"--directory={cfg.directory}"]
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        return None, str(exc)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        return None, err.decode(errors="replace").strip()[:300] or f"exit status {proc.returncode}"
    found = (line.strip() for line in out.decode(errors="replace").splitlines())
    return sorted(m for m in found if m), ""


async def probe(cfg: JournalConfig, cursor: str, machine: str = "") -> tuple[bool, str | None]:
    """Whether the entry at ``cursor`` is still in the journal, and the cursor of the first
    entry at or after its place (any entry of ``machine``'s, if given, matches aside), or None
    if there is none. Only the first line is read; journalctl is then ended."""
    argv = [cfg.journalctl, "--output=json", "--no-pager", "--quiet", "--output-fields=MESSAGE",
            f"--cursor={cursor}"]
    if cfg.directory:
        argv.append(f"--directory={cfg.directory}")
    # Another machine's entry at the same time is not the next one of this journal.
    argv += [f"_MACHINE_ID={machine}"] if machine else [
        m for m in cfg.field_matches if m.startswith("_MACHINE_ID=")]
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL, limit=READ_BYTES)
    except OSError:
        return True, None  # cannot tell: take the cursor as it is (the follower will say why)
    assert proc.stdout is not None
    try:
        first = await proc.stdout.readline()
    except ValueError:  # a first entry longer than the limit: it exists, whatever it is
        first = b""
    finally:
        kill(proc)
        await proc.wait()
    entry = decode(first) if first else None
    if entry is None:
        return False, None
    return same_entry(entry.cursor, cursor), entry.cursor


async def last_cursor(cfg: JournalConfig, machine: str = "") -> str | None:
    """The cursor of the newest matching entry (of ``machine``'s, if given), or None (no entry,
    or journalctl failed)."""
    argv = [cfg.journalctl, "--output=json", "--no-pager", "--quiet", "--lines=1",
            "--output-fields=MESSAGE"]
    if cfg.directory:
        argv.append(f"--directory={cfg.directory}")
    if cfg.priority:
        argv.append(f"--priority={cfg.priority}")
    try:
        proc = await asyncio.create_subprocess_exec(*argv, *cfg.field_matches,
                                                    *([f"_MACHINE_ID={machine}"] if machine else []),
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        log.warning("journal %s: cannot start %s: %s", cfg.topic, cfg.journalctl, exc)
        return None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        log.warning("journal %s: %s failed: %s", cfg.topic, cfg.journalctl,
                    err.decode(errors="replace").strip()[:300])
        return None
    lines = out.splitlines()
    entry = decode(lines[-1]) if lines else None
    return entry.cursor if entry is not None else None


class Reader:
    """One running ``journalctl --follow`` and the entries it printed that were not taken yet."""

    def __init__(self, cfg: JournalConfig, machine: str = "") -> None:
        self.cfg = cfg
        self.machine = machine
        self.name = cfg.topic + (f" machine {machine}" if machine else "")
        self.proc: asyncio.subprocess.Process | None = None
        self._rest = b""
        self._stderr_task: asyncio.Task[None] | None = None
        self.malformed = 0
        # A read of a full pipe's worth or more: journalctl has more to say (the agent is behind).
        self.last_read_bytes = 0
        self.cannot_start = False

    async def start(self, cursor: str | None) -> None:
        """Start journalctl; if it cannot be started (gone, not executable), say so: ``read``
        then answers None, as when journalctl exits, and the caller tries again later."""
        self._rest = b""
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *command(self.cfg, cursor, machine=self.machine), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=READ_BYTES)
        except OSError as exc:
            # ERROR: nothing of this journal is shipped until it can run. Said once.
            log.log(logging.DEBUG if self.cannot_start else logging.ERROR,
                    "journal %s: cannot start %s: %s", self.name, self.cfg.journalctl, exc)
            self.cannot_start = True
            self.proc = None
            return
        if self.cannot_start:
            log.info("journal %s: %s runs again", self.name, self.cfg.journalctl)
        self.cannot_start = False
        self._stderr_task = asyncio.create_task(self._log_stderr(self.proc), name="journalctl-stderr")

    async def _log_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        said: set[bytes] = set()
        async for line in proc.stderr:
            if line not in said and len(said) < 100:
                said.add(line)
                log.warning("journal %s: journalctl says: %s", self.name,
                            line.decode(errors="replace").strip())

    async def read(self) -> list[Entry] | None:
        """The entries journalctl printed since the last call (waiting for at least one chunk);
        None when journalctl has exited."""
        if self.proc is None or self.proc.stdout is None:
            return None
        data = await self.proc.stdout.read(READ_BYTES)
        self.last_read_bytes = len(data)
        if not data:
            return None
        data = self._rest + data
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        out = []
        for raw in data[:end].splitlines():
            entry = decode(raw, self.cfg.max_line_bytes)
            if entry is None:
                self.malformed += 1
                if self.malformed == 1:
                    log.warning("journal %s: journalctl printed a line that is not an entry: %r",
                                self.name, raw[:200])
                continue
            out.append(entry)
        return out

    async def stop(self) -> int | None:
        """End journalctl (if still running) and return its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        kill(proc)
        code = await proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
            self._stderr_task.cancel()
        return code

    def kill_now(self) -> None:
        """At exit without a loop to wait on: end journalctl at once."""
        if self.proc is not None:
            kill(self.proc)


def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL ``proc`` unless its exit was already collected.

    Not ``proc.kill()``: subprocess's send_signal first polls the child (waitpid), and on the
    stdlib event loop that reaps a journalctl that has just exited before asyncio's child
    watcher does, which then logs "Unknown child process pid ..., will report returncode 255"
    at WARNING and reports 255. A child that exited but is not yet collected is a zombie: its
    pid is still its own, and the signal does nothing."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
