"""Legacy 32-element block types: q8_0, q4_0, q4_1, q5_0, q5_1 (docs/llama-cpp.md §5.1, §5.3).

Byte-identical to ggml's `quantize_<type>`: without an imatrix the `_ref` row quantizers, with
one the `quantize_row_<type>_impl` paths (σ² over the whole row, make_qx_quants /
make_qkx3_quants). Blocks are processed in the T layout (see numeric.py). q8_0 and q4_0 without
an imatrix run compiled when numba is there (jit.q8_0 / jit.q4_0: one pass in place of ~10
numpy passes and the T-layout transposes); these numpy kernels stay the reference and take any
call with a block the compiled ones leave to them (non-finite values, an overflowing 1/d).
q8_0_from_f16 and q4_0_from_f16 quantize fp16 input without the float32 step (the driver's F16
-> Q8_0 / Q4_0 path).

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


def _q8_0_f16(h, out):  # pragma: no cover - compiled
    """quantize_row_q8_0_ref on fp16 values h (nb*32,) uint16 straight into out (nb*34,) uint8:
    no float32 copy of the input, no separate pass for the finite check or the fp16 scale. False,
    with out unfinished, when a value is inf or NaN (llama-quantize refuses the input).

    Groups of S blocks go through an L1-sized float32 tile, each phase a loop LLVM vectorizes:
    indexing through slices (a slice's index is known non-negative; h[b0 + i] is not, and its
    wraparound check stops vectorization), the block maximum as a tree of elementwise maxima (a
    32-term reduction is left scalar), roundf on |v| with the sign put back from the bits. With
    fp16 input every d = amax/127 is a normal float32 (amax >= 2^-24) whose inverse cannot
    overflow, so no block needs the numpy kernel."""
    nb = h.shape[0] // 32
    S = 128
    x = np.empty(S * 32, np.float32)
    xb = x.view(np.uint32)
    xi = x.view(np.int32)
    t = np.empty(16, np.float32)
    d = np.empty(S, np.float32)
    db = d.view(np.uint32)
    half = np.float32(0.49999997)  # roundf(v) = sign(v) * trunc(|v| + 0.49999997f), see c_roundf
    for b0 in range(0, nb, S):
        hs = h[b0 * 32 : (b0 + S) * 32]
        os = out[b0 * 34 : (b0 + S) * 34]
        n = hs.size // 32
        bad = np.uint32(0)
        for i in range(hs.size):  # fp16 bits -> float32, exactly (as jit._f16_bits_to_f32)
            v = np.uint32(hs[i])
            em = v & np.uint32(0x7FFF)
            bad |= em + np.uint32(0x400)  # bit 15 set: em >= 0x7C00, inf or NaN
            bits = (em << np.uint32(13)) + np.uint32(0x38000000)
            if em >= np.uint32(0x7C00):
                bits += np.uint32(0x38000000)
            xb[i] = bits
            if em < np.uint32(0x400):
                x[i] = np.float32(em) * np.float32(5.9604645e-08)  # subnormal: em * 2^-24
            if v & np.uint32(0x8000):
                xb[i] |= np.uint32(0x80000000)
        if bad & np.uint32(0x8000):
            return False
        for b in range(n):  # amax = MAX(0, |x|) over the block (all finite, so order is free)
            xs = x[b * 32 : b * 32 + 32]
            for j in range(16):
                a = abs(xs[j])
                c = abs(xs[j + 16])
                t[j] = a if a > c else c
            for w in (8, 4, 2):
                for j in range(w):
                    t[j] = t[j] if t[j] > t[j + w] else t[j + w]
            d[b] = (t[0] if t[0] > t[1] else t[1]) / np.float32(127.0)
        for b in range(n):  # GGML_FP32_TO_FP16(d), round to nearest even (0 <= d < 516)
            u = db[b]
            if u >= np.uint32(0x38800000):  # at least 2^-14: a normal fp16
                hb = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1)) - np.uint32(0x38000000)) >> np.uint32(13)
            else:  # subnormal fp16: d * 2^24 (exact) rounded to an integer, ties to even
                hb = np.uint32(np.rint(d[b] * np.float32(16777216.0)))
            os[b * 34] = np.uint8(hb & np.uint32(0xFF))
            os[b * 34 + 1] = np.uint8(hb >> np.uint32(8))
        for b in range(n):
            s = np.float32(1.0) / d[b] if d[b] != np.float32(0.0) else np.float32(0.0)
            xs = x[b * 32 : b * 32 + 32]
            xsi = xi[b * 32 : b * 32 + 32]
            oq = os[b * 34 + 2 : b * 34 + 34]
            for j in range(32):
                k = np.int32(abs(xs[j] * s) + half)  # x*id rounded to float32 first, as in C
                k = -k if xsi[j] < 0 else k
                oq[j] = np.uint8(k & np.int32(0xFF))
    return True


def _q4_0_f16(h, out):  # pragma: no cover - compiled
    """quantize_row_q4_0_ref on fp16 values h (nb*32,) straight into out (nb*18,), as _q8_0_f16:
    d = max / -8 with max the signed value of the first largest |x| (C: `if (amax < fabsf(v))`,
    so an all-zero block keeps max = +0.0 and stores d = -0.0), id = 1/d, then
    q = MIN(15, (int8_t)(x*id + 8.5f)) with x*id rounded to float32 first (no FMA, as ggml).
    fp16 input keeps |d| >= 2^-27 normal and 1/d finite. False on inf or NaN."""
    nb = h.shape[0] // 32
    S = 128
    x = np.empty(S * 32, np.float32)
    xb = x.view(np.uint32)
    tp = np.empty(16, np.float32)
    tn = np.empty(16, np.float32)
    d = np.empty(S, np.float32)
    db = d.view(np.uint32)
    bias = np.float32(8.5)
    for b0 in range(0, nb, S):
        hs = h[b0 * 32 : (b0 + S) * 32]
        os = out[b0 * 18 : (b0 + S) * 18]
        n = hs.size // 32
        bad = np.uint32(0)
        for i in range(hs.size):  # fp16 bits -> float32, as in _q8_0_f16
            v = np.uint32(hs[i])
            em = v & np.uint32(0x7FFF)
            bad |= em + np.uint32(0x400)  # bit 15 set: em >= 0x7C00, inf or NaN
            bits = (em << np.uint32(13)) + np.uint32(0x38000000)
            if em >= np.uint32(0x7C00):
                bits += np.uint32(0x38000000)
            xb[i] = bits
            if em < np.uint32(0x400):
                x[i] = np.float32(em) * np.float32(5.9604645e-08)  # subnormal: em * 2^-24
            if v & np.uint32(0x8000):
                xb[i] |= np.uint32(0x80000000)
        if bad & np.uint32(0x8000):
            return False
        for b in range(n):  # the largest and the smallest value: trees of elementwise max / min
            xs = x[b * 32 : b * 32 + 32]
            for j in range(16):
                a = xs[j]
                c = xs[j + 16]
                tp[j] = a if a > c else c
                tn[j] = a if a < c else c
            for w in (8, 4, 2, 1):
                for j in range(w):
                    tp[j] = tp[j] if tp[j] > tp[j + w] else tp[j + w]
                    tn[j] = tn[j] if tn[j] < tn[j + w] else tn[j + w]
            hi = tp[0]
            lo = -tn[0]
            mx = hi if hi > lo else tn[0]  # a select: which sign wins is a coin toss per block
            if hi == lo:  # all zeros (max stays the initial +0.0), or +a and -a both there
                mx = np.float32(0.0)
                if hi != np.float32(0.0):
                    for j in range(32):  # the first of them, as the C loop meets them
                        if abs(xs[j]) == hi:
                            mx = xs[j]
                            break
            d[b] = mx / np.float32(-8.0)
        for b in range(n):  # GGML_FP32_TO_FP16(d), round to nearest even (|d| < 8188), sign kept
            u = db[b] & np.uint32(0x7FFFFFFF)
            if u >= np.uint32(0x38800000):
                hb = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1)) - np.uint32(0x38000000)) >> np.uint32(13)
            else:
                hb = np.uint32(np.rint(abs(d[b]) * np.float32(16777216.0)))
            hb |= (db[b] >> np.uint32(16)) & np.uint32(0x8000)
            os[b * 18] = np.uint8(hb & np.uint32(0xFF))
            os[b * 18 + 1] = np.uint8(hb >> np.uint32(8))
        for b in range(n):
            s = np.float32(1.0) / d[b] if d[b] != np.float32(0.0) else np.float32(0.0)
            xs = x[b * 32 : b * 32 + 32]
            oq = os[b * 18 + 2 : b * 18 + 18]
            for j in range(16):
                # (int8_t) truncation, then MIN 15, done in float (the sum is in [0.5, 16.5])
                q0 = np.uint8(min(np.float32(15.0), np.trunc(xs[j] * s + bias)))
                q1 = np.uint8(min(np.float32(15.0), np.trunc(xs[j + 16] * s + bias)))
                oq[j] = q0 | (q1 << np.uint8(4))
    return True


def q4_0_from_f16(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """q4_0 blocks (nb, 18) of fp16 rows h, as q8_0_from_f16."""
    return _from_f16(_q4_0_f16, 18, h, out)


def q8_0_from_f16(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """q8_0 blocks (nb, 34) of fp16 rows h (any shape, uint16 bits, a multiple of 32 values), in
    `out` when given (nb*34 bytes); the same bytes as q8_0 on the float32 values. None when the
    compiled kernel cannot answer: numba is absent, or the input holds inf or NaN."""
    return _from_f16(_q8_0_f16, 34, h, out)


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
