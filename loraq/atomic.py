"""Write-then-rename outputs, so a crash or an error never leaves a half-written file behind;
what an input may be (a regular file, never an output); leftovers of killed runs.

An output is written to `.<name>.tmp-<pid>` beside it, fsync'd, renamed into place and the folder
fsync'd. An error or a signal (the CLI turns SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt)
removes the temporary; only `kill -9` or a power cut can leave one, and `stale_temps` finds those:
their pid is gone, or belongs to a process that is not loraq. Scratch folders in the system's
temporary folder (`loraq-<pid>-*`, see scratch_dir) are found the same way by `stale_scratch`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .errors import BadArguments, BadInput, IOFailure

TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)$")
SCRATCH_RE = re.compile(r"^loraq-(?P<pid>[0-9]+)-[A-Za-z0-9_]+$")


def io_error(exc: OSError, path: Path | str, doing: str) -> IOFailure:
    """A one-line IOFailure for an OSError, naming the file and the likely fix."""
    reason = {
        errno.ENOSPC: "the disk is full; free some space and run again",
        errno.EDQUOT: "the disk quota is exhausted; free some space and run again",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "permission denied; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.EEXIST: "a file is in the way where a folder is needed; choose another path",
        errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return IOFailure(f"cannot {doing} {path}: {reason}")


class InputChanged(BadInput):
    """An input was replaced or rewritten while a stage read it (exit 4); its outputs are dropped."""

    def __init__(self, path: Path | str, doing: str = "it was being read"):
        super().__init__(f"{path} changed while {doing}; run again")
        self.path = Path(path)
        self.doing = doing

    def __reduce__(self) -> tuple[type[InputChanged], tuple[Path, str]]:  # raised in worker processes too
        return InputChanged, (self.path, self.doing)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_readable(path: Path | str, what: str = "input") -> Path:
    """The path, or a BadArguments saying the input file is missing or not a regular file (exit 2).

    Only stat is used: opening a FIFO or a device to find out would block."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise BadArguments(f"{what} not found: {p}") from None
    except OSError as exc:
        raise io_error(exc, p, "read") from exc
    if stat.S_ISDIR(st.st_mode):
        raise BadArguments(f"{what} is not a file: {p} is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise BadArguments(f"{what} {p} is not a regular file ({_kind(st.st_mode)}); give a file")
    return p


def check_regular(path: Path | str, what: str = "input") -> None:
    """A file input must be a regular file; a folder input may hold only regular files and folders
    (hidden entries aside), so reading or hashing it can never block on a FIFO or a device.
    A missing path passes: whoever opens it reports it."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise io_error(exc, p, "read") from exc
    if stat.S_ISDIR(st.st_mode):
        try:
            entries = sorted(os.scandir(p), key=lambda e: e.name)
        except OSError as exc:
            raise io_error(exc, p, "read") from exc
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                mode = e.stat().st_mode
            except FileNotFoundError:
                continue  # a dangling symlink: nothing to block on
            except OSError as exc:
                raise io_error(exc, e.path, "read") from exc
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BadArguments(f"{what} {p} holds {e.name}, which is not a regular file ({_kind(mode)}); remove it")
    elif not stat.S_ISREG(st.st_mode):
        raise BadArguments(f"{what} {p} is not a regular file ({_kind(st.st_mode)}); give a file")


def _files_of(p: Path) -> list[Path]:
    """A file itself, or a folder's files (not recursive: inputs are flat folders)."""
    if p.is_dir():
        with contextlib.suppress(OSError):
            return [c for c in p.iterdir() if c.is_file()]
        return []
    return [p]


def check_not_input(output: Path | str, inputs: Mapping[str, Path | str] | Iterable[tuple[str, Path | str]]) -> None:
    """Refuse (BadArguments, exit 2) an output that is an input: the same path once symlinks are
    resolved, the same file under another name (a hard link: same st_dev and st_ino), or a path
    inside an input folder. `inputs`: (label such as "base model", path) pairs, or a dict of them."""
    labelled = list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)
    out = Path(output)
    out_res = out.resolve()
    try:
        out_st: os.stat_result | None = os.stat(out)
    except OSError:
        out_st = None
    for label, inp in labelled:
        ip = Path(inp)
        in_res = ip.resolve()
        if out_res == in_res:
            raise BadArguments(f"the output {out} is the {label} {ip}; write the output to a different file")
        if in_res in out_res.parents:
            raise BadArguments(f"the output {out} is inside the {label} folder {ip}; write the output to a different folder")
        if out_st is None:
            continue
        for f in _files_of(ip):
            try:
                st = os.stat(f)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (out_st.st_dev, out_st.st_ino):
                raise BadArguments(
                    f"the output {out} is the same file as the {label} {f} (a hard link); write the output to a different file"
                )


