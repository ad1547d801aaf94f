"""Read a GGUF file: metadata through loraq's header parser (header.py), tensor data through plain reads.

Tensor data is read with pread into fresh buffers rather than through the memory map, so pages of
tensors already processed do not stay resident: peak RSS follows the largest tensor, not the file."""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import numpy as np
from gguf import GGUFValueType as V

from ..atomic import check_readable, io_error
from ..errors import BadInput
from .header import KV, TensorInfo, parse_header

_INTS = frozenset(int(t) for t in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64))
_FLOATS = frozenset((int(V.FLOAT32), int(V.FLOAT64)))
INT32_MAX = (1 << 31) - 1
_ARRAY_ELEMS: dict[str, type] = {"str": str, "int": int, "float": float}


class GGUFFile:
    """An open GGUF: ordered KVs, tensor infos, and tensor reads. Use as a context manager."""

    def __init__(self, path: Path | str):
        self.path = check_readable(path, "GGUF file")
        self.kvs, self.tensors = _parse_header(self.path)
        self._by_name = {t.name: t for t in self.tensors}
        self._fd: int | None = None

    # -- metadata ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value

    @cached_property
    def arch(self) -> str:
        return self.get_str("general.architecture") or ""

    def _bad_type(self, kv: KV, want: str) -> BadInput:
        got = V(kv.vtype).name if kv.vtype in set(V) else str(kv.vtype)
        if kv.vtype == V.ARRAY:
            got = f"an ARRAY of {len(kv.value)}"
        return BadInput(f"{self.path}: metadata {kv.key} must be {want}, not {got}; the file is corrupt or not for llama.cpp")

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """A STRING value (llama.cpp's typed getters assert the type; so does loraq)."""
        kv = self.kvs.get(key)
        if kv is None:
            return default
        if kv.vtype != V.STRING:
            raise self._bad_type(kv, "a STRING")
        return str(kv.value)

    def get_bool(self, key: str, default: bool | None = None) -> bool | None:
        kv = self.kvs.get(key)
        if kv is None:
            return default
        if kv.vtype != V.BOOL:
            raise self._bad_type(kv, "a BOOL")
        return bool(kv.value)

    def get_float(self, key: str, default: float | None = None, f32_only: bool = False) -> float | None:
        """A finite FLOAT32 (or, unless f32_only, FLOAT64) value."""
        kv = self.kvs.get(key)
        if kv is None:
            return default
        if kv.vtype not in _FLOATS or (f32_only and kv.vtype != V.FLOAT32):
            raise self._bad_type(kv, "a FLOAT32")
        v = float(kv.value)
        if not math.isfinite(v):
            raise BadInput(f"{self.path}: metadata {key} is {v}; it must be a finite number")
        return v

    def get_int(self, key: str, default: int | None = None, lo: int = 0, hi: int = INT32_MAX) -> int | None:
        """An integer value in [lo, hi]; for a per-layer array (e.g. head_count_kv), its first
        element, as llama.cpp uses for layer 0."""
        kv = self.kvs.get(key)
        if kv is None:
            return default
        v = kv.value
        if kv.vtype == V.ARRAY and v and isinstance(v[0], int) and not isinstance(v[0], bool):
            v = v[0]
        elif kv.vtype not in _INTS:
            raise self._bad_type(kv, "an integer")
        if not lo <= v <= hi:
            raise BadInput(f"{self.path}: metadata {key} is {v}, outside [{lo}, {hi}]; the file is corrupt")
        return int(v)

    def get_array(self, key: str, kind: str) -> list | None:
        """An ARRAY whose elements are `kind`: "str", "int" or "float"."""
        kv = self.kvs.get(key)
        if kv is None:
            return None
        v = kv.value
        elem = _ARRAY_ELEMS[kind]
        if kv.vtype != V.ARRAY or (v and not isinstance(v[0], elem)) or (v and isinstance(v[0], bool)):
            raise self._bad_type(kv, f"an ARRAY of {kind}")
        return list(v)

    @overload
    def arch_int(self, suffix: str, default: None = None) -> int | None: ...
    @overload
    def arch_int(self, suffix: str, default: int) -> int: ...
    def arch_int(self, suffix: str, default: int | None = None) -> int | None:
        return self.get_int(f"{self.arch}.{suffix}", default)

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def has_tensor(self, name: str) -> bool:
        return name in self._by_name

    # -- data ---------------------------------------------------------------------------------
    def read_raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's stored bytes as a uint8 array."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return read_exact(self._fd, self.path, t.offset, t.nbytes, t.name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_exact(fd: int, path: Path, offset: int, nbytes: int, tensor: str) -> np.ndarray:
    """`nbytes` bytes at `offset` of an open file, as a fresh uint8 array (pread, no memory map)."""
    buf = bytearray(nbytes)
    read_into(fd, path, offset, memoryview(buf), tensor)
    return np.frombuffer(buf, dtype=np.uint8)


def read_into(fd: int, path: Path, offset: int, view: memoryview, tensor: str) -> None:
    """Fill `view` with the bytes at `offset` of an open file; a short file is BadInput."""
    got, nbytes = 0, len(view)
    try:
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise BadInput(f"{path} is truncated inside tensor {tensor}")
            got += n
    except OSError as exc:
        raise io_error(exc, path, "read") from exc


# A pipeline opens the same base several times: keep the last few parsed headers, keyed by the
# file's identity so a rewritten file is parsed again.
_HEADERS: dict[tuple[str, int, int], tuple[dict[str, KV], list[TensorInfo]]] = {}
_HEADERS_MAX = 8


def _parse_header(path: Path) -> tuple[dict[str, KV], list[TensorInfo]]:
    try:
        st = path.stat()
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    hit = _HEADERS.get(key)
    if hit is not None:
        return dict(hit[0]), list(hit[1])
    try:
        kv_list, tensors = parse_header(path, st.st_size)
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    kvs = {kv.key: kv for kv in kv_list}
    for t in tensors:  # (parse_header already checked row lengths against the block size)
        if t.offset + t.nbytes > st.st_size:
            raise BadInput(f"{path} is truncated: tensor {t.name} ends past the end of the file; re-download or regenerate it")
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.pop(next(iter(_HEADERS)))
    _HEADERS[key] = (kvs, tensors)
    return dict(kvs), list(tensors)


def open_gguf(path: Path | str) -> GGUFFile:
    return GGUFFile(path)
