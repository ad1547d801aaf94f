"""Legacy 32-element block types: q8_0, q4_0, q4_1, q5_0, q5_1 (docs/llama-cpp.md §5.1, §5.3).

Byte-identical to ggml's `quantize_<type>`: without an imatrix the `_ref` row quantizers, with
one the `quantize_row_<type>_impl` paths (σ² over the whole row, make_qx_quants /
make_qkx3_quants). Blocks are processed in the T layout (see numeric.py). q8_0 and q4_0 without
an imatrix run compiled when numba is there (jit.q8_0 / jit.q4_0: one pass in place of ~10
numpy passes and the T-layout transposes); these numpy kernels stay the reference and take any
call with a block the compiled ones leave to them (non-finite values, an overflowing 1/d).
q8_0_from_f16 and q4_0_from_f16 quantize fp16 input without the float32 step (jit._q8_0_f16 and
jit._q4_0_f16; the driver's F16 -> Q8_0 / Q4_0 path).

Block layouts (little endian, `half` = IEEE fp16):
  q8_0 (34 B): half d; i8 qs[32]                          x = d*q
  q4_0 (18 B): half d; u8 qs[16]                          x = d*(q-8)
  q4_1 (20 B): half d; half m; u8 qs[16]                  x = d*q + m
  q5_0 (22 B): half d; u8 qh[4]; u8 qs[16]                x = d*(q-16)
  q5_1 (24 B): half d; half m; u8 qh[4]; u8 qs[16]        x = d*q + m
qs[j] holds element j in its low nibble and element j+16 in its high nibble; bit j of the
little-endian u32 qh is bit 4 of element j."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import jit
from .fp import to_f16
from .numeric import F32, QkxResult, QxResult, c_roundf, c_trunc_u8, first_min, nibbles, pack_blocks, safe_inv, signed_absmax, to_tlayout

QK = 32
_SHIFTS = np.arange(8, dtype=np.uint8)[:, None]


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(G, 32, K) 5-bit values -> (G, 4, K) qh bytes: bit j of the LE u32 is bit 4 of element j,
    so byte b collects elements 8b..8b+7, element 8b in its lowest bit."""
    g, _, k = q.shape
    h = (q >> 4).reshape(g, 4, 8, k)  # 0 or 1 (values are < 32)
    h <<= _SHIFTS
    return np.bitwise_or.reduce(h, axis=2)


# ---------------------------------------------------------------- reference (no imatrix) kernels
# Each takes blocks (m, 32) and returns their bytes (m, nbytes).