def file_identity(fd_or_path: int | Path | str) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, size, mtime_ns): what was opened, to tell whether it was replaced or rewritten."""
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def pid_in_use(pid: int) -> bool:
    """Whether `pid` is a live process that may still own its temporaries. Any live process counts,
    not only one named loraq: a script or test importing loraq owns its scratch folders too, and a
    recycled pid only keeps a leftover until it exits (safer than removing a live file)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return True
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # exited between the checks
    return state != "Z"


def _orphans(folder: Path | str, pattern: re.Pattern[str]) -> Iterator[tuple[Path, re.Match[str]]]:
    """Entries of `folder` whose name `pattern` matches and whose `pid` group is no live loraq process."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return
    for e in entries:
        m = pattern.match(e)
        if m and not pid_in_use(int(m["pid"])):
            yield Path(folder) / e, m


def stale_temps(folder: Path | str, name: str | None = None) -> list[Path]:
    """Temporaries `.<name>.tmp-<pid>` in `folder` (files, or folders such as dist/'s) whose writer is gone (see pid_in_use)."""
    return [p for p, m in _orphans(folder, TEMP_RE) if name is None or m["name"] == name]


def fsync_dir(folder: Path | str) -> None:
    """Make a rename in `folder` durable; file systems that cannot fsync a folder are skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS, errno.EBADF, errno.EACCES):
            raise io_error(exc, folder, "write") from exc
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Best effort (Linux): start writing [offset, offset + nbytes) of an output to disk now,
    without waiting (sync_file_range SYNC_FILE_RANGE_WRITE), so that the fsync before its rename
    has little left to do. A 271 MB Q8_0 file's fsync took 0.6-0.9 s at the end of a 2 s quantize
    on a 2-core AVX2 EPYC, while the disk had sat idle during the computing; the pages stay cached
    for the next stage (unlike POSIX_FADV_DONTNEED's writeback). Durability is still the fsync's
    job: this only moves the disk's work earlier."""
    fn = _sync_file_range()
    if fn is not None and nbytes > 0:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # an error (EINVAL on some file systems) is left to the fsync


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    The temporary file lives in the same folder so the rename is atomic on POSIX; it is fsync'd
    before the rename and the folder after. Any failure, KeyboardInterrupt included, removes it
    and leaves a previous `final` untouched. Leftovers of `final` from killed runs are removed."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, final.parent, "create folder") from exc
    for old in stale_temps(final.parent, final.name):
        _remove_quietly(old)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except OSError as exc:
        _remove_quietly(tmp)
        raise io_error(exc, final, "write") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(final.parent)


def _remove_quietly(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private folder in the system's temporary folder, removed on exit. Its name carries our pid
    so that, if this process is killed (-9) first, the next run or status finds it (stale_scratch)."""
    with tempfile.TemporaryDirectory(prefix=f"loraq-{os.getpid()}-") as d:
        yield Path(d)


def stale_scratch() -> list[Path]:
    """This user's scratch folders whose process is gone (see pid_in_use)."""
    out = []
    for p, _ in _orphans(tempfile.gettempdir(), SCRATCH_RE):
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                out.append(p)
    return out


def leftover_size(p: Path) -> int:
    """Bytes held by a leftover temporary file or scratch folder."""
    try:
        if not p.is_dir() or p.is_symlink():
            return p.lstat().st_size
        return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    except OSError:
        return 0


def remove_leftover(p: Path) -> None:
    """Remove a leftover temporary file or scratch folder; OSError if it cannot be removed."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
