"""Quantize a GGUF model file the way llama-quantize does (docs/llama-cpp.md §4.7, §4.8).

Tensors are processed one at a time in llama.cpp's iteration order and streamed to the output in
row chunks, so memory follows the largest chunk rather than the model."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from gguf import GGUFValueType

from ..atomic import InputChanged, check_not_input, file_identity, io_error
from ..errors import BadArguments, BadInput, IOFailure
from ..ggml_types import FileType, GGMLType, file_type, ggml_type
from ..gguf_io import GGUFFile, KVList, open_gguf
from ..gguf_io.reader import read_exact, read_into
from ..gguf_io.writer import GGUFStreamWriter, OutTensor
from ..kernels import can_quantize, dequantize, quantize
from ..kernels.jit import available as jit_available
from ..kernels.jit import f16_to_f32
from ..kernels.legacy import q4_0_from_f16, q8_0_from_f16
from .rules import ModelFacts, TypeOptions, TypePlanner, category, iteration_order, requires_imatrix

CHUNK_ELEMENTS = 1 << 21  # rows per work item ≈ 2M weights: bounded temporaries
# Worker threads when the heavy kernels run compiled (numba, GIL released): no start-up, one copy
# of numba in memory, nothing pickled. Without numba, worker processes: the numpy kernels are many
# calls on ~1 MiB arrays and threads serialize on the GIL between them (1.19x on 2 threads for
# Q4_K_M). Starting processes costs about half a second, so models with less quantization work
# than this run in-process.
USE_THREADS: bool | None = None  # None: threads when numba is installed
PARALLEL_MIN_ELEMENTS = 32 << 20

# One output's part of a chunk: (target type, or None to copy the input; its imatrix slice or None)
Job = tuple[GGMLType | None, np.ndarray | None]


@dataclass
class QuantizeOptions:
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: list[tuple[str, str]] = field(default_factory=list)  # (regex, type), first match wins
    pure: bool = False
    leave_output_tensor: bool = False
    allow_requantize: bool = False
    imatrix: dict[str, np.ndarray] | None = None  # tensor name -> per-column weights (mean x²)
    threads: int = 1
    # llama-quantize's kv_overrides, set after the input's KVs in this order (each moved to the
    # end): the quantize.imatrix.* KVs (imatrix_file.quantize_kvs)
    kv_overrides: list[tuple[str, GGUFValueType, Any]] = field(default_factory=list)


class TypeSettings(Protocol):
    """The config's quantize section as the options read it (pipeline.config.QuantizeConfig)."""

    @property
    def output_tensor_type(self) -> str | None: ...
    @property
    def token_embedding_type(self) -> str | None: ...
    @property
    def tensor_types(self) -> dict[str, str]: ...
    @property
    def pure(self) -> bool: ...
    @property
    def leave_output_tensor(self) -> bool: ...


def options_from(q: TypeSettings, threads: int = 1, allow_requantize: bool = False) -> QuantizeOptions:
    """QuantizeOptions for a config's quantize section: the per-tensor type settings, as configured."""
    return QuantizeOptions(
        output_tensor_type=q.output_tensor_type,
        token_embedding_type=q.token_embedding_type,
        tensor_types=list(q.tensor_types.items()),
        pure=q.pure,
        leave_output_tensor=q.leave_output_tensor,
        allow_requantize=allow_requantize,
        threads=threads,
    )


@dataclass(frozen=True)
class PlanEntry:
    name: str
    ne: tuple[int, ...]
    src: GGMLType
    dst: GGMLType
    reason: str

    @property
    def nbytes(self) -> int:
        return OutTensor(self.name, self.ne, self.dst).nbytes


@dataclass
class QuantizeResult:
    out: Path | None
    ftype: FileType
    plan: list[PlanEntry]
    n_fallback: int

    @property
    def size_bytes(self) -> int:
        return sum(e.nbytes for e in self.plan)

    @property
    def n_weights(self) -> int:
        return sum(int(np.prod(e.ne)) for e in self.plan)

    @property
    def bpw(self) -> float:
        return 8.0 * self.size_bytes / max(1, self.n_weights)


