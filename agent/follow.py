"""Following files: finding them, telling them apart, and what renames, truncations, copies
and deletions mean for each followed stream.

A mixin of ``Agent`` (agent/daemon.py), kept apart because it is the part of the agent with the
most cases: the reading, shipping and acknowledgement loop lives in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Iterator

from agent.config import AgentConfig, Config, SourceConfig
from agent.offsets import Checkpoint
from agent.tail import (
    FP_LEN,
    MARK_LEN,
    OPEN_FLAGS,
    Tailer,
    bytes_before,
    file_size,
    fingerprint,
    line_start_before,
    mark_hash,
    new_stream_id,
    shown,
)
from agent.watch import Watcher, expand, not_a_log
from fleetlog.runtime import Wakeup

log = logging.getLogger("fleetlog.agent")


Ident = tuple[int, int]
Named = tuple[SourceConfig, str, os.stat_result]  # a file as one glob match found it


class Following:
    """File discovery and identity; expects the attributes ``Agent.__init__`` sets."""

    config: Config
    cfg: AgentConfig
    tailers: dict[str, Tailer]
    by_inode: dict[Ident, Tailer]
    by_path: dict[str, Tailer]
    shadows: dict[Ident, Checkpoint]
    predecessors: dict[str, Tailer]
    pending_checkpoints: dict[Ident, Checkpoint]
    # Files no source matches any more, still there under their names: where each was left.
    unfollowed: dict[Ident, Checkpoint]
    unacked: set[Tailer]
    timed: set[Tailer]
    empty_globs: set[tuple[int, str]]
    queued: set[Tailer]
    ready: deque[Tailer]
    inflight: int
    checkpoints_dirty: bool
    unsaved_streams: bool
    first_run: bool
    started: asyncio.Event
    scan_soon: Wakeup
    watcher: Watcher | None
    # Files the agent may not open: identity -> (name, reason); warned once per identity.
    unreadable: dict[Ident, tuple[str, str]]
    # Files whose handling failed unexpectedly: identity -> the error, logged once per identity.
    failing: dict[Ident, str]
    # Glob matches that are not log files (FIFOs, sockets, devices, /proc files, directories):
    # name -> what it is; said once per name.
    skipped: dict[str, str]
    # Counts every change of the names followed (a heartbeat with nothing new reuses its figures).
    names_changed: int

    def enqueue(self, t: Tailer) -> None:
        raise NotImplementedError

    def inflight_bytes(self) -> int:
        raise NotImplementedError

    def scan(self) -> None:
        """Find new files, notice renames, truncations and files that went away."""
        now = time.monotonic()
        names: dict[Ident, list[Named]] = {}
        matched: list[dict[str, int]] = []
        skipped: dict[str, str] = {}
        for source in self.config.sources:
            matched.append({})
            for path, st in expand(source, matched[-1], skipped):
                names.setdefault((st.st_dev, st.st_ino), []).append((source, path, st))
        self.note_empty_globs(matched)
        self.note_skipped(skipped, names)
        new: list[Named] = []
        for ident, entries in names.items():
            t = self.by_inode.get(ident)
            if t is not None and t.fd is None:
                with self.guard(ident, t.path):
                    if t.other_file_at(*preferred(entries)[1:]):
                        self.inode_reused(t, preferred(entries)[1])
                        t = None
            if t is None:
                if ident not in self.shadows:
                    new.append(preferred(entries))
                continue
            # As in guard(), without a context manager per file and scan (10,000 files).
            try:
                if t.path != entries[0][1] and t.path not in {path for _, path, _ in entries}:
                    self.renamed(t, preferred(entries)[1])
                if entries[0][0] is not t.source and t.rotated_at is None:
                    self.source_changed(t, entries[0][0])
                self.check_size(t, entries[0][2].st_size)
            except Exception as exc:  # on purpose: any bug must stay with this one file
                self.failed(ident, t.path, exc)
        self.scan_unmatched(names, now)
        self.check_unfollowed(names)
        self.scan_copies(names)
        # New files last, so that a file that took a rotated one's name knows its predecessor.
        for source, path, st in new:
            with self.guard((st.st_dev, st.st_ino), path):
                self.discover(source, path, st)
        self.enforce_fd_limit(now)

    def scan_unmatched(self, names: dict[Ident, list[Named]], now: float) -> None:
        """Followed files no glob matched in this scan: rotated away or deleted (their name
        leads elsewhere or nowhere), or no longer matched by any source (the sources changed);
        and rotated files to let go once done."""
        for t in list(self.tailers.values()):
            if t.rotated_at is None and (t.dev, t.ino) in names:
                continue
            with self.guard((t.dev, t.ino), t.path):
                if t.rotated_at is not None:
                    self.maybe_forget(t, now)
                elif (st := self.at_its_name(t)) is not None:
                    self.unmatched(t, st)
                else:
                    self.lost_name(t, now)

    def note_empty_globs(self, matched: list[dict[str, int]]) -> None:
        """Say at WARNING when a source's glob matches nothing (at start, and whenever that
        changes at a rescan), at INFO when it matches again: a default rollout on a host without
        /var/log/syslog must not ship nothing in silence."""
        empty = {(i, pattern) for i, source in enumerate(self.config.sources)
                 for pattern in source.paths if not matched[i].get(pattern)}
        if empty == self.empty_globs:
            return
        sources = self.config.sources
        for i, pattern in sorted(empty - self.empty_globs):
            log.warning("sources[%d] (topic %s): %s matches no file", i, sources[i].topic, pattern)
        for i, pattern in sorted(self.empty_globs - empty):
            if i < len(sources):
                log.info("sources[%d] (topic %s): %s matches files now", i, sources[i].topic, pattern)
        self.empty_globs = empty

    def note_skipped(self, skipped: dict[str, str], names: dict[Ident, list[Named]]) -> None:
        """Say once per name what a glob matched that is not a log file and is skipped (a FIFO,
        a socket, a device, a /proc file: WARNING, the glob names something that is never
        shipped; a directory: DEBUG, ``*`` and ``**`` match directories as a matter of course).
        Said again if it goes away and comes back."""
        for path, what in skipped.items():
            if self.skipped.get(path) != what:
                self.say_skipped(path, what)
        # Kept: what is skipped now, and files whose end could not be sought (``discover``),
        # while a glob still matches them.
        matched = {path for entries in names.values() for _, path, _ in entries}
        self.skipped = {**{p: w for p, w in self.skipped.items() if p in matched}, **skipped}

    def say_skipped(self, path: str, what: str) -> None:
        self.skipped[path] = what
        self.names_changed += 1
        level = logging.DEBUG if what.startswith("a directory") else logging.WARNING
        log.log(level, "%s is %s: not followed (sources follow regular files; an exclude glob silences "
                "this)", shown(path), what)

    def scan_copies(self, names: dict[Ident, list[Named]]) -> None:
        """Copies that grew, copies and unreadable files that are gone."""
        for ident in [i for i in self.shadows if i in names]:
            source, path, st = preferred(names[ident])
            with self.guard(ident, path):
                self.check_copy(ident, source, path, st)
        for gone in [i for i in self.shadows if i not in names]:
            del self.shadows[gone]  # the copy is gone: nothing to finish from
        for gone in [i for i in self.unreadable if i not in names]:
            del self.unreadable[gone]

    @contextlib.contextmanager
    def guard(self, ident: Ident, path: str) -> Iterator[None]:
        """Nothing about one file may stop the agent: an unexpected error in its handling is
        logged (once per file identity and error) with its name, and the file is tried again at
        the next periodic scan; the other files go on."""
        try:
            yield
            if self.failing:
                self.failing.pop(ident, None)  # handled again without an error
        except Exception as exc:  # on purpose: any bug must stay with this one file
            self.failed(ident, path, exc)

    def failed(self, ident: Ident, path: str, exc: Exception) -> None:
        """``guard``'s report, also called directly where a ``with`` per call would cost (the
        read loop, change events)."""
        # As text any JSON carries (status): the error may quote a name that is not UTF-8.
        said = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode()
        if self.failing.get(ident) != said:
            self.failing[ident] = said
            log.error("%s: handling it failed (%s); trying again at the next scan; other files "
                      "go on", shown(path), said, exc_info=exc)

    def inode_reused(self, t: Tailer, path: str) -> None:
        """``t``'s file is gone (deleted and let go) and a new file, ``path``, got its inode
        number: that one is new, shipped from its start; ``t`` is forgotten. (Taken for a
        rename, the new file was followed from the old one's offset: 582 of 4,500 lines of
        1,500 short-lived files were never shipped.)"""
        log.info("%s is gone and %s has its inode now, with another content: a new file",
                 shown(t.path), shown(path))
        self.forget(t)

    def renamed(self, t: Tailer, path: str) -> None:
        log.info("%s was renamed to %s; following it there", shown(t.path), shown(path))
        self.unindex(t)
        self.predecessors[t.path] = t
        t.path = path
        t.rotated_at = None
        self.index(t)

    def index(self, t: Tailer) -> None:
        """Every name that leads to the file: its own, and where it points if it is a symlink
        (events name the real file)."""
        self.names_changed += 1
        self.by_path[t.path] = t
        real = os.path.realpath(t.path)
        t.real_path = real if real != t.path else ""
        if t.real_path:
            self.by_path.setdefault(t.real_path, t)

    def unindex(self, t: Tailer) -> None:
        self.names_changed += 1
        for name in (t.path, t.real_path):
            if name and self.by_path.get(name) is t:
                del self.by_path[name]

    def cannot_read(self, ident: Ident, path: str, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        if self.unreadable.get(ident, ("", ""))[1] != reason:
            log.warning("cannot read %s: %s; its lines are not shipped until it can be read",
                        shown(path), reason)
        self.unreadable[ident] = (path, reason)

    def discover(self, source: SourceConfig, path: str, st: os.stat_result, copy_check: bool = True) -> None:
        ident = (st.st_dev, st.st_ino)
        try:
            fd = os.open(path, OPEN_FLAGS)
        except FileNotFoundError:
            return  # gone between the glob and the open
        except OSError as exc:
            self.cannot_read(ident, path, exc)
            return
        self.unreadable.pop(ident, None)
        try:
            if not self.can_follow(path, fd):
                os.close(fd)
                return
            t = self._identify(source, path, fd, copy_check)
        except BaseException:
            os.close(fd)
            raise
        if t is None:
            os.close(fd)
            return
        self.failing.pop(ident, None)
        pred = self.predecessors.pop(path, None)
        if pred is not None and self.tailers.get(pred.stream) is pred:
            t.predecessor = pred
        t.attach(fd, os.fstat(fd).st_size)
        if Tailer.open_files > self.cfg.max_open_files:
            t.close()  # read (and reopened by name) when its turn comes
        self.add(t)
        log.debug("following %s from %d (stream %s)", shown(path), t.ship_pos, t.stream)

    def can_follow(self, path: str, fd: int) -> bool:
        """Whether the file open as ``fd`` is one whose size an lseek to its end gives (how every
        read finds the new bytes): a file that does not allow it (a pseudo-filesystem the
        agent does not know of, a FIFO that took the name since the glob) is skipped and said
        once, like the FIFOs and /proc files the scan skips."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = not_a_log(path, st) or "not a regular file"
            else:
                file_size(fd)
                return True
        except OSError as exc:
            what = f"a file whose end cannot be sought ({exc.strerror or exc}), so not a log that grows"
        if self.skipped.get(path) != what:
            self.say_skipped(path, what)
        return False

    def _identify(self, source: SourceConfig, path: str, fd: int, copy_check: bool) -> Tailer | None:
        """Which stream the file open as ``fd`` is: the checkpoint's (same inode, same first
        bytes, same bytes before the acknowledged offset), a copy of a followed file (None: not
        shipped), or a new stream."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        fp, fp_len = fingerprint(fd)
        cp = (self.pending_checkpoints.pop(ident, None) or self.unfollowed.pop(ident, None)
              or self._remounted(path, st))
        if cp is not None:
            t = self._tailer_from(cp, source, path)
            t.dev, t.ino = ident
            if cp.shadow and st.st_size == cp.size and self._same_content(fd, cp):
                self.shadows[ident] = cp
                return None
            # A file now shorter than the offset was truncated: the truncation is noticed (and
            # the old content looked for in a copy) once it is followed.
            if not cp.shadow and (st.st_size < cp.acked or (self._same_content(fd, cp)
                                                            and t.saved_mark_holds(fd))):
                if cp.unfollowed:
                    log.info("%s is followed again (topic %s; a source matches it): from offset %d, where "
                             "it was left", shown(path), source.topic, cp.acked)
                elif cp.topic != source.topic:
                    log.info("%s: now in topic %s (was %s in the last run; the sources changed), from "
                             "offset %d on", shown(path), source.topic, cp.topic, cp.acked)
                return t
            if not cp.shadow:
                self.lost_content(cp, f"{shown(path)} is not the file of the last run (same inode, other "
                                      "bytes: rewritten or a new file while the agent was down); "
                                      "reading it from the start", doubt=True)
        twin = self._copy_of(fd, fp, fp_len, ident, st.st_size) if copy_check else None
        if twin is not None:
            end, length, digest = twin.mark_fields()
            log.warning("%s is a copy of %s (same first %d bytes and the same %d bytes before offset %d,"
                        " as shipped); not shipping it again", shown(path), shown(twin.path), fp_len,
                        length, end)
            self.shadows[ident] = Checkpoint(twin.stream, twin.source.topic, path, ident[0], ident[1], fp,
                                             fp_len, twin.base, twin.acked, twin.seq, shadow=True,
                                             mark_end=end, mark_len=length, mark_fp=digest, size=st.st_size)
            self.checkpoints_dirty = True
            return None
        start = 0
        if source.start_at == "end" and self.first_run and not self.started.is_set():
            start = line_start_before(fd, st.st_size)
        return Tailer(source=source, path=path, stream=new_stream_id(), dev=ident[0], ino=ident[1],
                      fp=fp, fp_len=fp_len, base=start, acked=start)

    def _remounted(self, path: str, st: os.stat_result) -> Checkpoint | None:
        """A checkpoint for the same name and inode on another device number: the filesystem was
        mounted again (another loop device, another boot order). Its content decides."""
        for key, cp in self.pending_checkpoints.items():
            if cp.ino == st.st_ino and cp.dev != st.st_dev and cp.path == path and not cp.shadow:
                del self.pending_checkpoints[key]
                log.info("%s: same name and inode on device %d (was %d); resuming if its bytes match",
                         shown(path), st.st_dev, cp.dev)
                return cp
        return None

    @staticmethod
    def _same_content(fd: int, cp: Checkpoint) -> bool:
        """Whether the file open as ``fd`` has the checkpoint's first bytes and the bytes just
        before its acknowledged offset (its mark)."""
        if fingerprint(fd, cp.fp_len)[0] != cp.fp:
            return False
        if not cp.mark_fp:
            return True  # a checkpoint written before marks existed: the head decides, as it did
        data = os.pread(fd, cp.mark_len, cp.mark_end - cp.mark_len)
        return len(data) == cp.mark_len and mark_hash(data) == cp.mark_fp

    def _tailer_from(self, cp: Checkpoint, source: SourceConfig, path: str) -> Tailer:
        t = Tailer(source=source, path=path, stream=cp.stream, dev=cp.dev, ino=cp.ino, fp=cp.fp,
                   fp_len=cp.fp_len, base=cp.base, acked=cp.acked, seq=cp.seq, size=cp.size)
        if cp.mark_fp:
            t.saved_mark = (cp.mark_end, cp.mark_len, cp.mark_fp)
        return t

    def _copy_of(self, fd: int, fp: str, fp_len: int, ident: Ident, size: int) -> Tailer | None:
        """A followed file this one is a copy of: another inode with the same first FP_LEN bytes
        *and* the same bytes just before the end of a batch shipped from that file (its mark),
        so the copy holds what was shipped. Files that merely start alike (a banner, a CSV header)
        differ there, or are shorter."""
        if fp_len < FP_LEN:
            return None  # too short to tell a copy from a file that merely starts alike
        for t in self.tailers.values():
            if t.fp != fp or t.fp_len != fp_len or (t.dev, t.ino) == ident:
                continue
            # The last mark of what was shipped (acknowledged or not) that the file is long
            # enough to hold.
            mark = next((m for m in reversed(t.marks) if m[0] <= size), None) or t.acked_mark
            if mark is None or mark[0] <= fp_len or size < mark[0]:
                continue  # nothing shipped past the head to compare, or shorter than what was
            end, data = mark
            if os.pread(fd, len(data), end - len(data)) == data:
                return t
        return None

    def check_copy(self, ident: Ident, source: SourceConfig, path: str, st: os.stat_result) -> None:
        """A copy that grows is a live file of its own (a job log that starts like another):
        shipped whole. A copy still being written (``cp`` in progress) keeps matching its
        original where it grows."""
        cp = self.shadows[ident]
        if st.st_size == cp.size:
            return
        twin = self.tailers.get(cp.stream)
        if cp.size == 0 or (twin is not None and twin.fd is not None
                            and self._grows_as(twin, path, st.st_size)):
            cp.size = st.st_size
            return
        del self.shadows[ident]
        log.warning("%s, taken for a copy of %s, grows with other bytes; shipping it whole",
                    shown(path), shown(cp.path if twin is None else twin.path))
        self.discover(source, path, st, copy_check=False)

    @staticmethod
    def _grows_as(twin: Tailer, path: str, size: int) -> bool:
        fd = os.open(path, OPEN_FLAGS)
        try:
            mine = bytes_before(fd, size, MARK_LEN)
        finally:
            os.close(fd)
        return bytes_before(twin.fd, size, MARK_LEN) == mine  # type: ignore[arg-type]

    def add(self, t: Tailer) -> None:
        self.unsaved_streams = True
        self.tailers[t.stream] = t
        self.by_inode[(t.dev, t.ino)] = t
        self.index(t)
        self.checkpoints_dirty = True
        self.enqueue(t)

    def forget(self, t: Tailer) -> None:
        t.close()
        self.tailers.pop(t.stream, None)
        if self.by_inode.get((t.dev, t.ino)) is t:
            del self.by_inode[(t.dev, t.ino)]
        self.unindex(t)
        self.unacked.discard(t)
        self.inflight = self.inflight_bytes()
        if t in self.queued:
            self.queued.discard(t)
            # Out of the read queue too: a file let go while its name still leads to it (no
            # source matches it any more) would be opened again by name and read there.
            with contextlib.suppress(ValueError):
                self.ready.remove(t)
        self.checkpoints_dirty = True

    def checkpoint_of(self, t: Tailer) -> Checkpoint:
        end, length, digest = t.mark_fields()
        return Checkpoint(t.stream, t.source.topic, t.path, t.dev, t.ino, t.fp, t.fp_len, t.base, t.acked,
                          t.seq, 0.0, mark_end=end, mark_len=length, mark_fp=digest,
                          size=max(t.size, t.ship_pos), real_path=t.real_path)

    def check_size(self, t: Tailer, size: int) -> None:
        """What a newly seen size means: a truncation, a new content (the head changed), or
        bytes to read (queued; the read takes ``size`` rather than an fstat of its own)."""
        if t.fd is None and t.rotated_at is None and size != t.size and not t.open():
            # Held without a descriptor (the open-files limit) and it cannot be opened as ours:
            # gone, or another head under its inode (a new file; rewritten). The scan tells which,
            # now rather than at the next full scan (once per size seen: no loop of scans).
            t.size = size
            self.scan_soon.set()
            return
        t.size, t.size_seen = size, True
        if size < t.ship_pos:
            self.truncated(t, "was truncated")
        elif not self.same_head(t, size):
            # The same head with other bytes before the offset (a start-up banner written again)
            # is the doubtful case; another head is plainly another content.
            same_start = t.fd is not None and self._head_still(t)
            self.truncated(t, "was truncated and written again (the bytes before its offset changed)"
                           if same_start else "was truncated and written again (its first bytes changed)",
                           doubt=same_start)
        elif size > t.ship_pos or t.partial_since is not None or t.multiline_since is not None:
            self.enqueue(t)

    @staticmethod
    def _head_still(t: Tailer) -> bool:
        try:
            return t.head_unchanged()
        except OSError:
            return False

    def same_head(self, t: Tailer, size: int) -> bool:
        """Whether the file still starts with the bytes it started with: a file truncated and
        written again past our offset before we looked has another head. (One written again with
        the same head has other bytes before the offset: each read checks those, ``Rewritten``.)
        Short heads are extended once the file is long enough, so copies of it can be
        recognised."""
        if t.fd is None or t.rotated_at is not None:
            return True
        try:
            if not t.head_unchanged():
                return False
            if t.fp_len < FP_LEN and size > t.fp_len:
                t.fp, t.fp_len = fingerprint(t.fd)
                self.checkpoints_dirty = True
        except OSError:
            pass
        return True

    def truncated(self, t: Tailer, what: str, doubt: bool = False) -> None:
        """copytruncate, `> file`, or written again from the start: the content restarts at 0 as
        a new stream. Bytes not acknowledged are looked for in a copy next to it
        (copytruncate's app.log.1); what cannot be found is said at WARNING."""
        if not t.open():
            return
        old = self.checkpoint_of(t)
        fp, fp_len = fingerprint(t.fd)  # type: ignore[arg-type]
        self.unacked.discard(t)
        self.inflight = self.inflight_bytes()
        t.restart_stream(fp, fp_len)
        self.unsaved_streams = True
        self.tailers = {s: x for s, x in self.tailers.items() if x is not t}
        self.tailers[t.stream] = t
        # The old content (from a copy) goes before the new; anything the old content itself
        # waited for (an earlier copy, not yet acknowledged) goes before both.
        prev = t.predecessor
        copy = self.lost_content(old, f"{shown(t.path)} {what} at {old.size} (acked {old.acked}); "
                                      "reading it again from 0", doubt)
        if copy is not None:
            copy.predecessor = prev
        t.predecessor = copy or prev
        self.checkpoints_dirty = True
        self.enqueue(t)

    def lost_content(self, old: Checkpoint, what: str, doubt: bool = False,
                     unseen: bool = False) -> Tailer | None:
        """A stream's file no longer holds its content (truncated, rewritten, replaced): finish
        it from a copy if there is one; else say at WARNING how many bytes seen could not be
        shipped. ``doubt``: the file is shipped again from 0 on the strength of changed bytes
        (it may repeat lines), which is said at WARNING too; a plain truncation or a file read
        to its end and deleted is INFO."""
        copy = self.promote_copy(old)
        if copy is not None:
            log.log(logging.WARNING if doubt else logging.INFO, "%s; its bytes after %d are read from its "
                    "copy %s", what, old.acked, shown(copy.path))
        elif old.size > old.acked:
            log.warning("%s; %d bytes of the old content (%d to %d of %d bytes, stream %s) could not be "
                        "shipped", what, old.size - old.acked, old.acked, old.size, old.size, old.stream)
        elif unseen:
            # Gone while the agent was down: lines written after it stopped, if any, were never
            # seen (rotated and compressed at once, or deleted); nobody can count them.
            log.warning("%s; anything written to it after the agent stopped could not be shipped "
                        "(use delaycompress, or keep the rotated file under a watched glob)", what)
        else:
            log.log(logging.WARNING if doubt else logging.INFO, "%s", what)
        return copy

    def promote_copy(self, old: Checkpoint) -> Tailer | None:
        """Finish a truncated stream from its copy, if the copy holds more than was acknowledged."""
        for ident, shadow in list(self.shadows.items()):
            if shadow.stream == old.stream:
                return self._finish_from_copy(ident, shadow.path, old)
        directory = os.path.dirname(old.path)
        prefix = os.path.basename(old.path)
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name.startswith(prefix) and path != old.path:
                    with contextlib.suppress(OSError):
                        st = os.stat(path)
                        if st.st_size > old.acked and self._path_matches(path, old):
                            return self._finish_from_copy((st.st_dev, st.st_ino), path, old)
        return None

    def _path_matches(self, path: str, cp: Checkpoint) -> bool:
        fd = os.open(path, OPEN_FLAGS)
        try:
            return self._same_content(fd, cp)
        finally:
            os.close(fd)

    def _finish_from_copy(self, ident: Ident, path: str, old: Checkpoint) -> Tailer | None:
        self.shadows.pop(ident, None)
        if ident in self.by_inode:
            return None
        source = next((s for s in self.config.sources if s.topic == old.topic), None)
        if source is None:
            return None  # no source of its topic is left (the sources changed)
        t = self._tailer_from(old, source, path)
        t.dev, t.ino = ident
        if not t.open():
            return None
        t.rotated_at = time.monotonic()
        self.tailers[t.stream] = t
        self.by_inode[ident] = t
        self.unsaved_streams = True
        self.enqueue(t)
        return t

    def lost_name(self, t: Tailer, now: float) -> None:
        """No glob match leads to this file any more: it was rotated away or deleted."""
        self.unindex(t)
        self.predecessors[t.path] = t
        if t.fd is None:
            found = self.find_elsewhere(t)
            if found is None or not t.reopen(found):
                self.forget(t)
                self.lost_content(self.checkpoint_of(t), f"{shown(t.path)} is gone")
                return
        t.rotated_at = now
        log.info("%s was rotated away; reading it to its end", shown(t.path))
        self.enqueue(t)

    # -- sources changed: files no source matches any more, files whose source changed ---------

    @staticmethod
    def at_its_name(t: Tailer | Checkpoint) -> os.stat_result | None:
        """The file's stat if its name still leads to it (same device and inode): not matched
        by any glob then means no source matches it any more, not that it was rotated away."""
        try:
            st = os.stat(t.path)
        except OSError:
            return None
        return st if (st.st_dev, st.st_ino) == (t.dev, t.ino) else None

    def source_changed(self, t: Tailer, source: SourceConfig) -> None:
        """A reload changed the source that matches the file first: its settings apply from the
        next read on, its topic too (the stream goes on: the aggregator keys streams by agent
        and stream, whatever their topic)."""
        if source.topic != t.source.topic:
            log.info("%s: now in topic %s (was %s; the sources changed), from offset %d on",
                     shown(t.path), source.topic, t.source.topic, t.ship_pos)
            self.names_changed += 1
            self.checkpoints_dirty = True
        t.use_source(source)

    def unmatched(self, t: Tailer, st: os.stat_result) -> None:
        """A reload left no source that matches this file (removed, its glob narrowed, an
        exclude added): it is let go now. What was shipped is acknowledged as usual; what was
        not read is left, and said. Where it was left is kept (``unfollowed``) while the file
        is there, so a source that matches it again resumes it there, not from its start."""
        cp = self.checkpoint_of(t)
        read_to, inflight = t.ship_pos, t.ship_pos - t.acked
        self.forget(t)
        self.unfollow(cp, st.st_size, read_to, "after the reload", inflight)

    def unfollow(self, cp: Checkpoint, size: int, read_to: int, since: str, inflight: int = 0) -> None:
        first = not cp.unfollowed
        cp.unfollowed = True
        cp.size = size
        self.unfollowed[(cp.dev, cp.ino)] = cp
        self.checkpoints_dirty = True
        self.names_changed += 1
        if not first:
            log.debug("%s is still matched by no source; keeping where it was left (%d)",
                      shown(cp.path), cp.acked)
            return
        what = f"{shown(cp.path)} (topic {cp.topic}) is no longer followed: no source matches it {since}"
        sent = f", {inflight} bytes before them wait for the aggregator's acknowledgement" if inflight > 0 \
            else ""
        if size > read_to:
            log.warning("%s; %d bytes after offset %d (%d to %d of %d bytes) are not shipped%s; where it was "
                        "left is kept while the file is there: a source that matches it again ships what "
                        "was not acknowledged", what, size - read_to, read_to, read_to, size, size, sent)
        else:
            log.info("%s; it was read to its end (%d bytes%s); where it was left is kept while the file is "
                     "there", what, read_to, f", {inflight} of them not yet acknowledged" if inflight > 0
                     else "")

    def check_unfollowed(self, names: dict[Ident, list[Named]]) -> None:
        """Where unfollowed files were left is kept while each is there under its name, as
        long as its offset; a file matched again is resumed by ``discover``."""
        for ident, cp in list(self.unfollowed.items()):
            if ident in names:
                continue
            st = self.at_its_name(cp)
            if st is not None and st.st_size >= cp.acked:
                cp.size = st.st_size
                continue
            del self.unfollowed[ident]
            self.checkpoints_dirty = True
            log.info("%s (no longer followed) is %s: forgetting where it was left (%d)", shown(cp.path),
                     "gone or renamed" if st is None else "truncated", cp.acked)

    def unfollowed_acked(self, stream: str, end: int) -> None:
        """An acknowledgement of a batch shipped before its file was unfollowed."""
        for cp in self.unfollowed.values():
            if cp.stream == stream:
                if end > cp.acked:
                    cp.acked = end
                    self.checkpoints_dirty = True
                return

    def find_elsewhere(self, t: Tailer | Checkpoint) -> str | None:
        """The file's new name, by device and inode: in the directory of its name, in the one
        its symlink led to, or in a directory right under either (logrotate's ``olddir``)."""
        dirs = [os.path.dirname(t.path)]
        if t.real_path and os.path.dirname(t.real_path) not in dirs:
            dirs.append(os.path.dirname(t.real_path))
        subdirs: list[str] = []
        for directory in dirs:
            found = self._find_in(directory, (t.dev, t.ino), subdirs)
            if found is not None:
                return found
        for directory in subdirs:
            found = self._find_in(directory, (t.dev, t.ino), None)
            if found is not None:
                return found
        return None

    @staticmethod
    def _find_in(directory: str, ident: Ident, subdirs: list[str] | None) -> str | None:
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == ident:
                        return entry.path
                    if subdirs is not None and entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
        return None

    def resume_rotated_while_down(self) -> None:
        """Checkpointed files that no glob matches now: rotated while the agent was down."""
        pending, self.pending_checkpoints = self.pending_checkpoints, {}
        for cp in pending.values():
            if cp.shadow:
                continue
            with self.guard((cp.dev, cp.ino), cp.path):
                self._resume_rotated(cp)

    def _resume_rotated(self, cp: Checkpoint) -> None:
        st = self.at_its_name(cp)
        if st is not None:
            # Still there, and no glob matches it: the sources changed, it was not rotated.
            if st.st_size >= cp.acked and self._path_matches(cp.path, cp):
                self.unfollow(cp, st.st_size, cp.acked, "since the last run")
                return
            if not cp.unfollowed:
                log.info("%s (topic %s) is no longer followed: no source matches it since the last run; "
                         "its content changed since (truncated or written again), so where it was left "
                         "is not kept", shown(cp.path), cp.topic)
                return
        if cp.unfollowed:
            # Let go before, and no longer there as it was: not finished as a rotated file.
            log.info("%s (no longer followed) is gone, renamed or truncated: forgetting where it was "
                     "left (%d)", shown(cp.path), cp.acked)
            return
        path = self.find_elsewhere(cp)
        source = next((s for s in self.config.sources if s.topic == cp.topic), None)
        if path is not None and source is None and self._path_matches(path, cp):
            size = os.stat(path).st_size
            log.log(logging.WARNING if size > cp.acked else logging.INFO,
                    "%s (stream %s), rotated to %s while the agent was down, is not finished: no source "
                    "has its topic %s now (the sources changed); %d bytes after offset %d are not shipped",
                    shown(cp.path), cp.stream, shown(path), cp.topic, max(0, size - cp.acked), cp.acked)
            return
        if path is None or source is None or not self._path_matches(path, cp):
            self.lost_content(cp, f"{shown(cp.path)} (stream {cp.stream}) is gone since the last run",
                              unseen=True)
            return
        t = self._tailer_from(cp, source, path)
        if t.open():
            if t.fd is not None and not t.saved_mark_holds(t.fd):
                t.close()
                self.lost_content(cp, f"{shown(cp.path)} (stream {cp.stream}) changed since the last run",
                                  doubt=True)
                return
            t.rotated_at = time.monotonic()
            log.info("finishing %s, rotated while the agent was down, from %d", shown(path), cp.acked)
            self.tailers[t.stream] = t
            self.by_inode[(t.dev, t.ino)] = t
            successor = self.by_path.get(cp.path)
            if successor is not None and successor.predecessor is None:
                successor.predecessor = t
            self.enqueue(t)

    def maybe_forget(self, t: Tailer, now: float) -> None:
        """Let a rotated-away file go once it is read to its end, acknowledged and quiet for
        rotated_keep_s: the application may write on through its descriptor, even after the
        file was unlinked (logrotate's ``compress`` without ``delaycompress``)."""
        if t.fd is not None:
            try:
                st = os.fstat(t.fd)
            except OSError:
                st = None
            if st is not None and st.st_size > t.ship_pos:
                self.enqueue(t)
                return
            if st is not None and now - t.last_data < self.cfg.rotated_keep_s:
                return
        if t.ship_pos == t.acked and t not in self.unacked:
            log.info("done with rotated %s at %d", shown(t.path), t.acked)
            self.forget(t)

    def enforce_fd_limit(self, now: float) -> None:
        """Close files idle for idle_close_s (they reopen when they change), and the least
        recently active ones when more than max_open_files are open."""
        open_tailers = [t for t in self.tailers.values() if t.fd is not None]
        idle = [t for t in open_tailers if t.rotated_at is None and t not in self.queued
                and t not in self.unacked and t.size == t.ship_pos]
        for t in idle:
            if now - t.last_data > self.cfg.idle_close_s:
                t.close()
        open_count = sum(1 for t in self.tailers.values() if t.fd is not None)
        excess = open_count - self.cfg.max_open_files
        if excess > 0:
            for t in sorted((t for t in idle if t.fd is not None), key=lambda t: t.last_data)[:excess]:
                t.close()

    def on_change(self, paths: set[str]) -> None:
        unknown = False
        for path in paths:
            t = self.by_path.get(path)
            if t is None:
                # A FIFO skipped is written to all the time: no rescan for each write.
                unknown = unknown or path not in self.skipped
                continue
            if t.fd is None and not t.open():
                unknown = True
                continue
            try:
                self.check_size(t, file_size(t.fd))  # type: ignore[arg-type]
            except OSError:
                continue
            except Exception as exc:  # as in guard(), without a context manager per event
                self.failed((t.dev, t.ino), t.path, exc)
                continue
            self.enqueue(t)
        if unknown:
            self.scan_soon.set()

    async def scan_loop(self) -> None:
        """Rescan every rescan_interval_ms, and at once when the watcher reports a name the
        agent does not know. While inotify watches (it reports every change of a file, and says
        when it lost events), a periodic rescan whose directories are unchanged does only the
        timed work (``light_scan``): with 10,000 quiet files, a full rescan's glob, stat and
        checks of every file cost 1.4% of a core at 5 s. A full rescan still comes once a minute
        (FULL_SCAN_S), whatever inotify says."""
        interval = self.cfg.rescan_interval_ms / 1000
        last_full = time.monotonic()
        stamps: dict[str, tuple[int, int, int]] | None = None
        while True:
            # A Wakeup, not asyncio.wait_for(event.wait()): see Transport._nap (a cancel at
            # shutdown could stay pending for ever there).
            asked = await self.scan_soon.wait(interval)
            self.scan_soon.clear()
            now = time.monotonic()
            quiet = (not asked and stamps is not None and now - last_full < FULL_SCAN_S
                     and self.watcher is not None and self.watcher.reports_every_change
                     and dir_stamps(self.config.sources) == stamps)
            if quiet:
                self.light_scan(now)
            else:
                # Stamped before the scan: a change during it makes the next one full.
                stamps = dir_stamps(self.config.sources)
                last_full = now
                self.scan()
            self.rearm_timers()
            if self.watcher is not None:
                # Where symlinked files really are: their changes are reported there.
                self.watcher.refresh({os.path.dirname(t.real_path) for t in self.tailers.values()
                                      if t.real_path})
            await asyncio.sleep(0.01)  # coalesce bursts of new-file events

    def light_scan(self, now: float) -> None:
        """The timed part of a rescan, for when no directory changed: rotated files let go once
        done, idle files closed."""
        for t in [t for t in self.tailers.values() if t.rotated_at is not None]:
            with self.guard((t.dev, t.ino), t.path):
                self.maybe_forget(t, now)
        self.enforce_fd_limit(now)

    def rearm_timers(self) -> None:
        for t in list(self.timed):
            if (t.partial_since is None and t.multiline_since is None) or \
                    self.tailers.get(t.stream) is not t:
                self.timed.discard(t)
            else:
                self.enqueue(t)


FULL_SCAN_S = 60.0  # the longest between two full rescans while inotify watches


def dir_stamps(sources: tuple[SourceConfig, ...]) -> dict[str, tuple[int, int, int]] | None:
    """Each source directory's (device, inode, mtime in ns), which changes whenever a name in it
    is created, removed or renamed; None when a glob has wildcards in its directories (their
    set of directories is only known by globbing: every rescan is full then)."""
    out: dict[str, tuple[int, int, int]] = {}
    for source in sources:
        for pattern in source.paths:
            directory = os.path.dirname(pattern)
            if glob.has_magic(directory):
                return None
            if directory in out:
                continue
            try:
                st = os.stat(directory)
            except OSError:
                out[directory] = (0, 0, 0)
                continue
            out[directory] = (st.st_dev, st.st_ino, st.st_mtime_ns)
    return out


def preferred(entries: list[Named]) -> Named:
    """Of the names one file has in this scan (a symlink and its target, overlapping globs),
    the one to follow it by: the first that is not a symlink, else the first."""
    if len(entries) > 1:
        for entry in entries:
            if not os.path.islink(entry[1]):
                return entry
    return entries[0]
