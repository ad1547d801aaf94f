"""One run per workdir: `workdir/.loraq.lock`, an flock held for the whole run.

The lock file holds the pid of the run that holds it (for messages only: the flock is the lock, so
a killed run never leaves a stale lock). The holder removes the file when it is done; a run that
locked a file that was removed meanwhile retries on the new one, so two runs never hold two
different files. Where flock does not exist (Windows), runs are not locked."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..atomic import io_error
from ..errors import BadArguments

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK = ".loraq.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _try_lock(fd: int, how: int) -> bool:
    assert fcntl is not None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        raise
    return True


def _open(path: Path) -> int | None:
    """The lock file, created if need be; None where the workdir cannot hold one (read-only or
    not ours): then no run can write there either, and the first write reports why."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise io_error(exc, path, "create the lock file") from exc
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


@contextlib.contextmanager
def workdir_lock(workdir: Path, wait: bool = True, on_wait: Callable[[int | None], None] | None = None) -> Iterator[None]:
    """Hold the workdir's lock for the block. Another run holding it: wait for it (telling
    `on_wait` its pid once), or with wait=False raise BadArguments (exit 2)."""
    if fcntl is None:
        yield
        return
    path = workdir / LOCK
    fd = _acquire(path, workdir, wait, on_wait)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # the pid is for messages only; a read-only lock file keeps none
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a waiting run then retries on a new file
        os.close(fd)  # releases the flock


def _acquire(path: Path, workdir: Path, wait: bool, on_wait: Callable[[int | None], None] | None) -> int | None:
    assert fcntl is not None
    told = False
    while True:
        fd = _open(path)
        if fd is None:
            return None
        try:
            # A brief retry first: `loraq status` takes the lock shared for an instant to test it.
            deadline = time.monotonic() + 0.3
            while not _try_lock(fd, fcntl.LOCK_EX):
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                pid = _holder_pid(fd)
                if not wait:
                    who = f" (pid {pid})" if pid else ""
                    raise BadArguments(f"another loraq run{who} is using {workdir}; wait for it to finish, or run without --no-wait")
                if on_wait and not told:
                    on_wait(pid)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            try:
                st, now = os.fstat(fd), os.stat(path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    return fd
            except FileNotFoundError:
                pass  # the previous holder removed it as we locked it: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def running_pid(workdir: Path) -> int | None:
    """The pid of a run holding the workdir's lock (0 when its pid is unknown), or None when no
    run holds it. Takes the lock shared for an instant only; never waits."""
    if fcntl is None:
        return None
    try:
        fd = os.open(workdir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _holder_pid(fd) or 0
    finally:
        os.close(fd)
