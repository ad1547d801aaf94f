"""Legacy 32-element block types: q8_0, q4_0, q4_1, q5_0, q5_1 (reference §5.1, §5.3).

Byte-identical to ggml's `quantize_<type>`: without an imatrix the `_ref` row quantizers, with
one the `quantize_row_<type>_impl` paths (σ² over the whole row, make_qx_quants /
make_qkx3_quants). Whole tensors are processed as T-layout block groups (see numeric.py), in
chunks of about CHUNK elements to bound temporary memory.

Block layouts (little endian, `half` = IEEE fp16):
  q8_0 (34 B): half d; i8 qs[32]                          x = d*q
  q4_0 (18 B): half d; u8 qs[16]                          x = d*(q-8)
  q4_1 (20 B): half d; half m; u8 qs[16]                  x = d*q + m
  q5_0 (22 B): half d; u8 qh[4]; u8 qs[16]                x = d*(q-16)
  q5_1 (24 B): half d; half m; u8 qh[4]; u8 qs[16]        x = d*q + m
qs[j] holds element j in its low nibble and element j+16 in its high nibble; bit j of the
little-endian u32 qh is bit 4 of element j."""

from __future__ import annotations

import numpy as np

from . import register
from .fp import to_f16
from .numeric import F32, c_roundf, c_trunc_u8, first_min, make_qkx3_quants, make_qx_quants, safe_inv, signed_absmax, to_tlayout
from .numeric import pack_blocks as _pack

QK = 32
CHUNK = 1 << 18  # elements per chunk: 1 MiB float32 temporaries stay cache-friendly and avoid
# fresh mmap page faults per operation (4x faster than 4 MiB chunks here)


# ---------------------------------------------------------------- packing helpers


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(G, 32, K) values (low 4 bits used) -> (G, 16, K) qs bytes."""
    return (q[:, :16] & 15) | (q[:, 16:] << 4)


_SHIFTS = np.arange(8, dtype=np.uint8)[:, None]


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(G, 32, K) 5-bit values -> (G, 4, K) qh bytes: bit j of the LE u32 is bit 4 of element j,
    so byte b collects elements 8b..8b+7, element 8b in its lowest bit."""
    g, _, k = q.shape
    h = (q >> 4).reshape(g, 4, 8, k)  # 0 or 1 (values are < 32)
    h <<= _SHIFTS
    return np.bitwise_or.reduce(h, axis=2)


# ---------------------------------------------------------------- reference (no imatrix) kernels
# Each takes T-layout blocks t (G, 32, K) and returns the list of fields for _pack.


def _q8_0_ref(t: np.ndarray) -> list[np.ndarray]:
    amax = np.maximum(t.max(axis=1), -t.min(axis=1))
    amax += F32(0)  # MAX(0.0f, |v|) never yields -0.0
    d = amax / F32(127)
    idv = safe_inv(d)
    v = c_roundf(t * idv[:, None, :])  # roundf: half away from zero, not nearest_int
    if not np.isfinite(idv).all():  # id = inf: x86 converts inf/NaN to 0x80000000, low byte 0
        v = np.where(np.isfinite(v), v, F32(0))
    qs = v.astype(np.int8).view(np.uint8)
    return [to_f16(d), qs]


