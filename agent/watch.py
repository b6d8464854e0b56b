"""Finding files: glob expansion for the periodic rescan, and inotify for prompt wake-ups.

The agent watches with inotify on its event loop (agent/inotify.py: no thread, one wake-up per
read cycle, none while idle). With ``force_polling``, or where inotify cannot be set up, it uses
watchfiles as described below.

Events only tell the agent *where to look sooner*; the periodic rescan is what guarantees that
nothing is missed (an inotify queue overflow, a network filesystem that sends no events, a
directory that appeared later). ``force_polling`` makes watchfiles poll instead of using inotify.

watchfiles' Rust watcher (``RustNotify``, its documented backend) is asked for changes in a thread
of its own, which hands each set to the event loop with ``call_soon_threadsafe``. ``awatch()``
would do the same through an anyio worker thread per hand-over (a capacity limiter, a cancel
scope and a future each time); under a steady 20,000 lines/s that hand-over was a fifth of the
agent's CPU. The watcher sleeps in steps, taking the GIL after each: ``watch_step_ms`` (3) while
files change, ``watch_idle_step_ms`` (20) after a second without a change, which keeps the same
``RustNotify`` (its inotify thread collects events all along, so none is lost in between).

``latency_budget_ms`` sets both steps by default: RustNotify hands changes over at the first step
that adds no new file to them, or at the first step after its debounce; with steps of half the
budget and no debounce of its own, that is at most two steps (the budget) after the first change,
so under steady writes one hand-over (and so one read cycle, see agent/daemon.py) comes every
budget, and a line waits half of it on average.
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator

from agent.config import COMPRESSED_SUFFIXES, AgentConfig, SourceConfig, glob_root
from agent.inotify import InotifyWatcher
from fleetlog.runtime import background_thread

log = logging.getLogger("fleetlog.agent.watch")

# A read cycle holding this much is a busy node's (see Watcher.pace): at 20,000 lines/s of 100
# bytes a 40 ms wait gathers 80 KB; a typical node (500 lines/s) 2 KB.
BUSY_CYCLE_BYTES = 16 * 1024

IDLE_AFTER_MS = 1000  # without a change for this long, the watcher steps watch_idle_step_ms


def expand(source: SourceConfig, matched: dict[str, int] | None = None,
           skipped: dict[str, str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files matching the source's globs, minus excludes and compressed files.
    ``matched`` counts what each glob matched (before excludes), for globs that match nothing;
    ``skipped`` gets each match that is not a log file to follow (see ``not_a_log``) and what it
    is."""
    seen: set[str] = set()
    for pattern in source.paths:
        for path in glob.iglob(pattern, recursive=True):
            if matched is not None:
                matched[pattern] = matched.get(pattern, 0) + 1
            if path in seen:
                continue
            seen.add(path)
            if not source.include_compressed and path.endswith(COMPRESSED_SUFFIXES):
                continue
            if any(fnmatch.fnmatch(path, ex) or fnmatch.fnmatch(os.path.basename(path), ex)
                   for ex in source.exclude):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (what := not_a_log(path, st)) is None:
                yield path, st
            elif skipped is not None:
                skipped[path] = what


# Filesystems whose files the kernel makes up at each read (a size of 0 or of one page, content
# replaced rather than appended, an lseek to the end that fails with EINVAL): never a log to follow.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "configfs", "pstore",
    "bpf", "efivarfs", "fusectl", "devpts", "binfmt_misc", "rpc_pipefs", "nsfs", "selinuxfs",
})


class FilesystemTypes:
    """Device number -> the type of the filesystem mounted there, from /proc/self/mountinfo,
    read again only when a device it did not list turns up (a new mount); a device it still
    does not list (btrfs subvolumes have device numbers of their own) is taken for an ordinary
    filesystem, once."""

    def __init__(self) -> None:
        self.types: dict[int, str] = {}

    def pseudo(self, dev: int) -> str | None:
        """The filesystem type if ``dev`` is a pseudo-filesystem's (``PSEUDO_FILESYSTEMS``)."""
        kind = self.types.get(dev)
        if kind is None:
            self._load()
            kind = self.types.setdefault(dev, "")
        return kind if kind in PSEUDO_FILESYSTEMS else None

    def _load(self) -> None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            return
        for line in text.splitlines():
            fields = line.split()
            try:
                major, minor = fields[2].split(":")
                kind = fields[fields.index("-") + 1]
                dev = os.makedev(int(major), int(minor))
            except (ValueError, IndexError):
                continue
            self.types[dev] = kind


PSEUDO_DEVICES = FilesystemTypes()

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def not_a_log(path: str, st: os.stat_result) -> str | None:
    """What the glob match ``path`` (``st``: its stat, through symlinks) is if it is not a log
    file the agent can follow, else None: a FIFO, a socket or a device (nothing to read at an
    offset, and an open of a FIFO waits for a writer), a directory, or a file of a
    pseudo-filesystem such as /proc."""
    if stat.S_ISREG(st.st_mode):
        fs = PSEUDO_DEVICES.pseudo(st.st_dev)
        if fs is None:
            return None  # the common case: a plain file
        what = (f"a file of the {fs} pseudo-filesystem (the kernel makes its content up at each "
                "read; it has no size and does not grow like a log)")
    else:
        what = next((text for test, text in _KINDS if test(st.st_mode)), "not a regular file")
    if os.path.islink(path):
        what += f", through a symlink to {os.path.realpath(path)}"
    return what


