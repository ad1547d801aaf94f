"""Stream a GGUF file with the byte layout of llama.cpp's C writer (docs/llama-cpp.md §4.8, §9).

Layout: magic, version 3, n_tensors, n_kv, the KV records, the tensor infos (n_dims, ne, type,
offset relative to the data section), zero padding to 32, then each tensor's bytes followed by
zero padding to 32 (the last tensor included). No `general.alignment` key is written: 32 is
llama.cpp's default and what its tools emit.

The header is computed up front from the tensor infos, so tensors can be produced and written one
at a time; the file appears under its final name only once every tensor has been written."""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ..atomic import atomic_output, io_error, start_writeback
from ..errors import LoraqError
from ..ggml_types import GGMLType
from .header import STRUCT_FORMATS

ALIGNMENT = 32
# the writeback of finished tensors is started every this many bytes (atomic.start_writeback)
_WRITEBACK_BYTES = 16 << 20


def _pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: GGUFValueType, value: Any, subtype: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _str(value)
    if vtype == GGUFValueType.ARRAY:
        if subtype is None:
            raise ValueError("an ARRAY KV needs its element type")
        body = b"".join(_value(subtype, v, None) for v in value)
        return struct.pack("<IQ", int(subtype), len(value)) + body
    return struct.pack(STRUCT_FORMATS[vtype], value)


def encode_kv(key: str, vtype: GGUFValueType, value: Any, subtype: GGUFValueType | None = None) -> bytes:
    """One KV record as stored in GGUF: key string, u32 value type, value."""
    return _str(key) + struct.pack("<I", int(vtype)) + _value(vtype, value, subtype)