def _q4_0_like_ref(t: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0 ref: d = max / -nlev/2, q = MIN(nlev-1, (int8_t)(x*id + nlev/2 + 0.5f))."""
    half = nlev // 2
    mx = signed_absmax(t)
    d = mx / F32(-half)  # all-zero block: +0.0 / -8 = -0.0, stored as 00 80
    idv = safe_inv(d)
    v = t * idv[:, None, :]  # x*id rounded to float32 first, then + 8.5f: two roundings
    v += F32(half + 0.5)
    q = c_trunc_u8(v, ~np.isfinite(idv))
    np.minimum(q, nlev - 1, out=q)
    return d, q


def _q4_1_like_ref(t: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _q4_0_ref(t: np.ndarray) -> list[np.ndarray]:
    d, q = _q4_0_like_ref(t, 16)
    return [to_f16(d), _nibbles(q)]


def _q5_0_ref(t: np.ndarray) -> list[np.ndarray]:
    d, q = _q4_0_like_ref(t, 32)
    return [to_f16(d), _high_bits(q), _nibbles(q)]


def _q4_1_ref(t: np.ndarray) -> list[np.ndarray]:
    d, mn, q = _q4_1_like_ref(t, 16)
    return [to_f16(d), to_f16(mn), _nibbles(q)]


def _q5_1_ref(t: np.ndarray) -> list[np.ndarray]:
    d, mn, q = _q4_1_like_ref(t, 32)
    return [to_f16(d), to_f16(mn), _high_bits(q), _nibbles(q)]


# ---------------------------------------------------------------- imatrix kernels
# Each takes T-layout blocks t and weights w = qw * sqrt(σ² + x²), both (G, 32, K).


def _q4_0_imat(t: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    d, L = make_qx_quants(t, 8, w)
    return [to_f16(d), _nibbles(L)]


def _q5_0_imat(t: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    d, L = make_qx_quants(t, 16, w)
    return [to_f16(d), _high_bits(L), _nibbles(L)]


def _q4_1_imat(t: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    d, the_min, L = make_qkx3_quants(t, 15, w, -0.9, 0.05, 36, False)
    return [to_f16(d), to_f16(-the_min), _nibbles(L)]


def _q5_1_imat(t: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    d, the_min, L = make_qkx3_quants(t, 31, w, -0.9, 0.05, 36, False)
    return [to_f16(d), to_f16(-the_min), _high_bits(L), _nibbles(L)]


# ---------------------------------------------------------------- drivers


def _run_ref(rows: np.ndarray, kernel, nbytes: int) -> np.ndarray:
    n, k = rows.shape
    xb = rows.reshape(-1, QK)
    out = np.empty((xb.shape[0], nbytes), dtype=np.uint8)
    step = max(1, CHUNK // QK)
    for b0 in range(0, xb.shape[0], step):
        chunk = xb[b0 : b0 + step]
        out[b0 : b0 + len(chunk)] = _pack(len(chunk), kernel(to_tlayout(chunk)))
    return out.reshape(n, k // QK * nbytes)


def row_sigma2(x: np.ndarray) -> np.ndarray:
    """σ² = (Σ_row x², summed left to right in float32) / n_per_row, per row of (n, k)."""
    k = x.shape[1]
    sq = x * x
    total = np.add.accumulate(sq, axis=1)[:, -1]  # accumulate is strictly sequential
    return total / F32(k)


def _run_imat(rows: np.ndarray, qw: np.ndarray, kernel, nbytes: int) -> np.ndarray:
    n, k = rows.shape
    out = np.empty((n, k // QK * nbytes), dtype=np.uint8)
    step = max(1, CHUNK // k)
    for r0 in range(0, n, step):
        x = rows[r0 : r0 + step]
        s2 = row_sigma2(x)
        w = qw[None, :] * np.sqrt(s2[:, None] + x * x)
        nb = x.size // QK
        t = to_tlayout(x.reshape(nb, QK))
        tw = to_tlayout(w.reshape(nb, QK))
        out[r0 : r0 + len(x)] = _pack(nb, kernel(t, tw)).reshape(len(x), -1)
    return out


def _quantizer(ref, imat, nbytes: int):
    def quantize(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        # inf/NaN intermediates (subnormal or overflowing block ranges) are expected and handled
        # as C handles them; keep numpy quiet about them
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            if imatrix is None or imat is None:
                return _run_ref(rows, ref, nbytes)
            return _run_imat(rows, imatrix, imat, nbytes)

    return quantize


register("q8_0")(_quantizer(_q8_0_ref, None, 34))  # Q8_0 ignores the imatrix in ggml too
register("q4_0")(_quantizer(_q4_0_ref, _q4_0_imat, 18))
register("q4_1")(_quantizer(_q4_1_ref, _q4_1_imat, 20))
register("q5_0")(_quantizer(_q5_0_ref, _q5_0_imat, 22))
register("q5_1")(_quantizer(_q5_1_ref, _q5_1_imat, 24))
