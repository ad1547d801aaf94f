"""Whole-tensor dequantization for the engine: ggml's to_float for the common types, vectorised
over every block of a tensor at once.

kernels.dequantize goes through gguf-py, which works 16 rows per numpy call; on SmolLM2 that was a
third of a Q4_K_M compare run. Here each type is a handful of numpy operations over all blocks
(in slices of _SLICE blocks to bound the temporaries). The arithmetic is ggml's
dequantize_row_* (ggml-quants.c) operation for operation in float32: q8_0 d·q; q4_0 d·(q−8);
q5_0 d·(q−16); q4_1/q5_1 d·q + m; q4_K/q5_K (d·sc)·q − (dmin·m); q6_K (d·sc)·q. Block layouts:
docs/llama-cpp.md §5.1. Other types fall back to kernels.dequantize. Tested against libgguf
(ggml's own C) in tests/test_engine.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..ggml_types import GGMLType
from ..kernels import dequantize as _generic
from ..kernels import jit

_SLICE = 1 << 14  # blocks per slice: 4 Mi elements of K-quants, 0.5 Mi of 32-blocks


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The little-endian F16 at byte `at` of each block, as float32 (n, 1)."""
    return np.ascontiguousarray(b[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(b: np.ndarray, at: int) -> np.ndarray:
    """q5's 32 high bits (u32 at byte `at`): bit i is element i's fifth bit, as 0 or 16."""
    qh = np.ascontiguousarray(b[:, at : at + 4]).view("<u4")
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b, 2)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = (_nibbles(b[:, 6:22]) | _high_bits(b, 2)).astype(np.int8) - np.int8(16)
    return _f16(b, 0) * q.astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:24]) | _high_bits(b, 4)
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7 of the 12 packed bytes: 6-bit scales and mins, (n, 8) each."""
    lo, hi = sc[:, 0:4], sc[:, 4:8]
    tail = sc[:, 8:12]
    s = np.concatenate([lo & 63, (tail & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=1)
    return s.astype(np.float32), m.astype(np.float32)


def _q4_K(b: np.ndarray) -> np.ndarray:
    n = len(b)
    s, m = _k_scales(b[:, 4:16])
    d1 = _f16(b, 0) * s  # (n, 8): one per 32 elements
    m1 = _f16(b, 2) * m
    qs = b[:, 16:144].reshape(n, 4, 1, 32)  # 4 groups of 64: low nibbles then high nibbles
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (d1[:, :, None] * q - m1[:, :, None]).reshape(n, 256)


def _q5_K(b: np.ndarray) -> np.ndarray:
    n = len(b)
    s, m = _k_scales(b[:, 4:16])
    d1 = _f16(b, 0) * s
    m1 = _f16(b, 2) * m
    qh = b[:, 16:48].reshape(n, 1, 32)  # sub-block j takes bit j of each qh byte
    hb = ((qh >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4  # (n, 8, 32)
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    q = (np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32) | hb).astype(np.float32)
    return (d1[:, :, None] * q - m1[:, :, None]).reshape(n, 256)


def _q6_K(b: np.ndarray) -> np.ndarray:
    n = len(b)
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # (half of 128, ql[l] / ql[l+32], l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 16)
    d = _f16(b, 208)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, 2, 4, 32): q1 q2 q3 q4 of each half
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = ((low | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32).reshape(n, 16, 16)
    return ((d * sc)[:, :, None] * q).reshape(n, 256)


_KERNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "q8_0": _q8_0,
    "q4_0": _q4_0,
    "q4_1": _q4_1,
    "q5_0": _q5_0,
    "q5_1": _q5_1,
    "q4_K": _q4_K,
    "q5_K": _q5_K,
    "q6_K": _q6_K,
}


def dequantize_tensor(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Stored bytes -> float32 of numpy `shape`, as kernels.dequantize, faster for the types above;
    into `out` (C-contiguous float32 of that shape) when given."""
    if out is not None and (out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"out must be C-contiguous float32 {tuple(shape)}, got {out.dtype} {out.shape}")
    if qtype.name == "f16" and np.size(raw) == 2 * int(np.prod(shape)):
        # numpy's float16 cast is scalar: SmolLM2's 134 M F16 weights took 0.55 s of one AVX2
        # core, 0.12 s compiled (exact too, vectorized, written straight into `out`)
        res = jit.f16_to_f32(np.ascontiguousarray(raw).view(np.uint16), out)
        if res is not None:
            return res.reshape(shape)
    fn = _KERNELS.get(qtype.name)
    if fn is None:
        res = _generic(raw, qtype, shape)
        if out is None:
            return res
        out[...] = res
        return out
    n_el = int(np.prod(shape))
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, qtype.nbytes)
    if len(blocks) * qtype.block != n_el:
        raise ValueError(f"{blocks.size} bytes of {qtype.name} do not hold {n_el} elements")
    flat = np.empty((len(blocks), qtype.block), dtype=np.float32) if out is None else out.reshape(len(blocks), qtype.block)
    # compiled, straight into the result (no slices, no temporaries)
    jitted = {"q8_0": jit.q8_0_dequantize, "q5_0": jit.q5_0_dequantize}.get(qtype.name)
    if jitted is None or jitted(blocks, flat) is None:
        for i in range(0, len(blocks), _SLICE):
            flat[i : i + _SLICE] = fn(blocks[i : i + _SLICE])
    return flat.reshape(shape)