def model_facts(src: GGUFFile) -> ModelFacts:
    n_head = src.arch_int("attention.head_count", 0) or 0
    return ModelFacts(
        arch=src.arch,
        n_layer=src.arch_int("block_count", 0) or 0,
        n_head=n_head,
        n_head_kv=src.arch_int("attention.head_count_kv", n_head) or n_head,
        n_expert=src.arch_int("expert_count", 0) or 0,
        has_output=src.has_tensor("output.weight"),
        n_attention_wv=sum(category(t.name) == "attn_v" for t in src.tensors),
    )


def _type_options(opts: QuantizeOptions) -> TypeOptions:
    return TypeOptions(
        output_tensor_type=ggml_type(opts.output_tensor_type) if opts.output_tensor_type else None,
        token_embedding_type=ggml_type(opts.token_embedding_type) if opts.token_embedding_type else None,
        tensor_types=[(p, ggml_type(t)) for p, t in opts.tensor_types],
        pure=opts.pure,
        leave_output_tensor=opts.leave_output_tensor,
        has_imatrix=opts.imatrix is not None,
    )


def plan_quantize(src: GGUFFile, ftype: FileType, opts: QuantizeOptions, dry_run: bool = False) -> tuple[list[PlanEntry], int]:
    """Each tensor's target type, in output order, and the number of shape fallbacks."""
    if src.get("split.count") is not None:
        raise BadArguments(f"{src.path} is a split model; merge the shards with llama-gguf-split first")
    planner = TypePlanner(ftype, model_facts(src), _type_options(opts))
    plan = []
    for name in iteration_order([t.name for t in src.tensors]):
        t = src.tensor(name)
        c = planner.choose(name, t.ne, t.type, t.n_dims)
        if c.quantize and c.type != t.type:
            if t.type.quantized and not opts.allow_requantize:
                raise BadArguments(
                    f"tensor {name} is already {t.type.name}: requantizing is disabled; "
                    "pass --allow-requantize (quality suffers from quantizing twice) or start from an F16/F32 file"
                )
            if not can_quantize(c.type) and not dry_run:
                raise BadArguments(f"tensor {name} needs type {c.type.name}, which loraq cannot write yet")
            if requires_imatrix(ftype, c.type, name) and opts.imatrix is None and not dry_run:
                raise BadArguments(f"{ftype.name} needs an importance matrix for {name} ({c.type.name}); pass --imatrix")
            if requires_imatrix(ftype, c.type, name) and opts.imatrix is not None and name not in opts.imatrix and not dry_run:
                raise BadInput(
                    f"the importance matrix has no entry for {name}, which {ftype.name} quantizes to {c.type.name} "
                    "(the result would be garbage); use an imatrix computed on this model, or drop --include/--exclude-weights"
                )
        plan.append(PlanEntry(name, t.ne, t.type, c.type if c.quantize else t.type, c.reason))
    return plan, planner.n_fallback


def output_kvs(src: GGUFFile, ftype: FileType, overrides: list[tuple[str, GGUFValueType, Any]] | None = None) -> KVList:
    """Input KVs in order, then quantization_version and file_type moved to the end, split keys
    removed, then the overrides (§4.8)."""
    kvs = KVList((k, kv.raw) for k, kv in src.kvs.items())
    kvs.set("general.quantization_version", GGUFValueType.UINT32, 2)
    kvs.set("general.file_type", GGUFValueType.UINT32, ftype.id)
    for k in ("split.no", "split.count", "split.tensors.count"):
        kvs.remove(k)
    for key, vtype, value in overrides or ():
        kvs.set(key, vtype, value)
    return kvs


def quantize_model(
    inp: Path | str,
    out: Path | str | None,
    ftype_name: str,
    opts: QuantizeOptions | None = None,
    dry_run: bool = False,
    on_tensor: Callable[[PlanEntry], None] | None = None,
) -> QuantizeResult:
    """Quantize `inp` to `out` as `llama-quantize inp out FTYPE` would; with dry_run, plan only."""
    opts = opts or QuantizeOptions()
    if dry_run or out is None:
        ftype = file_type(ftype_name)
        with open_gguf(inp) as src:
            plan, n_fallback = plan_quantize(src, ftype, opts, dry_run=True)
        return QuantizeResult(None, ftype, plan, n_fallback)
    return quantize_many(inp, [(ftype_name, Path(out))], opts, on_tensor)[0]


