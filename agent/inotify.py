"""Linux inotify on the event loop: the agent's file watching without a thread.

watchfiles' RustNotify (agent/watch.py, still used for ``force_polling``) runs two threads: the
notify crate's, woken by every event (one per ``write()`` of every followed file: 500 wake-ups a
second on a typical node, half a percent of a core), and ours, which steps to collect them and
takes the GIL at every step, also when nothing changes (50 wake-ups a second on an idle node).
Here the inotify descriptor sits in the event loop's selector: the first event after a quiet
spell wakes the loop once, which then waits ``delay_s`` (the latency budget) and reads every
event queued meanwhile with one ``read()`` into a buffer kept for it. While reads find events,
the next one simply comes ``delay_s`` later, with the descriptor out of the selector; the first
read that finds none puts it back. The kernel queues events (merging repeats of the same one)
while nobody reads, so a busy node costs one timer and one read per read cycle, and an idle one
costs nothing.

Watches are on directories (the globs' fixed parts, and every directory below them when a glob
recurses), never on files: 10,000 files in one directory are one watch. A queue overflow, a
watched directory that goes away and a new directory all report a name the agent does not know,
which makes it rescan (the rescan is what guarantees nothing is missed; events only say where
to look sooner).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger("fleetlog.agent.watch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name, NUL padded)
# The most one read takes (a drain reads again while reads fill it): 64 KiB holds a thousand
# events, more than a typical cycle queues (the kernel merges repeats of an event).
READ_BYTES = 64 * 1024
# The most (watch descriptor, name) -> path translations kept (a directory of 10,000 files
# changing at once: every one of them once).
MAX_KNOWN_PATHS = 20_000
# A name that no file has: what a report says when the agent must rescan to know what changed.
RESCAN = "\0rescan"

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # The process's own symbols (libc is loaded already), as fleetlog/durable.py does:
        # find_library("c") runs ldconfig and imports shutil, tempfile, bz2 and lzma (0.3 MiB).
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


class InotifyWatcher:
    """Watches ``roots`` (directories; with ``recursive``, every directory below them too) and
    calls ``on_change(paths)`` from the loop with the paths that changed, at most ``delay_s``
    after the first change. Raises OSError when inotify cannot be set up at all."""

    def __init__(self, roots: list[str], recursive: bool, on_change: Callable[[set[str]], None],
                 delay_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self.recursive = recursive
        self.on_change = on_change
        self.delay_s = delay_s
        self.loop = loop
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory
        # (watch descriptor, name) -> path, for the names events keep reporting (a busy file's
        # every cycle); emptied whenever ``dirs`` changes.
        self._paths: dict[tuple[int, bytes], str] = {}
        self._warned = False
        # A directory that could not be watched: its changes are not all reported.
        self.lost = False
        self._pending: asyncio.TimerHandle | None = None
        self.overflows = 0  # queue overflows seen (each costs a rescan)
        # Events are read into this one buffer: ``os.read(fd, 256 KiB)`` allocated 256 KiB afresh
        # at every drain (an mmap, a first touch of its pages, an mremap and an munmap each time:
        # on a typical node a third of the agent's Python time went to that one line).
        self._buf = bytearray(READ_BYTES)
        self._view = memoryview(self._buf)
        fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        for root in roots:
            self.add_tree(root)
        loop.add_reader(fd, self._readable)

    def add_tree(self, root: str) -> None:
        """Watch ``root`` and, when recursive, every directory below it."""
        self._add(root)
        if not self.recursive:
            return
        for top, dirs, _ in os.walk(root, onerror=lambda exc: None):
            for d in dirs:
                self._add(os.path.join(top, d))

    def _add(self, directory: str) -> None:
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(directory), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return  # gone meanwhile: the rescan sees that
            self.lost = True
            if not self._warned:  # the watch limit (ENOSPC), a directory we may not read
                self._warned = True
                log.warning("cannot watch %s (%s); changes there are found by the periodic rescan "
                            "(fs.inotify.max_user_watches?)", directory, os.strerror(err))
            return
        self.dirs[wd] = directory
        self._paths.clear()  # the same directory under another name keeps its descriptor

    def _readable(self) -> None:
        # Something changed: read it all once the budget has passed, not event by event.
        self.loop.remove_reader(self.fd)
        self._pending = self.loop.call_later(self.delay_s, self._drain)

    def _drain(self) -> None:
        self._pending = None
        paths: set[str] = set()
        new_dirs: list[str] = []
        view = self._view
        got = False
        while True:
            try:
                n = os.readv(self.fd, (view,))
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("reading inotify events failed (%s); rescanning", exc)
                paths.add(RESCAN)
                break
            got = True
            self._parse(view[:n].tobytes(), paths, new_dirs)
            if n < READ_BYTES - 1024:
                break  # took all there was (a read that filled the buffer may have left more)
        for directory in new_dirs:
            self.add_tree(directory)
        if self.fd >= 0:
            if got:
                # Busy: look again after the budget without waiting for readiness. A writer
                # that writes every few ms makes the descriptor readable again at once, and the
                # wake-up, remove_reader and add_reader that cost came every cycle.
                self._pending = self.loop.call_later(self.delay_s, self._drain)
            else:
                self.loop.add_reader(self.fd, self._readable)  # quiet again: wait for an event
        if paths:
            self.on_change(paths)

    def _parse(self, data: bytes, paths: set[str], new_dirs: list[str]) -> None:
        # A busy cycle holds an event per write: names are decoded once per file, not per event.
        pos, size, unpack = 0, _EVENT.size, _EVENT.unpack_from
        seen: set[tuple[int, bytes]] = set()
        while pos + size <= len(data):
            wd, mask, _, length = unpack(data, pos)
            name = data[pos + size: pos + size + length].rstrip(b"\0")
            pos += size + length
            if mask & (IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_ISDIR) or not name:
                self._special(wd, mask, name, paths, new_dirs)
            else:
                seen.add((wd, name))
        known = self._paths
        for key in seen:
            path = known.get(key)
            if path is None:
                directory = self.dirs.get(key[0])
                if directory is None:
                    continue
                if len(known) >= MAX_KNOWN_PATHS:
                    known.clear()
                path = known[key] = os.path.join(directory, os.fsdecode(key[1]))
            paths.add(path)

    def _special(self, wd: int, mask: int, name: bytes, paths: set[str], new_dirs: list[str]) -> None:
        """An event about the watching itself or a directory: they all call for a rescan."""
        if mask & IN_Q_OVERFLOW:
            paths.add(RESCAN)  # events were lost: only a rescan knows what changed
            self.overflows += 1
            if self.overflows == 1 or self.overflows % 1000 == 0:
                # Nothing is lost (the rescan finds every change) but files are found later:
                # said once, then every thousandth (fluent-bit #2197 asked for it to be said).
                log.info("the inotify queue overflowed (%d times so far; fs.inotify.max_queued_events"
                         " is %s): rescanning to find what changed", self.overflows, _max_queued())
            return
        directory = self.dirs.get(wd)
        if directory is None:
            return
        if mask & IN_IGNORED:
            del self.dirs[wd]  # the directory is gone (or its file system unmounted)
            self._paths.clear()
            paths.add(RESCAN)
        elif mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            paths.add(RESCAN)
        elif name and mask & IN_ISDIR:
            path = os.path.join(directory, os.fsdecode(name))
            paths.add(RESCAN)  # a directory came or went: its files are for the rescan
            if self.recursive and mask & (IN_CREATE | IN_MOVED_TO):
                new_dirs.append(path)

    def stop(self) -> None:
        if self.fd < 0:
            return
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        with contextlib.suppress(RuntimeError):  # a loop already closed has no reader left
            self.loop.remove_reader(self.fd)
        os.close(self.fd)  # the kernel drops every watch with it
        self.fd = -1
        self.dirs.clear()
        self._paths.clear()


def _max_queued() -> str:
    try:
        with open("/proc/sys/fs/inotify/max_queued_events") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"
