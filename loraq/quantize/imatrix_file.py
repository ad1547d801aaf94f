"""Importance-matrix files: the GGUF format llama-imatrix writes today and the legacy `.dat`,
read, written and merged as llama.cpp does (docs/llama-cpp.md §6.2-§6.4), and turned into the
per-column weights llama-quantize hands its quantizers.

What a file holds, per weight tensor W and per matrix k of W (one for a dense weight, one per
expert for MoE): the raw sum over activation rows of x_j² for every input column j, and the
number of rows summed. llama-quantize divides one by the other (a mean square activation per
column) and passes that to the quantizer as `quant_weights`.

Files are untrusted (docs/design.md): every size is checked against the file before anything is
allocated, values must be finite and non-negative (sums of squares, counts), counts whole and
below MAX_COUNT, names short enough for a ggml tensor name, shapes consistent; each problem is a
one-line BadInput. Writes go through loraq.atomic, so a failed write leaves nothing behind."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType as V

from ..atomic import atomic_output, check_readable, io_error
from ..errors import BadArguments, BadInput, shown
from ..ggml_types import F32
from ..gguf_io import GGUFStreamWriter, KVList, open_gguf
from ..gguf_io.header import MAX_NAME
from ..gguf_io.writer import OutTensor

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
# llama-imatrix's default: -c 512 with -b 2048 gives 4 sequences of 512 (chunk_size = n_ctx / n_parallel).
DEFAULT_CHUNK_SIZE = 512
INT32_MAX = (1 << 31) - 1
# A trillion activation rows: far above any real run, low enough that sums of counts stay exact
# in int64 and that the chunk counts derived from them fit the int32/u32 fields that store them.
MAX_COUNT = 1 << 40
MAX_WEIGHT_NAME = MAX_NAME - len(SUM_SUFFIX)  # "W.in_sum2" must fit a ggml tensor name (63 bytes)
_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]; llama-quantize strncpy's 127 bytes


@dataclass
class ImatrixEntry:
    """One weight tensor's statistics. GGUF: raw sums and counts. Legacy (.dat): `sums` holds the
    stored values, mean·ncall, as one row (n_mat 1, even for MoE), and `counts` is [ncall]."""

    sums: np.ndarray  # float32 (n_mat, n_col): Σ x² per column, per matrix (expert)
    counts: np.ndarray  # float32 (n_mat,): activation rows summed into each matrix (whole numbers)

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_col(self) -> int:
        return int(self.sums.shape[1])


@dataclass
class ImatrixData:
    entries: dict[str, ImatrixEntry]
    chunk_count: int = 0  # chunks the statistics were collected on
    chunk_size: int = 0  # tokens per chunk (n_ctx / n_parallel); 0 in legacy files
    datasets: list[str] = field(default_factory=list)  # non-UTF-8 bytes kept as surrogateescape
    legacy: bool = False  # read from a .dat (entries hold mean·ncall; see ImatrixEntry)
    has_metadata: bool = True  # GGUF: all three imatrix.* KVs were present (llama-quantize requires them)


# ------------------------------------------------------------------------------------- reading
def read_imatrix(path: Path | str, *, require_metadata: bool = False) -> ImatrixData:
    """A GGUF or legacy `.dat` imatrix, told apart by content (the GGUF magic), as
    common_imatrix_load does. With require_metadata, a GGUF file must carry the imatrix.* KVs
    (llama-quantize refuses one without them)."""
    path = check_readable(path, "imatrix file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    data = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if require_metadata and not data.has_metadata:
        raise BadInput(
            f"{path}: the imatrix has no {KV_DATASETS}, {KV_CHUNK_COUNT} and {KV_CHUNK_SIZE} metadata, "
            "which llama-quantize requires; regenerate it with llama-imatrix or loraq imatrix"
        )
    return data


def _bad(path: Path, what: str) -> BadInput:
    return BadInput(f"{path} is not a usable imatrix file: {what}; regenerate it")


def _check_values(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Checks shared by both formats; returns the counts rounded as llama.cpp's lround does."""
    if not np.isfinite(sums).all():
        raise _bad(path, f"entry {shown(name)} has a NaN or infinite sum")
    if (sums < 0).any():
        raise _bad(path, f"entry {shown(name)} has a negative sum of squares")
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts > MAX_COUNT).any():
        raise _bad(path, f"entry {shown(name)} has a count that is negative, not finite or above {MAX_COUNT}")
    # lround: halves away from zero (counts are ≥ 0 here, and exact in float64)
    return np.floor(counts.astype(np.float64) + 0.5).astype(np.float32)