def quantize_many(
    inp: Path | str, jobs: list[tuple[str, Path]], opts: QuantizeOptions | None = None, on_tensor: Callable[[PlanEntry], None] | None = None
) -> list[QuantizeResult]:
    """Write one output per (ftype, path), reading and dequantizing each input tensor once.

    Every ftype visits tensors in the same (llama.cpp) order, so the outputs are written side by
    side, chunk by chunk; a chunk of rows is converted to float32 once and quantized per output."""
    opts = opts or QuantizeOptions()
    inp = Path(inp)
    ftypes = [file_type(f) for f, _ in jobs]
    for _, out in jobs:
        check_not_input(out, {"input": inp})
    # The input is opened once, here; its header is parsed from the same file (checked by identity)
    # and workers read through this descriptor, so a file replaced mid-run is never mixed in.
    try:
        seen = file_identity(inp)
    except OSError:
        seen = None  # open_gguf reports the missing file
    with open_gguf(inp) as src, _open_input(inp) as fd:
        ident = file_identity(fd)
        if ident != seen:
            raise InputChanged(inp, "it was being opened")
        plans = [plan_quantize(src, ft, opts) for ft in ftypes]
        with ExitStack() as stack:
            pool = _pool(stack, opts.threads, plans, _InputRef(str(inp), fd, os.getpid(), ident))
            writers = [
                stack.enter_context(
                    GGUFStreamWriter(out, output_kvs(src, ft, opts.kv_overrides), [OutTensor(e.name, e.ne, e.dst) for e in plan])
                )
                for ft, (_, out), (plan, _) in zip(ftypes, jobs, plans)
            ]
            per_tensor = [[plan[k] for plan, _ in plans] for k in range(len(plans[0][0]))]
            items = _work_items(src, fd, per_tensor, opts, pool, writers)
            for entries, first, last, parts in _in_order(items, 1 if pool is None else 4 * opts.threads):
                if first:
                    for w in writers:
                        w.begin(entries[0].name)
                for w, part in zip(writers, parts):
                    if isinstance(part, int):  # written by a worker into w's file
                        w.skip(part)
                    elif isinstance(part, np.ndarray):
                        w.append(part)
                if last:
                    for w in writers:
                        w.end()
                    if on_tensor:
                        on_tensor(entries[0])
            # Still the file that was opened, unchanged (else no output is written).
            try:
                same = file_identity(fd) == ident and file_identity(inp) == ident
            except OSError:
                same = False
            if not same:
                raise InputChanged(inp, "it was being quantized")
    return [QuantizeResult(Path(out), ft, plan, nf) for ft, (_, out), (plan, nf) in zip(ftypes, jobs, plans)]


@contextlib.contextmanager
def _open_input(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    try:
        yield fd
    finally:
        os.close(fd)


class _InputRef(NamedTuple):
    """The parent's open input, as a worker finds it: the path, the parent's descriptor and pid
    (Linux: /proc/PID/fd/FD reopens that very file), and its identity to check against."""

    path: str
    fd: int
    parent: int
    ident: tuple[int, int, int, int]


def _pool(stack: ExitStack, threads: int, plans: list[tuple[list[PlanEntry], int]], ref: _InputRef) -> Executor | None:
    work = sum(int(np.prod(e.ne)) for plan, _ in plans for e in plan if e.dst != e.src)
    if threads <= 1 or work < PARALLEL_MIN_ELEMENTS:
        return None
    if USE_THREADS if USE_THREADS is not None else jit_available():
        return stack.enter_context(_thread_guard(ThreadPoolExecutor(threads, thread_name_prefix="loraq-quantize")))
    # spawn, not fork: the parent may hold BLAS threads, which a forked child can deadlock on.
    pool = ProcessPoolExecutor(threads, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(ref,))
    return stack.enter_context(_pool_guard(pool))


@contextlib.contextmanager
def _pool_guard(pool: ProcessPoolExecutor) -> Iterator[ProcessPoolExecutor]:
    """Shut the pool down on leaving: normally, waiting for the workers; on an error or a signal,
    cancelling queued work and terminating the workers at once."""
    try:
        yield pool
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _thread_guard(pool: ThreadPoolExecutor) -> Iterator[ThreadPoolExecutor]:
    """On an error or a signal, drop the queued chunks; the running ones (one each) finish."""
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)


