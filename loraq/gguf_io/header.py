"""A fast GGUF header parser (docs/llama-cpp.md §9), returning loraq's KV and TensorInfo records.

Why not gguf-py's GGUFReader: it builds a numpy view for every part of every field, about 150k of
them for a 49k-token vocabulary, which takes 2-3 s per open; a pipeline opens each model several
times. This parser reads numeric arrays with one np.frombuffer and strings with a plain loop, in
about 0.05 s. gguf-py stays the oracle: tests/test_gguf_io.py checks both agree on real files."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType as V

from ..errors import BadInput
from ..ggml_types import BY_ID, GGMLType


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: GGMLType
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape (slowest first), in elements."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.ne[0]

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing size-1 dimensions do not count (minimum 1)."""
        n = len(self.ne)
        while n > 1 and self.ne[n - 1] == 1:
            n -= 1
        return n


@dataclass(frozen=True)
class KV:
    key: str
    vtype: int  # GGUFValueType of the value
    raw: bytes  # the whole record as stored (key, type, value), for verbatim copies
    value: Any


STRUCT_FORMATS = {  # scalar GGUF value type -> struct format
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}
_NP = {vt: np.dtype(fmt) for vt, fmt in STRUCT_FORMATS.items()}  # the same types, for np.frombuffer


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vt: int) -> Any:
        vt = V(vt)
        if vt == V.STRING:
            return self.string()
        if vt == V.ARRAY:
            sub, n = V(self.take("<I")), self.take("<Q")
            if sub == V.STRING:
                return [self.string() for _ in range(n)]
            if sub == V.ARRAY:
                return [self.value(V.ARRAY) for _ in range(n)]
            dt = _NP[sub]
            end = self.pos + n * dt.itemsize
            if end > len(self.buf):
                raise ValueError("array runs past the end of the file")
            arr = np.frombuffer(self.buf[self.pos : end], dtype=dt)
            self.pos = end
            return arr.tolist()
        return self.take(STRUCT_FORMATS[vt])


def _parse(buf: bytes) -> tuple[list[KV], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(KVs, (name, ne, type id, offset in the data section) per tensor, end of the header)."""
    c = _Cursor(memoryview(buf))
    c.pos = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise BadInput(f"GGUF version {version} is not supported")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    kvs: list[KV] = []
    for _ in range(n_kv):
        start = c.pos
        key = c.string()
        vt = c.take("<I")
        value = c.value(vt)
        kvs.append(KV(key, vt, buf[start : c.pos], value))
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = c.string()
        nd = c.take("<I")
        ne = tuple(c.take("<Q") for _ in range(nd))
        tid, off = c.take("<I"), c.take("<Q")
        infos.append((name, ne, tid, off))
    return kvs, infos, c.pos


def parse_header(path: Path, file_size: int) -> tuple[list[KV], list[TensorInfo]]:
    """The file's KV records in order and its tensor infos (absolute offsets, sizes in bytes)."""
    if file_size < 24:
        raise BadInput(f"{path} is too short to be a GGUF file")
    want = min(file_size, 8 << 20)  # headers are a few MB at most; read more only if needed
    while True:
        with open(path, "rb") as f:
            buf = f.read(want)
        if buf[:4] != b"GGUF":
            raise BadInput(f"{path} is not a readable GGUF file: it does not start with the GGUF magic")
        try:
            kvs, infos, end = _parse(buf)
            break
        except (struct.error, ValueError, IndexError, UnicodeError, KeyError) as exc:
            if want < file_size:
                want = min(file_size, want * 4)
                continue
            raise BadInput(
                f"{path} is not a readable GGUF file ({exc}); it is truncated, corrupt or not a GGUF: re-download or regenerate it"
            ) from None
    align = next((int(kv.value) for kv in kvs if kv.key == "general.alignment"), 32)
    data = (end + align - 1) // align * align
    tensors: list[TensorInfo] = []
    for name, ne, tid, off in infos:
        t = BY_ID.get(tid)
        if t is None:
            raise BadInput(f"{path}: tensor {name} has unknown type {tid}")
        if ne[0] % t.block:
            raise BadInput(f"{path}: tensor {name} row length {ne[0]} is not a multiple of {t.block}")
        rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
        tensors.append(TensorInfo(name, ne, t, data + off, rows * t.row_bytes(ne[0])))
    return kvs, tensors
