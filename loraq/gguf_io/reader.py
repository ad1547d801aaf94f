"""Read a GGUF file: metadata through loraq's header parser (header.py), tensor data through plain reads.

Tensor data is read with pread into fresh buffers rather than through the memory map, so pages of
tensors already processed do not stay resident: peak RSS follows the largest tensor, not the file."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..atomic import check_readable, io_error
from ..errors import BadInput
from .header import KV, TensorInfo, parse_header


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
        return str(self.get("general.architecture", ""))

    @overload
    def arch_int(self, suffix: str, default: None = None) -> int | None: ...
    @overload
    def arch_int(self, suffix: str, default: int) -> int: ...
    def arch_int(self, suffix: str, default: int | None = None) -> int | None:
        v = self.get(f"{self.arch}.{suffix}")
        if v is None:
            return default
        if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): llama.cpp uses layer 0 here
            v = v[0]
        return int(v)

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
    view = memoryview(buf)
    got = 0
    try:
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise BadInput(f"{path} is truncated inside tensor {tensor}")
            got += n
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    return np.frombuffer(buf, dtype=np.uint8)


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