# A worker's input: (descriptor, path), or the reason it does not match what the parent opened.
_INPUT: tuple[int, Path] | None = None
_INPUT_PATH = Path()
_INPUT_ERROR: str | None = None
_PARENT = 0


def _init_worker(ref: _InputRef) -> None:
    """Pool initializer: die with the parent, leave Ctrl-C to the parent, open the parent's input."""
    global _INPUT, _INPUT_ERROR, _INPUT_PATH, _PARENT
    _INPUT_PATH = Path(ref.path)
    _PARENT = ref.parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles it and stops the pool
    _die_with_parent(ref.parent)
    fd = None
    for p in (f"/proc/{ref.parent}/fd/{ref.fd}", ref.path):
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            break
    if fd is None:
        _INPUT_ERROR = f"cannot open {ref.path}"
    elif file_identity(fd) != ref.ident:
        _INPUT_ERROR = "changed"
    else:
        _INPUT = (fd, Path(ref.path))


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a parent killed with SIGKILL: on Linux the kernel sends it
    SIGKILL (PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent pid."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG = 1
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)
                return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="loraq-parent-watch").start()


def _quantize_chunk(
    chunk: np.ndarray, name: str, src: GGMLType, ne0: int, jobs: list[Job], buf: Callable[[int, int], np.ndarray] | None = None
) -> list[np.ndarray]:
    """One chunk of stored rows -> one buffer per output: its blocks, or the chunk itself where
    the output keeps the input type (job type None). F16 -> q8_0 (which ignores an imatrix) and
    F16 -> q4_0 without one go straight from the fp16 bits, their finite check included;
    `buf(k, nbytes)`, when given, is where output k's blocks may go (a worker's reused buffer)."""
    x: np.ndarray | None = None
    checked = False
    out = []
    for k, (t, w) in enumerate(jobs):
        fused = _FROM_F16.get(t.name) if t is not None and src.name == "f16" and (w is None or t.name == "q8_0") else None
        if fused is not None and t is not None:
            q = fused(chunk, None if buf is None else buf(k, chunk.shape[0] * t.row_bytes(ne0)))
            if q is not None:  # else no numba, or inf/NaN, which _check_finite reports
                out.append(q)
                continue
        if not checked:
            _check_finite(name, chunk, src)
            checked = True
        if t is None:
            out.append(chunk)
            continue
        if x is None:
            x = _to_f32(chunk, src, ne0)
        out.append(quantize(x, t, w))
    return out


# Compiled kernels that quantize fp16 rows without the float32 copy (None without numba)
_FROM_F16: dict[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray | None]] = {"q8_0": q8_0_from_f16, "q4_0": q4_0_from_f16}


def _to_f32(chunk: np.ndarray, src: GGMLType, ne0: int) -> np.ndarray:
    """Stored rows -> float32 (rows, ne0). F16, the usual input, through the compiled cast when
    numba is there: numpy's float16 cast is scalar (~2.5 ns a value, a quarter of a Q8_0 run)."""
    if src.name == "f16":
        x = f16_to_f32(np.ascontiguousarray(chunk).view(np.uint16))
        if x is not None:
            return x.reshape(chunk.shape[0], ne0)
    return dequantize(chunk, src, (chunk.shape[0], ne0))


class _OutputRef(NamedTuple):
    """An output's temporary file as a worker opens it (as _InputRef: through the parent's
    descriptor, else the path) and its (st_dev, st_ino), so a worker never writes elsewhere."""

    path: str
    fd: int
    ident: tuple[int, int]


def _output_ref(w: GGUFStreamWriter, name: str) -> tuple[_OutputRef, int]:
    """(w's file for a worker, the absolute offset of tensor `name` in it)."""
    tmp, fd, offset = w.region(name)
    st = os.fstat(fd)
    return _OutputRef(str(tmp), fd, (st.st_dev, st.st_ino)), offset


_OUTPUTS: dict[_OutputRef, int] = {}  # a worker's descriptors of the outputs it writes
_READ = threading.local()  # .buf: a worker's input buffer, .out: its output buffers; reused: no page faults per chunk