class KVList:
    """Ordered KV records with llama.cpp's `gguf_set_*` semantics: setting a key that exists
    removes it and appends it at the end (docs/llama-cpp.md §4.8)."""

    def __init__(self, records: Iterable[tuple[str, bytes]] = ()):
        self._items: dict[str, bytes] = dict(records)

    def set(self, key: str, vtype: GGUFValueType, value: Any, subtype: GGUFValueType | None = None) -> None:
        self._items.pop(key, None)
        self._items[key] = encode_kv(key, vtype, value, subtype)

    def set_raw(self, key: str, raw: bytes) -> None:
        self._items.pop(key, None)
        self._items[key] = raw

    def remove(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def records(self) -> list[bytes]:
        return list(self._items.values())


@dataclass(frozen=True)
class OutTensor:
    name: str
    ne: tuple[int, ...]  # ggml order
    type: GGMLType
    n_dims: int | None = None  # None: ggml_n_dims (C writers); the Python writer uses len(shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.ne[1:]) * self.type.row_bytes(self.ne[0])

    def dims(self) -> int:
        if self.n_dims is not None:
            return self.n_dims
        n = len(self.ne)
        while n > 1 and self.ne[n - 1] == 1:
            n -= 1
        return n


class GGUFStreamWriter:
    """Write tensors in the declared order; the file is renamed into place on a clean exit."""

    def __init__(self, path: Path | str, kvs: KVList, tensors: Sequence[OutTensor]):
        self.path = Path(path)
        self.tensors = list(tensors)
        self._kvs = kvs
        self._next = 0
        self._pending = 0
        self._ctx: contextlib.AbstractContextManager[Path] | None = None
        self._f: io.BufferedWriter | None = None
        self._tmp: Path | None = None
        self._offsets: dict[str, int] = {}
        self._flushed = 0  # bytes from the start whose writeback has been started (atomic.start_writeback)

    def _header(self) -> bytes:
        parts = [b"GGUF", struct.pack("<IQQ", 3, len(self.tensors), len(self._kvs))]
        parts += self._kvs.records()
        offset = 0
        for t in self.tensors:
            d = t.dims()
            parts.append(_str(t.name) + struct.pack(f"<I{d}QIQ", d, *t.ne[:d], t.type.id, offset))
            offset += _pad(t.nbytes)
        head = b"".join(parts)
        return head + b"\0" * (_pad(len(head)) - len(head))

    def __enter__(self) -> GGUFStreamWriter:
        self._ctx = atomic_output(self.path)
        tmp = self._tmp = self._ctx.__enter__()
        try:
            self._f = open(tmp, "wb")
            head = self._header()
            self._f.write(head)
            offset = len(head)
            for t in self.tensors:
                self._offsets[t.name] = offset
                offset += _pad(t.nbytes)
        except OSError as exc:
            self._abort(exc)
            raise io_error(exc, self.path, "write") from exc
        return self

    def write(self, name: str, data: np.ndarray | bytes | Iterable[np.ndarray | bytes]) -> None:
        """Write the next tensor's bytes: one buffer, or an iterable of consecutive chunks."""
        self.begin(name)
        for chunk in [data] if isinstance(data, (np.ndarray, bytes, bytearray, memoryview)) else data:
            self.append(chunk)
        self.end()

    def begin(self, name: str) -> None:
        """Start the next tensor; its bytes follow through `append`, then `end`."""
        t = self.tensors[self._next]
        if t.name != name:
            raise LoraqError(f"internal: tensor {name} written out of order (expected {t.name})")
        self._pending = 0

    def append(self, chunk: np.ndarray | bytes | memoryview) -> None:
        t = self.tensors[self._next]
        buf = np.ascontiguousarray(chunk).data.cast("B") if isinstance(chunk, np.ndarray) else memoryview(chunk)
        self._pending += buf.nbytes
        if self._pending > t.nbytes:
            raise LoraqError(f"internal: tensor {t.name} has more than {t.nbytes} bytes")
        self._write(buf)

    def end(self) -> None:
        t = self.tensors[self._next]
        if self._pending != t.nbytes:
            raise LoraqError(f"internal: tensor {t.name} has {self._pending} bytes, expected {t.nbytes}")
        self._write(b"\0" * (_pad(t.nbytes) - t.nbytes))
        self._next += 1
        done = self._offsets[t.name] + _pad(t.nbytes)  # every byte before this is in the file now
        if done - self._flushed >= _WRITEBACK_BYTES:
            assert self._f is not None, "GGUFStreamWriter used outside its with block"
            try:
                self._f.flush()
            except OSError as exc:
                raise io_error(exc, self.path, "write") from exc
            start_writeback(self._f.fileno(), self._flushed, done - self._flushed)
            self._flushed = done

    def region(self, name: str) -> tuple[Path, int, int]:
        """Where tensor `name`'s bytes belong, for writers in other processes (os.pwrite):
        (the temporary file, its descriptor here, the absolute offset). The tensor still passes
        through begin, skip (in place of append) and end, in order, once its bytes are there."""
        assert self._f is not None and self._tmp is not None, "GGUFStreamWriter used outside its with block"
        return self._tmp, self._f.fileno(), self._offsets[name]

    def skip(self, nbytes: int) -> None:
        """Account for `nbytes` of the current tensor written by someone else (see region)."""
        t = self.tensors[self._next]
        self._pending += nbytes
        if self._pending > t.nbytes:
            raise LoraqError(f"internal: tensor {t.name} has more than {t.nbytes} bytes")
        assert self._f is not None, "GGUFStreamWriter used outside its with block"
        try:
            self._f.seek(nbytes, os.SEEK_CUR)
        except OSError as exc:
            raise io_error(exc, self.path, "write") from exc

    def _write(self, buf: bytes | memoryview) -> None:
        assert self._f is not None, "GGUFStreamWriter used outside its with block"
        try:
            self._f.write(buf)
        except OSError as exc:
            raise io_error(exc, self.path, "write") from exc

    def _abort(self, exc: BaseException) -> None:
        """Drop the temporary file. The buffered bytes are discarded, not flushed: after a failed
        write or flush (a full disk) a second flush would only fail again and hide the first error."""
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError, ValueError):
                f.raw.close()  # closes the descriptor; f.close() then skips its flush
            with contextlib.suppress(OSError, ValueError):
                f.close()
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            with contextlib.suppress(BaseException):
                ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None and self._next != len(self.tensors):
            exc = LoraqError(f"internal: only {self._next} of {len(self.tensors)} tensors written")
            self._abort(exc)
            raise exc
        if exc is not None:
            self._abort(exc)
            return
        f, ctx = self._f, self._ctx
        assert f is not None and ctx is not None, "__exit__ without __enter__"
        try:
            f.flush()
            f.close()
        except OSError as e:
            self._abort(e)
            raise io_error(e, self.path, "write") from e
        except BaseException as e:  # a signal (KeyboardInterrupt) during the flush
            self._abort(e)
            raise
        self._f = self._ctx = None
        ctx.__exit__(None, None, None)  # fsync, rename; on failure it removes the temporary itself
