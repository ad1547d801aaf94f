"""Small GGUF files written byte by byte, valid or broken on purpose, for tests/test_hostile_inputs.py
and tests/test_fuzz_inputs.py. The layout is docs/llama-cpp.md §9; nothing here goes through
loraq's writer, so a file can break any rule."""

from __future__ import annotations

import struct
from pathlib import Path

UINT8, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, FLOAT64 = 0, 4, 5, 6, 7, 8, 9, 10, 12
F32, F16 = 0, 1  # ggml type ids


def s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, v: str | bytes) -> bytes:
    return kv(key, STRING, s(v))


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", v))


def kv_f32(key: str, v: float) -> bytes:
    return kv(key, FLOAT32, struct.pack("<f", v))


def kv_arr(key: str, sub: int, n: int, body: bytes) -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", sub, n) + body)


def info(name: str | bytes, ne: tuple[int, ...], tid: int = F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    nd = len(ne) if n_dims is None else n_dims
    return s(name) + struct.pack("<I", nd) + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", tid, offset)


def gguf(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
    align: int = 32,
) -> bytes:
    """A whole file: header, padding to `align`, then `data` (the tensors' bytes, already padded)."""
    nt = len(infos) if n_tensors is None else n_tensors
    nk = len(kvs) if n_kv is None else n_kv
    head = b"GGUF" + struct.pack("<IQQ", version, nt, nk) + b"".join(kvs) + b"".join(infos)
    a = align if align > 0 and align & (align - 1) == 0 else 32
    return head + b"\0" * (-len(head) % a) + data


BASE_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)]


def model(tensors: list[tuple[str, tuple[int, ...]]] | None = None, extra_kvs: list[bytes] | None = None) -> bytes:
    """A valid little F32 'llama' file: the given tensors (ggml ne), laid out as llama.cpp requires."""
    tensors = tensors if tensors is not None else [("blk.0.attn_q.weight", (32, 4)), ("output_norm.weight", (32,))]
    infos, data = [], b""
    for i, (name, ne) in enumerate(tensors):
        n = 1
        for x in ne:
            n *= x
        body = struct.pack(f"<{n}f", *(float(i + 1),) * n)
        infos.append(info(name, ne, F32, len(data)))
        data += body + b"\0" * (-len(body) % 32)
    return gguf(BASE_KVS + (extra_kvs or []), infos, data)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