def _output_fd(ref: _OutputRef) -> int:
    if _PARENT == 0:  # a thread of the process that holds the output open
        return ref.fd
    fd = _OUTPUTS.get(ref)
    if fd is not None:
        return fd
    for p in (f"/proc/{_PARENT}/fd/{ref.fd}", ref.path):
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_WRONLY)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == ref.ident:
                break
            os.close(fd)
            fd = None
    if fd is None:
        raise IOFailure(f"cannot write {ref.path}: the temporary output vanished while being written")
    _OUTPUTS[ref] = fd
    return fd


def _pwrite_all(ref: _OutputRef, buf: np.ndarray, offset: int) -> int:
    view = np.ascontiguousarray(buf).data.cast("B")
    fd = _output_fd(ref)
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as exc:
        raise io_error(exc, ref.path, "write") from exc
    return done


def _read_rows(fd: int, path: Path, offset: int, n_rows: int, row_bytes: int, name: str) -> np.ndarray:
    """read_exact into the worker's reused buffer (valid until the next call)."""
    nbytes = n_rows * row_bytes
    buf = getattr(_READ, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _READ.buf = np.empty(nbytes, np.uint8)
    read_into(fd, path, offset, buf.data[:nbytes], name)
    return buf[:nbytes].reshape(n_rows, row_bytes)


def _out_buf(k: int, nbytes: int) -> np.ndarray:
    """The worker's reused buffer for output k (valid until its next chunk)."""
    bufs: list[np.ndarray] | None = getattr(_READ, "out", None)
    if bufs is None:
        bufs = _READ.out = []
    while len(bufs) <= k:
        bufs.append(np.empty(0, np.uint8))
    if bufs[k].size < nbytes:
        bufs[k] = np.empty(nbytes, np.uint8)
    return bufs[k][:nbytes]


def _quantize_into(
    inp: tuple[int, Path] | None,
    offset: int,
    n_rows: int,
    row_bytes: int,
    name: str,
    src: GGMLType,
    ne0: int,
    jobs: list[Job],
    dests: list[tuple[_OutputRef, int]],
) -> list[int]:
    """_quantize_chunk in a pool worker, which reads its rows itself (from `inp`, the parent's open
    input, in a thread; from the input _init_worker opened, in a process) and writes each output's
    blocks into that output's file at its place: only arguments and byte counts are passed
    around. Returns the bytes written per output."""
    if inp is None:
        if _INPUT_ERROR is not None or _INPUT is None:
            raise InputChanged(_INPUT_PATH, "it was being quantized") if _INPUT_ERROR == "changed" else BadInput(str(_INPUT_ERROR))
        inp = _INPUT
    fd, path = inp
    chunk = _read_rows(fd, path, offset, n_rows, row_bytes, name)
    parts = _quantize_chunk(chunk, name, src, ne0, jobs, _out_buf)
    return [_pwrite_all(ref, part, off) for (ref, off), part in zip(dests, parts)]


class _WorkItem(NamedTuple):
    """One row chunk of one tensor: the buffers of every output, or the byte counts a worker
    wrote into them (a list, or a Future of it)."""

    entries: list[PlanEntry]  # the tensor's plan entry for each output
    first: bool  # the tensor's first chunk
    last: bool  # the tensor's last chunk
    work: list[np.ndarray] | Future[list[int]]


def _work_items(
    src: GGUFFile, fd: int, per_tensor: list[list[PlanEntry]], opts: QuantizeOptions, pool: Executor | None, writers: list[GGUFStreamWriter]
) -> Iterator[_WorkItem]:
    """A work item for every row chunk of every tensor, in file order; `fd` is src's file, opened once."""
    for entries in per_tensor:
        info = src.tensor(entries[0].name)
        if all(e.dst == e.src for e in entries):
            raw = read_exact(fd, src.path, info.offset, info.nbytes, info.name)
            _check_finite(info.name, raw, info.type)
            yield _WorkItem(entries, True, True, [raw] * len(entries))
            continue
        if info.n_elements == 0:  # gguf.cpp accepts 0-element tensors; every type stores them in 0 bytes
            yield _WorkItem(entries, True, True, [np.empty(0, np.uint8)] * len(entries))
            continue
        ne0 = info.ne[0]
        row_bytes = info.type.row_bytes(ne0)
        per_expert = info.n_rows if len(info.ne) < 3 else info.ne[1]  # imatrix slices are per expert
        step = max(1, CHUNK_ELEMENTS // ne0)
        if pool is None:
            rows = read_exact(fd, src.path, info.offset, info.nbytes, info.name).reshape(info.n_rows, row_bytes)
        else:  # several chunks per worker, so one tensor can keep all workers busy
            step = max(1, min(step, -(-info.n_rows // (2 * opts.threads))))
            outs = [_output_ref(w, info.name) for w in writers]
            out_row_bytes = [e.dst.row_bytes(ne0) for e in entries]
        imats = [None if e.dst == e.src else _imatrix_for(e, opts) for e in entries]  # a copy uses none
        start = 0
        while start < info.n_rows:
            stop = min(start + step, (start // per_expert + 1) * per_expert)
            expert = start // per_expert
            jobs: list[Job] = [
                (None if e.dst == e.src else e.dst, None if w is None else w[expert * ne0 : (expert + 1) * ne0])
                for e, w in zip(entries, imats)
            ]
            work: list[np.ndarray] | Future[list[int]]
            if pool is None:
                work = _quantize_chunk(rows[start:stop], info.name, info.type, ne0, jobs)
            else:
                dests = [(ref, off + start * rb) for (ref, off), rb in zip(outs, out_row_bytes)]
                work = pool.submit(
                    _quantize_into,
                    (fd, src.path) if isinstance(pool, ThreadPoolExecutor) else None,
                    info.offset + start * row_bytes,
                    stop - start,
                    row_bytes,
                    info.name,
                    info.type,
                    ne0,
                    jobs,
                    dests,
                )
            yield _WorkItem(entries, start == 0, stop == info.n_rows, work)
            start = stop


def _in_order(items: Iterator[_WorkItem], width: int) -> Iterator[tuple[list[PlanEntry], bool, bool, list[np.ndarray] | list[int]]]:
    """Resolve work items in order, keeping `width` in flight across tensor boundaries: enough to
    keep every worker busy, few enough to bound memory."""
    pending: list[_WorkItem] = []

    def done(item: _WorkItem) -> tuple[list[PlanEntry], bool, bool, list[np.ndarray] | list[int]]:
        entries, first, last, work = item
        return entries, first, last, work if isinstance(work, list) else work.result()

    for item in items:
        pending.append(item)
        if len(pending) >= width:
            yield done(pending.pop(0))
    for item in pending:
        yield done(item)


def _imatrix_for(e: PlanEntry, opts: QuantizeOptions) -> np.ndarray | None:
    if opts.imatrix is None:
        return None
    w = opts.imatrix.get(e.name)
    if w is None:
        return None
    n_expert = e.ne[2] if len(e.ne) > 2 else 1
    if w.size != e.ne[0] * n_expert:
        if e.name == "token_embd.weight":
            return None
        raise BadInput(f"imatrix entry for {e.name} has {w.size} values, expected {e.ne[0] * n_expert}")
    return np.ascontiguousarray(w, dtype=np.float32)


def _check_finite(name: str, raw: np.ndarray, t: GGMLType) -> None:
    """llama-quantize validates every input row it reads (§4.7): NaN/Inf in a float tensor aborts.
    Inf and NaN are the values whose exponent bits are all ones: with the sign cleared, exactly
    the bit patterns from inf's upwards (one integer max, not a float classification pass)."""
    if t.name == "f32":
        bits, inf = raw.view(np.uint32), 0x7F800000
    elif t.name in ("f16", "bf16"):
        bits, inf = raw.view(np.uint16), (0x7C00 if t.name == "f16" else 0x7F80)
    else:
        return
    if bits.size == 0:
        return
    sign_cleared = np.bitwise_and(bits, bits.dtype.type(np.iinfo(bits.dtype).max >> 1))
    ok = int(sign_cleared.max()) < inf
    if not ok:
        raise BadInput(f"tensor {name} has invalid data (NaN or Inf); fix the model that produced it")