def _dataset(raw: bytes) -> str:
    """A dataset name as llama.cpp sees it: a C string (cut at the first NUL)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")


def _gguf_datasets(path: Path, raw: bytes) -> list[str] | None:
    """The datasets array from its raw KV record (bytes kept exactly), or None if it is not an
    ARRAY of STRING (common_imatrix_load then ignores it)."""
    (klen,) = struct.unpack_from("<Q", raw, 0)
    pos = 8 + klen
    vt, sub, n = struct.unpack_from("<IIQ", raw, pos)
    if vt != V.ARRAY or sub != V.STRING:
        return None
    pos += 16
    out = []
    for _ in range(n):  # the header parser has already bounded n and every length by the record
        (k,) = struct.unpack_from("<Q", raw, pos)
        out.append(_dataset(raw[pos + 8 : pos + 8 + k]))
        pos += 8 + k
    return out


def _u32_kv(path: Path, src: Any, key: str) -> int:
    kv = src.kvs.get(key)
    if kv is None:
        return 0
    if kv.vtype != V.UINT32:  # gguf_get_val_u32 asserts the type
        raise _bad(path, f"metadata {key} must be a UINT32")
    v = int(kv.value)
    if v > INT32_MAX:  # llama.cpp keeps it in an int32
        raise _bad(path, f"metadata {key} is {v}, above {INT32_MAX}")
    return v


def _read_gguf(path: Path) -> ImatrixData:
    with open_gguf(path) as src:
        if not src.tensors:
            raise _bad(path, "it holds no tensors")
        datasets: list[str] = []
        kv = src.kvs.get(KV_DATASETS)
        if kv is not None:
            datasets = _gguf_datasets(path, kv.raw) or []
        has_meta = all(k in src.kvs for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE))
        chunk_count, chunk_size = _u32_kv(path, src, KV_CHUNK_COUNT), _u32_kv(path, src, KV_CHUNK_SIZE)
        pairs: dict[str, list[Any]] = {}
        for t in src.tensors:  # tensors with other names are ignored, as llama.cpp does
            for i, suffix in enumerate((SUM_SUFFIX, COUNT_SUFFIX)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[i] = t
        if not pairs:
            raise _bad(path, f"it has no {SUM_SUFFIX}/{COUNT_SUFFIX} tensors (is it a model file?)")
        entries: dict[str, ImatrixEntry] = {}
        for name in sorted(pairs):
            ts, tc = pairs[name]
            if ts is None or tc is None:
                raise _bad(path, f"entry {shown(name)} has {'no sums' if ts is None else 'no counts'}")
            if ts.type != F32 or tc.type != F32:
                raise _bad(path, f"the sums and counts of {shown(name)} must be F32")
            n_mat, n_val = tc.n_elements, ts.n_elements
            if n_mat < 1 or n_val < 1 or n_val % n_mat:
                raise _bad(path, f"entry {shown(name)} has {n_val} sums for {n_mat} counts (a whole number of columns per count is needed)")
            sums = src.read_raw(ts).view("<f4").astype(np.float32).reshape(n_mat, n_val // n_mat)
            counts = src.read_raw(tc).view("<f4").astype(np.float32)
            entries[name] = ImatrixEntry(sums, _check_values(path, name, sums, counts))
    return ImatrixData(entries, chunk_count, chunk_size, datasets, legacy=False, has_metadata=has_meta)


class _Cursor:
    """Reads a legacy file front to back, checking every length against the bytes left."""

    def __init__(self, path: Path, f: Any, size: int):
        self.path, self.f, self.size, self.pos = path, f, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise BadInput(f"{self.path} is truncated: {what} needs {n} bytes, {self.left()} are left; regenerate it")
        b = self.f.read(n)
        if len(b) != n:
            raise BadInput(f"{self.path} changed while it was being read")
        self.pos += n
        return bytes(b)

    def i32(self, what: str) -> int:
        return int(struct.unpack("<i", self.take(4, what))[0])


def _read_legacy(path: Path) -> ImatrixData:
    try:
        with open(path, "rb") as f:
            c = _Cursor(path, f, os.fstat(f.fileno()).st_size)
            if c.size < 4:
                raise _bad(path, "it is neither a GGUF file nor a legacy .dat imatrix (too short)")
            n_entries = c.i32("the entry count")
            # an entry is at least: name length, 1-byte name, ncall, nval, one float
            if n_entries < 1 or n_entries * 17 > c.left():
                raise _bad(path, f"it is neither a GGUF file nor a legacy .dat imatrix ({n_entries} entries in {c.size} bytes)")
            entries: dict[str, ImatrixEntry] = {}
            for i in range(n_entries):
                n = c.i32(f"the name length of entry {i}")
                if not 1 <= n <= MAX_NAME:
                    raise _bad(path, f"entry {i} has a name of {n} bytes (1 to {MAX_NAME} allowed)")
                raw = c.take(n, f"the name of entry {i}")
                try:
                    name = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise _bad(path, f"the name of entry {i} is not UTF-8") from None
                if "\0" in name:
                    raise _bad(path, f"the name of entry {i} contains a NUL byte")
                if name in entries:
                    raise _bad(path, f"entry {shown(name)} appears twice")
                ncall, nval = c.i32(f"the call count of {name}"), c.i32(f"the value count of {name}")
                if nval < 1 or 4 * nval > c.left():
                    raise _bad(path, f"entry {shown(name)} claims {nval} values, with {c.left()} bytes left")
                sums = np.frombuffer(c.take(4 * nval, f"the values of {name}"), "<f4").astype(np.float32).reshape(1, nval)
                counts = _check_values(path, name, sums, np.array([ncall], np.float32))
                entries[name] = ImatrixEntry(sums, counts)
            chunk_count, datasets = 0, []
            if c.left():  # optional trailer: the chunk count, then the dataset's file name
                chunk_count = c.i32("the chunk count")
                if chunk_count < 0:
                    raise _bad(path, f"its chunk count is {chunk_count}")
                n = c.i32("the dataset name length")
                if n < 0:
                    raise _bad(path, f"its dataset name length is {n}")
                if n:
                    datasets.append(_dataset(c.take(n, "the dataset name")))
                if c.left():
                    raise _bad(path, f"{c.left()} unexpected bytes follow its last record")
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    return ImatrixData(entries, chunk_count, 0, datasets, legacy=True, has_metadata=True)


# ------------------------------------------------------------------------------------- writing
def _as_bytes(s: str) -> bytes:
    return s.encode("utf-8", errors="surrogateescape")


def _counts_i64(e: ImatrixEntry) -> np.ndarray:
    return e.counts.astype(np.int64)


def _check_writable(data: ImatrixData) -> None:
    for name, e in data.entries.items():
        if e.sums.ndim != 2 or e.counts.shape != (e.sums.shape[0],) or e.sums.size == 0:
            raise BadArguments(f"internal: imatrix entry {name} has sums {e.sums.shape} and counts {e.counts.shape}")
    if not (0 <= data.chunk_count <= INT32_MAX and 0 <= data.chunk_size <= INT32_MAX):
        raise BadArguments(f"imatrix chunk count {data.chunk_count} or chunk size {data.chunk_size} is out of range")


def write_imatrix_gguf(path: Path | str, data: ImatrixData) -> Path:
    """The GGUF layout llama-imatrix writes (§6.2): general.type, imatrix.datasets,
    imatrix.chunk_count, imatrix.chunk_size; then W.in_sum2 [n_col, n_mat] and W.counts
    [1, n_mat] (F32) for every W in byte order of the names. Legacy data is first turned into
    raw sums as `llama-imatrix --in-file` does, with its default chunk size."""
    if data.legacy:
        data = merge_imatrix([data], DEFAULT_CHUNK_SIZE)
    _check_writable(data)
    kvs = KVList()
    kvs.set("general.type", V.STRING, "imatrix")
    kvs.set(KV_DATASETS, V.ARRAY, [_as_bytes(d) for d in data.datasets], V.STRING)
    kvs.set(KV_CHUNK_COUNT, V.UINT32, data.chunk_count)
    kvs.set(KV_CHUNK_SIZE, V.UINT32, data.chunk_size)
    names = sorted(data.entries, key=_as_bytes)
    tensors = []
    for name in names:
        if len(_as_bytes(name)) > MAX_WEIGHT_NAME:
            raise BadArguments(f"imatrix entry name {shown(name)} is longer than {MAX_WEIGHT_NAME} bytes; ggml tensor names cannot hold it")
        e = data.entries[name]
        tensors += [_tensor(name + SUM_SUFFIX, (e.n_col, e.n_mat)), _tensor(name + COUNT_SUFFIX, (1, e.n_mat))]
    path = Path(path)
    with GGUFStreamWriter(path, kvs, tensors) as w:
        for name in names:
            e = data.entries[name]
            w.write(name + SUM_SUFFIX, np.ascontiguousarray(e.sums, dtype="<f4"))
            w.write(name + COUNT_SUFFIX, np.ascontiguousarray(e.counts, dtype="<f4"))
    return path


def _tensor(name: str, ne: tuple[int, ...]) -> OutTensor:
    return OutTensor(name, ne, F32)


def write_imatrix_dat(path: Path | str, data: ImatrixData) -> Path:
    """The legacy layout (§6.3) as llama-imatrix --output-format dat writes it: entries whose
    counts are all zero are skipped, names sorted; each value is (sum/count)·ncall with
    ncall = ceil(max(counts)/chunk_size), and 1·ncall for a matrix with count 0; then the
    chunk count and the last dataset's name."""
    _check_writable(data)
    parts = []
    names = sorted(data.entries, key=_as_bytes)
    n_stored = 0
    for name in names:
        e = data.entries[name]
        if data.legacy:  # already in this form
            ncall, values = int(e.counts[0]), e.sums.reshape(-1).astype(np.float32)
        else:
            counts = _counts_i64(e)
            if not counts.any():
                continue
            if data.chunk_size <= 0:
                raise BadArguments("a .dat imatrix needs the chunk size (n_ctx) the statistics were collected with")
            ncall = (int(counts.max()) + data.chunk_size - 1) // data.chunk_size
            if ncall > INT32_MAX:
                raise BadArguments(f"imatrix entry {name} has {int(counts.max())} rows, too many for a .dat file")
            zero = (counts == 0)[:, None]
            value = np.where(zero, np.float32(1), e.sums)
            count = np.where(zero, np.float32(1), counts.astype(np.float32)[:, None])
            values = ((value / count).astype(np.float32) * np.float32(ncall)).astype(np.float32).reshape(-1)
        raw = _as_bytes(name)
        if len(raw) > MAX_NAME:
            raise BadArguments(f"imatrix entry name {shown(name)} is longer than {MAX_NAME} bytes")
        parts.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.astype("<f4").tobytes())
        n_stored += 1
    dataset = _as_bytes(data.datasets[-1]) if data.datasets else b""
    body = struct.pack("<i", n_stored) + b"".join(parts) + struct.pack("<ii", data.chunk_count, len(dataset)) + dataset
    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            tmp.write_bytes(body)
        except OSError as exc:
            raise io_error(exc, path, "write") from exc
    return path


