"""A fast GGUF header parser (docs/llama-cpp.md §9), returning loraq's KV and TensorInfo records.

Why not gguf-py's GGUFReader: it builds a numpy view for every part of every field, about 150k of
them for a 49k-token vocabulary, which takes 2-3 s per open; a pipeline opens each model several
times. This parser reads numeric arrays with one np.frombuffer and strings with a plain loop, in
about 0.05 s. gguf-py stays the oracle: tests/test_gguf_io.py checks both agree on real files.

The file is untrusted (docs/design.md, Untrusted input). The header is read once, front to back,
in bounded chunks; every count and length is checked against the bytes left in the file (and
against loraq's limits below) before anything is read, allocated or looped over, so a corrupt
header costs at most one chunk of reading. Sizes are computed with Python ints. What llama.cpp's
loader (gguf.cpp) rejects is rejected here too, with a one-line BadInput naming the key or tensor:
unknown value types, arrays of arrays, empty or duplicate keys, a `general.alignment` that is not
a UINT32 power of two, duplicate or over-long tensor names, more than 4 dimensions, negative
dimensions, element counts that do not fit in int64, unknown tensor types, rows that are not whole
blocks, and data offsets that are not exactly the padded sizes of the earlier tensors (so tensors
never overlap and stay aligned). Keys and tensor names must be UTF-8 (loraq matches and rewrites
them); string values that are not UTF-8 are shown with U+FFFD, and copied verbatim from `raw`."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
from gguf import GGUFValueType as V

from ..errors import BadInput, shown
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
        return math.prod(self.ne)

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])

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
_NP = {int(vt): np.dtype(fmt) for vt, fmt in STRUCT_FORMATS.items()}  # the same types, for np.frombuffer
_SCALAR = {int(vt): struct.Struct(fmt) for vt, fmt in STRUCT_FORMATS.items()}
_TYPE_NAMES = {int(vt): vt.name for vt in V}
_STRING, _ARRAY = int(V.STRING), int(V.ARRAY)

# llama.cpp's limits (gguf.cpp, ggml.h)
MAX_STRING = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_NAME = 63  # GGML_MAX_NAME is 64 bytes with the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1
# loraq's own limits, far above any real model (a 262k-token vocabulary's header is about 8 MiB
# and 800k array elements); they bound the memory a hostile header can make loraq spend.
MAX_HEADER = 64 << 20  # bytes of KVs and tensor infos
MAX_ELEMENTS = 1 << 24  # array elements over the whole header
MAX_KEY = 1 << 16  # bytes in a key
# the fewest bytes a record can take, to check counts against the bytes left before looping
_MIN_KV = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_INFO = 8 + 4 + 4 + 8  # name length (empty name), n_dims 0, type, offset
_CHUNK = 1 << 20

_U32, _U64, _I64 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<q")


class _Header:
    """The header's bytes read so far, from offset 0; `need` reads more in bounded chunks."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.buf = bytearray()
        self.pos = 0  # the cursor, an absolute file offset (the buffer starts at 0)
        self.elements = 0  # array elements read so far, against MAX_ELEMENTS

    def fail(self, reason: str) -> NoReturn:
        raise BadInput(f"{self.path} is not a readable GGUF file: {shown(reason, 400)}; re-download or regenerate it")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """Make n bytes from the cursor available, or fail naming `what` if the file has fewer."""
        end = self.pos + n
        if end <= len(self.buf):
            return
        if end > self.size:
            self.fail(f"{what} runs past the end of the file ({n} bytes at offset {self.pos}, file size {self.size})")
        if end > MAX_HEADER:
            self.fail(f"{what} takes the header past {MAX_HEADER >> 20} MiB, more than any real model's header")
        want = min(max(end, len(self.buf) + _CHUNK), self.size, MAX_HEADER) - len(self.buf)
        got = self.f.read(want)
        self.buf += got
        if len(self.buf) < end:  # the file shrank while being read
            self.fail(f"{what} runs past the end of the file")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def i64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _I64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def name(self, what: str, limit: int) -> str:
        """A key or tensor name: at most `limit` bytes of UTF-8."""
        n = self.u64(what)
        if n > limit:
            self.fail(f"{what} is {n} bytes long, more than the {limit} allowed")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {raw[:80]!r} is not UTF-8")

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_STRING:
            self.fail(f"{what} is a string of {n} bytes, more than llama.cpp's limit of {MAX_STRING}")
        self.need(n, what)
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int, what: str) -> list[str]:
        """n strings: one loop with the buffer's fast path inline (vocabularies hold ~10^5)."""
        out: list[str] = []
        add, unpack = out.append, _U64.unpack_from
        buf, pos = self.buf, self.pos
        for i in range(n):
            if pos + 8 > len(buf):
                self.pos = pos
                self.need(8, f"{what} string {i}")
                buf = self.buf
            (k,) = unpack(buf, pos)
            pos += 8
            if pos + k > len(buf):
                self.pos = pos
                if k > MAX_STRING:
                    self.fail(f"{what} string {i} is {k} bytes long, more than llama.cpp's limit of {MAX_STRING}")
                self.need(k, f"{what} string {i}")
                buf = self.buf
            add(buf[pos : pos + k].decode("utf-8", errors="replace"))
            pos += k
        self.pos = pos
        return out

    def value(self, vt: int, key: str) -> Any:
        if vt == _STRING:
            return self.string(f"the value of key '{shown(key)}'")
        if vt == _ARRAY:
            sub = self.u32(f"the element type of key '{shown(key)}'")
            n = self.u64(f"the length of key '{shown(key)}'")
            if sub == _ARRAY:
                self.fail(f"key '{shown(key)}' is an array of arrays, which llama.cpp's loader rejects")
            if sub != _STRING and sub not in _NP:
                self.fail(f"key '{shown(key)}' is an array of unknown value type {sub}")
            item = 8 if sub == _STRING else _NP[sub].itemsize  # a string takes at least its length
            if n > MAX_ARRAY or n * item > self.left():
                self.fail(f"key '{shown(key)}' claims {n} elements, more than the {self.left()} bytes left in the file can hold")
            self.elements += n
            if self.elements > MAX_ELEMENTS:
                self.fail(f"key '{shown(key)}' takes the header past {MAX_ELEMENTS} array elements, more than any real model's")
            if sub == _STRING:
                return self.strings(n, f"key '{shown(key)}'")
            nbytes = n * item
            self.need(nbytes, f"the value of key '{shown(key)}'")
            values = np.frombuffer(self.buf, dtype=_NP[sub], count=n, offset=self.pos).tolist()
            self.pos += nbytes
            return values
        fmt = _SCALAR.get(vt)
        if fmt is None:
            self.fail(f"key '{shown(key)}' has unknown value type {vt}")
        self.need(fmt.size, f"the value of key '{shown(key)}'")
        (v,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v


def parse_header(path: Path, file_size: int) -> tuple[list[KV], list[TensorInfo]]:
    """The file's KV records in order and its tensor infos (absolute offsets, sizes in bytes).

    Reads the header only (at most MAX_HEADER bytes, in _CHUNK steps); raises BadInput for
    anything llama.cpp's loader would refuse, and OSError for read failures (the caller maps it)."""
    if file_size < 24:
        raise BadInput(f"{path} is too short to be a GGUF file")
    with open(path, "rb") as f:
        h = _Header(f, path, file_size)
        h.need(4, "the magic")
        if h.buf[:4] != b"GGUF":
            raise BadInput(f"{path} is not a readable GGUF file: it does not start with the GGUF magic")
        h.pos = 4
        version = h.u32("the version")
        if version not in (2, 3):
            raise BadInput(f"{path}: GGUF version {version} is not supported (loraq reads versions 2 and 3)")
        n_tensors, n_kv = h.u64("the tensor count"), h.u64("the KV count")
        if n_tensors * _MIN_INFO + n_kv * _MIN_KV > h.left():
            h.fail(f"it claims {n_tensors} tensors and {n_kv} keys, more than its {h.left()} remaining bytes can hold")
        kvs = _read_kvs(h, n_kv)
        align = _alignment(h, kvs)
        infos = _read_infos(h, n_tensors)
        end = h.pos
    return kvs, _place(h, infos, align, end)


def _read_kvs(h: _Header, n_kv: int) -> list[KV]:
    kvs: list[KV] = []
    seen: set[str] = set()
    for i in range(n_kv):
        start = h.pos
        key = h.name(f"key {i}", MAX_KEY)
        if not key:
            h.fail(f"key {i} is empty")
        if key in seen:
            h.fail(f"key '{shown(key)}' appears twice")
        seen.add(key)
        vt = h.u32(f"the value type of key '{shown(key)}'")
        value = h.value(vt, key)
        kvs.append(KV(key, vt, bytes(h.buf[start : h.pos]), value))
    return kvs


def _alignment(h: _Header, kvs: list[KV]) -> int:
    kv = next((kv for kv in kvs if kv.key == "general.alignment"), None)
    if kv is None:
        return 32
    if kv.vtype != int(V.UINT32):
        h.fail(f"key 'general.alignment' must be UINT32, not {_TYPE_NAMES.get(kv.vtype, kv.vtype)}")
    align = int(kv.value)
    if align == 0 or align & (align - 1):
        h.fail(f"general.alignment {align} is not a power of two")
    return align


def _read_infos(h: _Header, n_tensors: int) -> list[tuple[str, tuple[int, ...], GGMLType, int]]:
    infos: list[tuple[str, tuple[int, ...], GGMLType, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = h.name(f"the name of tensor {i}", MAX_NAME)
        if name in seen:
            h.fail(f"tensor '{shown(name)}' appears twice")
        seen.add(name)
        nd = h.u32(f"the dimension count of tensor '{shown(name)}'")
        if nd > MAX_DIMS:
            h.fail(f"tensor '{shown(name)}' has {nd} dimensions, more than ggml's {MAX_DIMS}")
        ne = tuple(h.i64(f"the shape of tensor '{shown(name)}'") for _ in range(nd)) or (1,)  # 0 dims: one element, as in ggml
        if min(ne) < 0:
            h.fail(f"tensor '{shown(name)}' has a negative dimension {list(ne)}")
        n = math.prod(ne)
        if n >= INT64_MAX:
            h.fail(f"tensor '{shown(name)}' has {n} elements ({list(ne)}), more than int64 can count")
        tid = h.u32(f"the type of tensor '{shown(name)}'")
        t = BY_ID.get(tid)
        if t is None or t.block <= 0:
            h.fail(f"tensor '{shown(name)}' has unknown ggml type {tid}")
        if ne[0] % t.block:
            h.fail(f"tensor '{shown(name)}' of type {t.name} has rows of {ne[0]} elements, not a multiple of its block size {t.block}")
        infos.append((name, ne, t, h.u64(f"the data offset of tensor '{shown(name)}'")))
    return infos


def _place(h: _Header, infos: list[tuple[str, tuple[int, ...], GGMLType, int]], align: int, end: int) -> list[TensorInfo]:
    """Absolute offsets and sizes; each offset must be the padded sizes of the tensors before it
    (llama.cpp's rule: no gaps, no overlaps, every tensor aligned) and each tensor inside the file."""
    data = -(-end // align) * align
    if infos and data > h.size:
        h.fail(f"its data section would start at {data}, past the end of the file ({h.size} bytes)")
    tensors: list[TensorInfo] = []
    expected = 0
    for name, ne, t, off in infos:
        nbytes = math.prod(ne[1:]) * t.row_bytes(ne[0])
        if off != expected:
            h.fail(f"tensor '{shown(name)}' has data offset {off}, expected {expected} (tensors must follow each other, padded to {align})")
        if data + off + nbytes > h.size:
            raise BadInput(f"{h.path} is truncated: tensor {shown(name)} ends past the end of the file; re-download or regenerate it")
        tensors.append(TensorInfo(name, ne, t, data + off, nbytes))
        expected = off + -(-nbytes // align) * align
    return tensors
