"""Process plumbing both daemons share: the event loop, logging, signals, systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import zmq

log = logging.getLogger("fleetlog")


class OneLineFormatter(logging.Formatter):
    """One event, one line: a traceback's newlines are escaped so journald keeps it whole."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def setup_logging(level: str = "info") -> None:
    """One event per line on stderr; journald adds time and unit, so we only add level+logger."""
    handler = logging.StreamHandler(sys.stderr)
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler.setFormatter(OneLineFormatter(stamp + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchfiles reports every batch of changes at INFO: that is our debug detail, not an event.
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, root.level))


def run(main: Coroutine[Any, Any, int], loop: str = "uvloop") -> int:
    """Run ``main`` on the chosen loop: ``uvloop`` (the aggregator's and the writer's default) or
    the stdlib ``asyncio`` (the agent's default: 6 MiB less memory for a little more CPU, see
    README.md, "An agent's memory")."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
            log.warning("uvloop is not installed; using the stdlib event loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


# Helper threads (ZeroMQ's I/O thread, the file watcher and the thread watchfiles starts) run as
# SCHED_BATCH: a woken SCHED_BATCH thread does not preempt the event loop in the middle of its
# pass, it runs when a core is free. The I/O thread then sends a pass's batches with one wake-up
# instead of one per batch. Live load (8 files written every 10 ms): the agent's main thread went
# from 715 to 0.2 involuntary context switches a second, its I/O thread from 748 to 106 wake-ups,
# and agent + aggregator from 2.40 to 2.15 CPU s per million lines (medians of 5).
def background_thread() -> bool:
    """Make the calling thread, and the threads it starts from now on, SCHED_BATCH (Linux).
    False if it stays as it was (not Linux, not allowed here, or another policy already)."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


@contextlib.contextmanager
def starting_background_threads() -> Iterator[None]:
    """Threads started inside inherit SCHED_BATCH; the calling thread gets its policy back."""
    changed = background_thread()
    try:
        yield
    finally:
        if changed:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def start_zmq_threads(ctx: zmq.Context[Any]) -> None:
    """ZeroMQ starts a context's I/O thread with its first socket: make one, as SCHED_BATCH."""
    with starting_background_threads():
        ctx.socket(zmq.PAIR).close(linger=0)


class Wakeup:
    """An event with one waiter and a timeout, for the hot loops.

    ``asyncio.wait_for(event.wait(), timeout)`` creates a task, a future and a timer on every
    wait; a loop that waits a hundred times a second spends more on that than on its work. Here a
    wait is one future and one timer. ``set()`` may be called from any callback on the loop.
    """

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[bool] | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def clear(self) -> None:
        self._flag = False

    async def wait(self, timeout: float | None) -> bool:
        """Until set (True) or ``timeout`` seconds pass (False); None: until set."""
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(max(0.0, timeout), _expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def install_signals(on_stop: Callable[[], None], on_reload: Callable[[], None]) -> None:
    """SIGTERM/SIGINT ask for a graceful stop (a second one quits now); SIGHUP reloads.

    Handlers only translate signals into the same calls the control plane makes.
    """
    loop = asyncio.get_running_loop()
    stops = 0

    def stop() -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            log.warning("second stop signal: quitting now")
            os._exit(1)
        on_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)


class SystemdNotifier:
    """The sd_notify datagram protocol (READY=1, STATUS=, WATCHDOG=1, STOPPING=1).

    A no-op when not started by systemd (no NOTIFY_SOCKET).
    """

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() and (
            not pid or pid == str(os.getpid())) else None
        self._sock: socket.socket | None = None

    def notify(self, *states: str) -> None:
        if not self.address:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(states).encode(), address)
        except OSError as exc:
            log.warning("systemd notify to %s failed: %s", self.address, exc)

    async def watchdog(self) -> None:
        """Send WATCHDOG=1 at half the interval systemd asked for, while the loop is alive."""
        if not self.watchdog_s:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# Names of the tasks that failed in this process: the daemon then exits non-zero, so that
# systemd's Restart=on-failure starts it again.
failed_tasks: list[str] = []


def supervise(tasks: list[asyncio.Task[Any]], on_crash: Callable[[], None]) -> None:
    """A task of a daemon that ends with an exception is a bug: log it with its traceback and
    stop the daemon cleanly, exiting non-zero (systemd restarts it), rather than limp on without
    that task."""

    def done(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("task %s failed; stopping", task.get_name(), exc_info=exc)
            failed_tasks.append(task.get_name())
            on_crash()

    for task in tasks:
        task.add_done_callback(done)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``; elsewhere
    nothing). Start-up frees what reading the config, the checkpoints and the first scan used,
    but glibc keeps free pages inside its heap: trimming them once there took 1.3 MiB off an idle
    agent's RSS (26.7 -> 25.3 MiB, 8 quiet files)."""
    import ctypes  # loaded already in both daemons (agent/inotify.py, fleetlog/durable.py)

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (as the Go runtime and nginx
    do); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
