"""Write-then-rename outputs, so a crash or an error never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import BadArguments, IOFailure


def io_error(exc: OSError, path: Path | str, doing: str) -> IOFailure:
    """A one-line IOFailure for an OSError, naming the file and the likely fix."""
    reason = {
        errno.ENOSPC: "the disk is full; free some space and run again",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "permission denied; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.EEXIST: "a file is in the way where a folder is needed; choose another path",
        errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return IOFailure(f"cannot {doing} {path}: {reason}")


def check_readable(path: Path | str, what: str = "input") -> Path:
    """The path, or a BadArguments saying the input file is missing (exit 2)."""
    p = Path(path)
    if not p.exists():
        raise BadArguments(f"{what} not found: {p}")
    if not p.is_file():
        raise BadArguments(f"{what} is not a file: {p}")
    return p


@contextlib.contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    The temporary file lives in the same folder so the rename is atomic on POSIX; any failure
    removes it and leaves a previous `final` untouched."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, final.parent, "create folder") from exc
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        _remove_quietly(tmp)
        raise io_error(exc, final, "write") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()