def watch_steps(cfg: AgentConfig) -> tuple[int, int]:
    """The watcher's step while files change and its debounce, in ms: the settings, or where
    they are 0, from latency_budget_ms (see the module's docstring)."""
    step = cfg.watch_step_ms or max(1, cfg.latency_budget_ms // 2)
    debounce = cfg.watch_debounce_ms if cfg.watch_step_ms or cfg.watch_debounce_ms else 0
    return step, debounce


class Watcher:
    """Runs watchfiles over the sources' root directories and reports changed paths."""

    def __init__(self, sources: tuple[SourceConfig, ...], on_change: Callable[[set[str]], None],
                 cfg: AgentConfig) -> None:
        self.sources = sources
        self.on_change = on_change
        self.cfg = cfg
        self.roots: list[str] = []
        # Each root's (device, inode) when watched: a directory deleted and created again has
        # another, and the old watch sees nothing of it.
        self.root_ids: list[tuple[int, int]] = []
        self.recursive = any("**" in p for s in sources for p in s.paths) or any(
            glob.has_magic(os.path.dirname(p)) for s in sources for p in s.paths)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify: InotifyWatcher | None = None
        # The roots (and their identities) watching last failed on: not tried again, nor said
        # again, until they change (a name watchfiles cannot decode fails it at every try).
        self._gave_up: tuple[list[str], list[tuple[int, int]]] | None = None

    def pace(self, bytes_per_s: float) -> float:
        """How long inotify waits after a first change before the agent reads (seconds), for
        files growing by ``bytes_per_s`` together: the whole latency budget while a wait
        gathers at most ``BUSY_CYCLE_BYTES`` (a typical node: every wake-up saved is CPU saved),
        shorter when it would gather more (a busy node: its cycles are large anyway, so shorter
        waits keep the latency low at little cost per line), down to an eighth of the budget.
        Returns the delay now in force."""
        budget = self.cfg.latency_budget_ms / 1000
        delay = budget if bytes_per_s * budget <= BUSY_CYCLE_BYTES else \
            max(budget / 8, BUSY_CYCLE_BYTES / bytes_per_s)
        if self._inotify is not None:
            self._inotify.delay_s = delay
        return delay

    @property
    def delay_s(self) -> float:
        """The wait after a first change in force now (seconds); the budget when polling."""
        if self._inotify is not None:
            return self._inotify.delay_s
        return self.cfg.latency_budget_ms / 1000

    @property
    def reports_every_change(self) -> bool:
        """Whether inotify watches (and would say if it lost events): not polling."""
        return self._inotify is not None and not self._inotify.lost

    def wanted_roots(self, extra: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """The directories to watch: each glob's fixed part, and ``extra`` (where symlinked
        files really are). A root inside another is dropped only when watching recursively:
        ``/var/log/syslog`` and ``/var/log/nginx/*.log`` need both directories watched."""
        roots = {glob_root(p) for s in self.sources for p in s.paths} | set(extra)
        existing = {r for r in roots if os.path.isdir(r)}
        if not self.recursive:
            return sorted(existing)
        return sorted(r for r in existing
                      if not any(r != o and r.startswith(o.rstrip(os.sep) + os.sep) for o in existing))

    def refresh(self, extra: set[str] | frozenset[str] = frozenset()) -> None:
        """Start, or restart when the set of existing roots changed (a log dir was created, or
        deleted and created again)."""
        roots = self.wanted_roots(extra)
        ids = []
        for root in roots:
            try:
                st = os.stat(root)
            except OSError:
                continue
            ids.append((st.st_dev, st.st_ino))
        if roots == self.roots and ids == self.root_ids and (
                self._inotify is not None or (self._thread is not None and self._thread.is_alive())
                or self._gave_up == (roots, ids)):
            return  # watching already, or watching these roots failed: the rescan finds changes
        self.stop()
        self.roots, self.root_ids = roots, ids
        if roots and not self.cfg.force_polling:
            try:
                self._inotify = InotifyWatcher(roots, self.recursive, self.on_change,
                                               self.cfg.latency_budget_ms / 1000, asyncio.get_running_loop())
                return
            except OSError as exc:
                log.warning("inotify is not available (%s); watching with watchfiles' thread instead", exc)
        if roots:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(roots, self._stop, asyncio.get_running_loop()),
                name="fleetlog-watch", daemon=True)
            self._thread.start()

    def _run(self, roots: list[str], stop: threading.Event, loop: asyncio.AbstractEventLoop) -> None:
        background_thread()  # and so the thread watchfiles starts to read inotify
        recursive = self.recursive
        cfg = self.cfg
        try:
            # Imported only here: watchfiles' package brings anyio with it (3 MB of an agent's
            # RSS that watches with inotify).
            from watchfiles._rust_notify import RustNotify
            with RustNotify(roots, False, cfg.force_polling, 100, recursive, True) as notify:
                busy_step, debounce = watch_steps(cfg)
                step, timeout = busy_step, IDLE_AFTER_MS
                while True:
                    changes = notify.watch(debounce, step, timeout, stop)
                    if changes == "timeout":
                        step, timeout = cfg.watch_idle_step_ms, 0  # quiet: look less often
                        continue
                    if isinstance(changes, str) or stop.is_set():
                        return  # "stop" (or "signal", which only the main thread receives)
                    step, timeout = busy_step, IDLE_AFTER_MS
                    loop.call_soon_threadsafe(self.on_change, {path for _, path in changes})
        except (OSError, RuntimeError, TypeError) as exc:  # TypeError: a RustNotify we do not know
            if stop.is_set() or loop.is_closed():
                return
            # The rescan still finds everything; only wake-ups are slower.
            self._gave_up = (list(self.roots), list(self.root_ids))
            log.warning("file watching on %s stopped (%s); relying on the periodic rescan until the "
                        "watched directories change", roots, exc)

    def stop(self) -> None:
        """Stop watching (a thread notices within one watch step)."""
        if self._inotify is not None:
            self._inotify.stop()
            self._inotify = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
