"""An exclusive lock on a daemon's directory, so two daemons never share one.

Two aggregators on one ``state_dir`` would each replay the journal and cut the other's files
back; two agents on one ``state_dir`` would overwrite each other's checkpoints. Each daemon
``flock``s the directory itself (``LOCK_EX | LOCK_NB`` on a descriptor of the directory) before it
reads or repairs anything, and holds it until it exits. Nothing is written into the directory
(the output directory holds only topics), and the kernel drops the lock when the process dies,
kill -9 included, so nothing stale can block a restart. Who holds it is read from /proc/locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


class DirectoryInUse(Exception):
    """Another live process holds the directory's lock."""

    def __init__(self, what: str, directory: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{what} {directory} is in use by {holder}; two daemons on one directory "
                         "would undo each other's work: stop it, or give this one its own directory")
        self.directory = directory
        self.pid = pid


def lock_holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the file ``st`` describes, from /proc/locks (Linux), or None.

    Lines look like ``1: FLOCK  ADVISORY  WRITE 18197 fe:00:260072 0 EOF``: the device as hex
    major:minor, then the inode (proc(5), /proc/locks)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


class DirectoryLock:
    """Hold an exclusive flock on ``directory`` for this process's lifetime.

    ``acquire()`` raises :class:`DirectoryInUse` (naming the directory and the holder's pid) when
    another process holds it, and ``OSError`` when the directory cannot be opened.
    """

    def __init__(self, directory: str, what: str) -> None:
        self.directory = os.path.abspath(directory)
        self.what = what  # the config key, for the message: "aggregator.state_dir"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = lock_holder(os.fstat(fd))
            os.close(fd)
            raise DirectoryInUse(self.what, self.directory, pid) from None
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def same_directory_as(self, other: DirectoryLock) -> bool:
        """Both name one directory (by device and inode: a bind mount or a symlink is the same)."""
        try:
            return os.path.samefile(self.directory, other.directory)
        except OSError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
