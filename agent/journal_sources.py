"""The agent's ``[[journal]]`` sections, each read as one journal per machine.

A directory collected from several machines (systemd-journal-remote's output, copies) holds
several journals whose entries interleave in time. Each machine's journal is a lineage of its
own (its writer's seqnum id, boot ids): its own streams and its own cursor, which moves only on
acknowledgements of its own entries. So a section over a directory runs one ``JournalSource``
(one journalctl, with a ``_MACHINE_ID=`` match) per machine found in it: a restart resumes each
machine after its own cursor, where journalctl seeks by sequence number in that machine's files,
exactly. One merged reader started at one cursor could not do that: journalctl positions the
other machines' files by wall-clock time (skewed clocks, entries uploaded late), and a shared
acknowledged prefix makes one machine's unacknowledged batch hold back every other's.

Machines are found with ``journalctl --field=_MACHINE_ID`` (from the files' field tables, not
entry by entry) at start and every ``DISCOVER_S``; a machine found later is read from its
beginning, as a file that appears later is. The system journal and a section with its own
``_MACHINE_ID=`` match are one machine already: one reader, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from agent.config import JournalConfig

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.journal_source import JournalSource, JStream

log = logging.getLogger("fleetlog.agent.journal")

DISCOVER_S = 5.0          # how often a directory is looked at for machines not read yet


class JournalSection:
    """One ``[[journal]]`` section: a ``JournalSource`` per machine whose journal it reads."""

    def __init__(self, owner: JournalSources, cfg: JournalConfig) -> None:
        self.owner = owner
        self.cfg = cfg
        self.per_machine = bool(cfg.directory) and not any(
            m.startswith("_MACHINE_ID=") for m in cfg.field_matches)
        self.sources: dict[str, JournalSource] = {}      # by machine id ("": one machine)
        self.saved: dict[str, dict[str, Any]] = {}       # checkpoints of machines not read (yet)
        self.legacy: dict[str, Any] | None = None        # a checkpoint from before machines
        self.had_checkpoint = False
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.listing_failed = False
        self.mixed = False
        if not self.per_machine:
            self.add("", first_look=True)

    def restore(self, docs: list[dict[str, Any]]) -> None:
        self.had_checkpoint = bool(docs)
        for doc in docs:
            machine = doc.get("machine")
            if not self.per_machine:
                self.sources[""].restore(doc)
            elif isinstance(machine, str):
                self.saved[machine] = doc
            else:
                self.legacy = doc

    def add(self, machine: str, first_look: bool = False) -> JournalSource:
        # Imported here: an agent without [[journal]] sections never loads the journal reader
        # (about 0.2 MiB of an idle agent's memory).
        from agent.journal_source import JournalSource
        src = JournalSource(self.owner.agent, self.cfg, machine)
        doc = self.saved.pop(machine, None)
        if doc is None and self.legacy is not None and first_look:
            # Written by an agent that read the directory as one merged journal: its cursor is
            # where each machine resumes (its streams belonged to that one reader, not to each).
            doc = {"cursor": self.legacy.get("cursor")}
        if doc is not None:
            src.restore(doc)
        elif self.had_checkpoint or not first_look:
            src.known = True   # found after the first start: read from its beginning
        self.sources[machine] = src
        self.owner.sources.append(src)
        return src

    async def run(self) -> None:
        """Read every machine's journal until cancelled; look for new machines meanwhile."""
        if not self.per_machine:
            await self.sources[""].run()
            return
        first_look = True
        try:
            while True:
                if await self.look(first_look):
                    first_look = False
                if not self.tasks:
                    await asyncio.sleep(DISCOVER_S)
                    continue
                done, _ = await asyncio.wait(self.tasks.values(), timeout=DISCOVER_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a reader's crash is the daemon's (supervise stops it)
        finally:
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def look(self, first_look: bool) -> bool:
        """List the directory's machines and start reading those not read yet; False if
        journalctl could not list them."""
        from agent.journal import last_cursor, machines  # only with [[journal]] sections, as in add()
        found, why = await machines(self.cfg)
        if found is None:
            if not self.listing_failed:  # ERROR: no new machine is read until it works
                log.error("journal %s: cannot list the machines in %s with %s: %s; trying again"
                          " every %.0fs", self.cfg.topic, self.cfg.directory, self.cfg.journalctl,
                          why, DISCOVER_S)
            self.listing_failed = True
            return False
        if self.listing_failed:
            log.info("journal %s: machines listed again", self.cfg.topic)
        self.listing_failed = False
        # No _MACHINE_ID in any entry (journald always writes one; hand-made export format may
        # not): one journal, if it has an entry at all.
        if (not found and not self.sources and "" not in self.saved
                and await last_cursor(self.cfg) is not None):
            log.info("journal %s: no entry in %s names its machine (_MACHINE_ID); reading it as one"
                     " journal", self.cfg.topic, self.cfg.directory)
            found = [""]
        self.start_machines(found, first_look)
        return True

    def start_machines(self, found: list[str], first_look: bool) -> None:
        if "" in self.saved or "" in self.sources:  # read as one journal (see run)
            if "" not in self.sources:
                found = [""]
            elif found and found != [""] and not self.mixed:
                self.mixed = True  # WARNING: the directory is read as one merged journal
                log.warning("journal %s: entries naming their machine appeared in %s, read as one"
                            " journal since its first entries named none; they are read with it"
                            " (give each machine's journal a directory of its own)",
                            self.cfg.topic, self.cfg.directory)
                return
            else:
                return
        new = [m for m in found if m not in self.sources]
        if self.legacy is not None and first_look and len(new) == 1:
            self.saved[new[0]] = self.legacy   # one machine: the old checkpoint is all its own
        for machine in new:
            if not first_look:
                log.info("journal %s: machine %s found in %s; reading its journal", self.cfg.topic,
                         machine, self.cfg.directory)
            src = self.add(machine, first_look)
            self.tasks[machine] = asyncio.create_task(src.run(), name=f"journal {src.name}")
        if first_look:
            self.legacy = None

    def checkpoints(self) -> list[dict[str, Any]]:
        """The machines' checkpoints, and those not in use yet (saved before the first look)."""
        kept = list(self.saved.values()) + ([self.legacy] if self.legacy is not None else [])
        return [src.checkpoint() for src in self.sources.values() if src.known] + kept

    def status(self) -> dict[str, Any]:
        """One row for the section: the machines' sums (their own rows under ``machines``)."""
        rows = [src.status() for src in self.sources.values()]
        if not self.per_machine:
            return rows[0]
        one = rows[0] if len(rows) == 1 else None
        total = {"topic": self.cfg.topic, "machine": one["machine"] if one else "",
                 "path": f"journal:{self.cfg.directory}", "matches": list(self.cfg.field_matches),
                 "priority": self.cfg.priority}
        for key in ("stream", "offset", "shipped", "cursor"):
            total[key] = one[key] if one else None
        for key in ("entries_read", "entries_acked", "entries_missing", "entries_cut", "lag_entries",
                    "reader_restarts"):
            total[key] = sum(r[key] for r in rows)
        total["lag_s"] = max((r["lag_s"] for r in rows), default=0.0)
        total["reader_running"] = not self.listing_failed and all(r["reader_running"] for r in rows)
        total["machines"] = rows
        return total


SYSTEM_JOURNAL_DIRS = ("/var/log/journal", "/run/log/journal")  # persistent, volatile (journald.conf)


def system_journal_problem(dirs: tuple[str, ...] = SYSTEM_JOURNAL_DIRS) -> str | None:
    """Why the system journal has nothing to read here, or None: a journal file in a machine's
    directory under ``dirs`` (or one this user may not list: journalctl then says why)."""
    for top in dirs:
        try:
            machines_here = [e.path for e in os.scandir(top) if e.is_dir()]
        except OSError:
            continue
        for path in machines_here:
            try:
                if any(n.endswith((".journal", ".journal~")) for n in os.listdir(path)):
                    return None
            except PermissionError:
                return None
            except OSError:
                continue
    return (f"[[journal]] without a directory reads the system journal, but there is no journal file"
            f" in {' or '.join(dirs)}: is systemd-journald running on this host? (nothing is read"
            " until it writes one)")


class JournalSources:
    """The agent's ``[[journal]]`` sections: what daemon.py calls."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        # Every machine's source, appended as found (the metrics thread copies this list).
        self.sources: list[JournalSource] = []
        self.sections = [JournalSection(self, cfg) for cfg in agent.config.journals]
        self._owner: dict[str, JournalSource] = {}       # stream id -> its source, as looked up
        self._system_checked_at = -1e9
        self._system_problem: str | None = None

    def __bool__(self) -> bool:
        return bool(self.sections)

    def problems(self) -> list[str]:
        """What is wrong with the sections that read the system journal: none of its files
        exist (no journald on this host, or it keeps its journal elsewhere). Looked at once a
        minute at most; said at WARNING when it becomes true."""
        if not any(not s.cfg.directory for s in self.sections):
            return []
        now = time.monotonic()
        if now - self._system_checked_at >= 60:
            self._system_checked_at = now
            problem = system_journal_problem()
            if problem is not None and problem != self._system_problem:
                log.warning("%s", problem)
            self._system_problem = problem
        return [self._system_problem] if self._system_problem else []

    def start(self, saved: list[dict[str, Any]]) -> list[asyncio.Task[None]]:
        self.problems()
        for section in self.sections:
            section.restore([doc for doc in saved if doc.get("key") == section.cfg.key])
        return [asyncio.create_task(section.run(), name=f"journal {section.cfg.topic}")
                for section in self.sections]

    def _find(self, stream: str) -> tuple[JournalSource, JStream] | None:
        src = self._owner.get(stream)
        if src is None or stream not in src.by_id:
            src = next((s for s in self.sources if stream in s.by_id), None)
            if src is None:
                return None
            if len(self._owner) > 10_000:
                self._owner.clear()
            self._owner[stream] = src
        return src, src.by_id[stream]

    def ack(self, stream: str, end: Any) -> bool:
        found = self._find(stream)
        if found is None or type(end) is not int:
            return False
        return found[0].ack(found[1], end)

    def resync(self, stream: str, offset: Any, seq: Any) -> None:
        found = self._find(stream)
        if found is None or type(offset) is not int or type(seq) is not int:
            return
        found[0].resync(found[1], offset, seq)

    def rewind_unacked(self) -> None:
        for src in self.sources:
            src.rewind_unacked()

    def inflight_bytes(self) -> int:
        return sum(src.inflight_bytes() for src in self.sources)

    def lag_bytes(self) -> int:
        return sum(src.lag_bytes() for src in self.sources)

    def unacked_streams(self) -> list[str]:
        return [st.stream for src in self.sources for st in src.streams.values() if st.ship_pos > st.acked]

    def lag(self) -> tuple[int, float]:
        lags = [src.lag() for src in self.sources]
        return sum(e for e, _ in lags), max((s for _, s in lags), default=0.0)

    def checkpoints(self) -> list[dict[str, Any]]:
        return [doc for section in self.sections for doc in section.checkpoints()]

    def status(self) -> list[dict[str, Any]]:
        return [section.status() for section in self.sections]

    async def stop(self) -> None:
        for src in self.sources:
            with contextlib.suppress(ProcessLookupError):
                await src.reader.stop()

    def kill_now(self) -> None:
        for src in self.sources:
            src.reader.kill_now()