def q8_0(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    fast = jit.q8_0(xb)
    if fast is not None:
        return fast
    t = to_tlayout(xb)
    amax = np.maximum(t.max(axis=1), -t.min(axis=1))
    amax += F32(0)  # MAX(0.0f, |v|) never yields -0.0
    d = amax / F32(127)
    idv = safe_inv(d)
    v = c_roundf(t * idv[:, None, :])  # roundf: half away from zero, not nearest_int
    if not np.isfinite(idv).all():  # id = inf: x86 converts inf/NaN to 0x80000000, low byte 0
        v = np.where(np.isfinite(v), v, F32(0))
    return pack_blocks(len(xb), [to_f16(d), v.astype(np.int8).view(np.uint8)])


def q4_0_from_f16(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """q4_0 blocks (nb, 18) of fp16 rows h, as q8_0_from_f16."""
    return _from_f16(jit._q4_0_f16, 18, h, out)


def q8_0_from_f16(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """q8_0 blocks (nb, 34) of fp16 rows h (any shape, uint16 bits, a multiple of 32 values), in
    `out` when given (nb*34 bytes); the same bytes as q8_0 on the float32 values. None when the
    compiled kernel cannot answer: numba is absent, or the input holds inf or NaN."""
    return _from_f16(jit._q8_0_f16, 34, h, out)


def _from_f16(kern_fn: Callable[..., Any], nbytes: int, h: np.ndarray, out: np.ndarray | None) -> np.ndarray | None:
    kern = jit.compiled(kern_fn)
    if kern is None:
        return None
    hb = np.ascontiguousarray(h).view(np.uint16).reshape(-1)
    nb = hb.size // QK
    blocks = np.empty(nb * nbytes, np.uint8) if out is None else out.reshape(-1)[: nb * nbytes]
    return blocks.reshape(nb, nbytes) if kern(hb, blocks) else None


def _q4_0_like(t: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0 ref: d = max / -nlev/2, q = MIN(nlev-1, (int8_t)(x*id + nlev/2 + 0.5f))."""
    half = nlev // 2
    d = signed_absmax(t) / F32(-half)  # all-zero block: +0.0 / -8 = -0.0, stored as 00 80
    idv = safe_inv(d)
    v = t * idv[:, None, :]  # x*id rounded to float32 first, then + 8.5f: two roundings
    v += F32(half + 0.5)
    q = c_trunc_u8(v, ~np.isfinite(idv))
    np.minimum(q, nlev - 1, out=q)
    return d, q


def _q4_1_like(t: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 ref: d = (max-min)/(nlev-1), q = (uint8)((x-min)*id + 0.5f) (MIN 15 for q4_1)."""
    mn = first_min(t)
    d = (t.max(axis=1) - mn) / F32(nlev - 1)
    d += F32(0)  # max and min come from the same element when all equal, so C never gets -0.0
    idv = safe_inv(d)
    v = t - mn[:, None, :]
    v *= idv[:, None, :]
    v += F32(0.5)
    q = c_trunc_u8(v, ~(np.isfinite(idv) & np.isfinite(d)))
    np.minimum(q, nlev - 1, out=q)
    return d, mn, q


def q4_0(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    fast = jit.q4_0(xb)
    if fast is not None:
        return fast
    d, q = _q4_0_like(to_tlayout(xb), 16)
    return pack_blocks(len(xb), [to_f16(d), nibbles(q)])


def q5_0(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d, q = _q4_0_like(to_tlayout(xb), 32)
    return pack_blocks(len(xb), [to_f16(d), _high_bits(q), nibbles(q)])


def q4_1(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d, mn, q = _q4_1_like(to_tlayout(xb), 16)
    return pack_blocks(len(xb), [to_f16(d), to_f16(mn), nibbles(q)])


def q5_1(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d, mn, q = _q4_1_like(to_tlayout(xb), 32)
    return pack_blocks(len(xb), [to_f16(d), to_f16(mn), _high_bits(q), nibbles(q)])


# ---------------------------------------------------------------- imatrix kernels
# Each takes whole rows x (r, n_per_row), as σ² spans a row, and the imatrix qw (n_per_row,).


def _weighted_blocks(x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T-layout blocks and their weights qw * sqrt(σ² + x²), σ² = Σ_row x² / n_per_row summed
    left to right in float32 (np.add.accumulate is strictly sequential, unlike np.sum)."""
    sigma2 = np.add.accumulate(x * x, axis=1)[:, -1] / F32(x.shape[1])
    w = qw[None, :] * np.sqrt(sigma2[:, None] + x * x)
    return to_tlayout(x.reshape(-1, QK)), to_tlayout(w.reshape(-1, QK))


def q4_0_imat(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    r = QxResult(*_weighted_blocks(x, qw), 8)
    return pack_blocks(x.size // QK, [to_f16(r.scale), nibbles(r.L())])


def q5_0_imat(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    r = QxResult(*_weighted_blocks(x, qw), 16)
    L = r.L()
    return pack_blocks(x.size // QK, [to_f16(r.scale), _high_bits(L), nibbles(L)])


def _qkx3(x: np.ndarray, qw: np.ndarray, nmax: int) -> QkxResult:
    return QkxResult(*_weighted_blocks(x, qw), nmax, -0.9, 0.05, 36, False)


def q4_1_imat(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    r = _qkx3(x, qw, 15)
    return pack_blocks(x.size // QK, [to_f16(r.scale), to_f16(-r.the_min), nibbles(r.L())])


def q5_1_imat(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    r = _qkx3(x, qw, 31)
    L = r.L()
    return pack_blocks(x.size // QK, [to_f16(r.scale), to_f16(-r.the_min), _high_bits(L), nibbles(L)])