# ------------------------------------------------------------------------- merging and using
def merge_imatrix(items: Sequence[ImatrixData], chunk_size: int = DEFAULT_CHUNK_SIZE) -> ImatrixData:
    """`llama-imatrix --in-file A --in-file B ...` without new text: raw sums added in float32
    and counts in int64, in file order; a legacy file contributes values·chunk_size and
    ncall·chunk_size; datasets concatenated; chunk_count = max count // chunk_size, where
    chunk_size is llama-imatrix's n_ctx / n_parallel (512 with its defaults)."""
    if chunk_size < 1:
        raise BadArguments(f"imatrix chunk size must be at least 1, got {chunk_size}")
    acc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    datasets: list[str] = []
    for d in items:
        for name in sorted(d.entries, key=_as_bytes):
            e = d.entries[name]
            sums = e.sums.reshape(-1).astype(np.float32)
            counts = _counts_i64(e)
            values, total = acc.get(name, (None, None))
            if values is None or total is None:
                values, total = np.zeros(sums.size, np.float32), np.zeros(1 if d.legacy else counts.size, np.int64)
            elif values.size != sums.size:
                raise BadInput(f"imatrix entry {shown(name)} has {sums.size} values in one file and {values.size} in another")
            if d.legacy:
                values = values + sums * np.float32(chunk_size)
                total = total + int(counts[0]) * chunk_size
            else:
                if total.size == 1 and counts.size > 1:
                    total = np.full(counts.size, total[0], np.int64)
                elif total.size != counts.size:
                    raise BadInput(f"imatrix entry {shown(name)} has {counts.size} counts in one file and {total.size} in another")
                values, total = values + sums, total + counts
            acc[name] = (values, total)
        datasets += d.datasets
    entries = {}
    max_count = 0
    for name, (values, total) in acc.items():
        if (total > MAX_COUNT).any():
            raise BadInput(f"imatrix entry {shown(name)} sums to more than {MAX_COUNT} rows")
        entries[name] = ImatrixEntry(values.reshape(total.size, -1), total.astype(np.float32))
        max_count = max(max_count, int(total.max()))
    return ImatrixData(entries, max_count // chunk_size, chunk_size, datasets)


def select_entries(data: ImatrixData, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> ImatrixData:
    """llama-quantize's --include-weights / --exclude-weights: keep the entries whose name
    contains one of `include` as a plain substring, or drop those containing one of `exclude`.
    They filter which tensors get imatrix data, not which are quantized."""
    if include and exclude:
        raise BadArguments("--include-weights and --exclude-weights cannot be used together")
    if exclude:
        kept = {n: e for n, e in data.entries.items() if not any(p in n for p in exclude)}
    elif include:
        kept = {n: e for n, e in data.entries.items() if any(p in n for p in include)}
    else:
        return data
    return replace(data, entries=kept)


def quant_weights(data: ImatrixData, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """What llama-quantize passes each tensor's quantizer (§6.4): per matrix k, sums / counts[k]
    in float32 (1.0 for every column of a matrix with count 0); for a legacy file values / ncall
    (the values themselves when ncall is 0). Matrices are concatenated: (n_mat·n_col,) float32."""
    wanted = None if names is None else set(names)
    out = {}
    for name, e in data.entries.items():
        if wanted is not None and name not in wanted:
            continue
        if data.legacy:
            ncall = int(e.counts[0])
            w = e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
        else:
            c = e.counts.astype(np.float32)[:, None]
            w = np.divide(e.sums, c, out=np.ones_like(e.sums, dtype=np.float32), where=c > 0)
        w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
        if not np.isfinite(w).all():  # llama-quantize checks the whole imatrix first
            raise BadInput(f"imatrix entry {shown(name)} gives a non-finite weight; the file is corrupt")
        out[name] = w
    return out


def quantize_kvs(file_arg: str, data: ImatrixData) -> list[tuple[str, V, Any]]:
    """The KVs llama-quantize adds for an imatrix, in its order (§4.8), given the --imatrix
    argument as typed and the entries left after --include/--exclude-weights (none: no KVs).
    Strings are cut to 127 bytes (strncpy into char[128]); counts are UINT32."""
    if not data.entries:
        return []
    kvs: list[tuple[str, V, Any]] = [("quantize.imatrix.file", V.STRING, _as_bytes(file_arg)[:_KV_STR_MAX])]
    if data.datasets:
        kvs.append(("quantize.imatrix.dataset", V.STRING, _as_bytes(data.datasets[0])[:_KV_STR_MAX]))
    kvs.append(("quantize.imatrix.entries_count", V.UINT32, len(data.entries)))
    if data.chunk_count > 0:
        kvs.append(("quantize.imatrix.chunks_count", V.UINT32, data.chunk_count))
    return kvs


def for_quantize(
    path: str | None, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray] | None, list[tuple[str, V, Any]]]:
    """`llama-quantize --imatrix PATH [--include-weights P]... | [--exclude-weights P]...` ->
    (QuantizeOptions.imatrix, QuantizeOptions.kv_overrides). PATH is recorded as given. Without
    a file the filters do nothing; with no entry left after them the model is quantized as
    without an imatrix and nothing is recorded (as llama-quantize does)."""
    if include and exclude:
        raise BadArguments("--include-weights and --exclude-weights cannot be used together")
    if path is None:
        return None, []
    if not path:
        raise BadArguments("--imatrix needs a file name")
    data = select_entries(read_imatrix(path, require_metadata=True), include, exclude)
    if not data.entries:
        return None, []
    return quant_weights(data), quantize_kvs(path, data)


def describe(data: ImatrixData) -> str:
    kind = "legacy .dat" if data.legacy else "GGUF"
    ds = ", ".join(data.datasets) or "no dataset"
    tokens = max((int(e.counts.max()) for e in data.entries.values()), default=0)
    return f"{kind} imatrix: {len(data.entries)} entries, {data.chunk_count} chunks ({ds}); up to {tokens} rows" + (
        "" if data.legacy else f" of chunk size {data.chunk_size}"
    )


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ImatrixData",
    "ImatrixEntry",
    "describe",
    "for_quantize",
    "merge_imatrix",
    "quant_weights",
    "quantize_kvs",
    "read_imatrix",
    "select_entries",
    "write_imatrix_dat",
    "write_imatrix_gguf",
]
