"""An exclusive lock on a daemon's directory, so two daemons never share one.

Two aggregators on one ``state_dir`` would each replay the journal and cut the other's files
back; two agents on one ``state_dir`` would overwrite each other's checkpoints. Each daemon takes
``<dir>/.fleetlog.lock`` with ``flock(LOCK_EX | LOCK_NB)`` before it reads or repairs anything,
and holds it until it exits. The kernel drops the lock when the process dies, kill -9 included,
so a stale lock file never blocks a restart. The file holds the holder's pid, for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

LOCK_NAME = ".fleetlog.lock"


class DirectoryInUse(Exception):
    """Another live process holds the directory's lock."""

    def __init__(self, what: str, directory: str, pid: str) -> None:
        holder = f"pid {pid}" if pid else "another process (pid unknown)"
        super().__init__(f"{what} {directory} is in use by {holder}; two daemons on one directory "
                         "would undo each other's work: stop it, or give this one its own directory")
        self.directory = directory
        self.pid = pid


class DirectoryLock:
    """Hold ``<directory>/.fleetlog.lock`` for this process's lifetime.

    ``acquire()`` raises :class:`DirectoryInUse` (naming the directory and the holder's pid) when
    another process holds it, and ``OSError`` when the file cannot be created.
    """

    def __init__(self, directory: str, what: str) -> None:
        self.directory = os.path.abspath(directory)
        self.what = what  # the config key, for the message: "aggregator.state_dir"
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DirectoryInUse(self.what, self.directory, pid) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing drops the flock; the file stays for the next holder
            self.fd = None
