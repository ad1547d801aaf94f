"""Ternary types: tq1_0 and tq2_0 (docs/llama-cpp.md §5.1, §5.3).

Byte-identical to ggml's `quantize_tq1_0` / `quantize_tq2_0` (= the `_ref` row quantizers; the
imatrix is ignored). Per 256-element block: d = max|x|, id = d ? 1/d : 0, trit = lroundf(x*id) + 1
in {0, 1, 2}, value = d*(trit-1).

Block layouts (little endian, `half` = IEEE fp16; d comes last):
  tq2_0 (66 B): u8 qs[64]; half d      qs[32c+m] bits 2n..2n+1 = trit of element 128c + 32n + m
  tq1_0 (54 B): u8 qs[48]; u8 qh[4]; half d
    qs[m]    (m < 32): trits of elements m + 32n,        n = 0..4 (elements 0..159)
    qs[32+m] (m < 16): trits of elements 160 + m + 16n, n = 0..4 (elements 160..239)
    qh[j]    (j < 4):  trits of elements 240 + j + 4n,  n = 0..3, times 3 (a 5th trit of 0)
    each byte holds v = sum trit_n * 3^(4-n) (first trit most significant) stored as
    ceil(v*256/243).

lroundf rounds half away from zero and |x*id| <= 1 (up to rounding), so trit = [v >= 0.5] +
[v > -0.5]. A subnormal d whose inverse overflows makes x*id = ±inf or NaN; glibc's lroundf then
returns LONG_MIN, and `(int)(LONG_MIN + 1)` is 1, so every trit of such a block is 1.

Blocks stay in their natural (n_blocks, 256) layout: max/min are order-independent, so the
reductions may run along the contiguous axis, and the packing reads whole 16/32-element runs."""

from __future__ import annotations

import numpy as np

from .fp import to_f16
from .numeric import F32


def _trits(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, 256) blocks -> (d (nb,) float32, trits (nb, 256) uint8 in 0..2)."""
    # max|x| on the bit patterns: for non-negative floats the integer order is the float order
    # (and an integer max reduction is several times faster); -0.0 becomes +0.0 as in C
    amax = (xb.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1).view(F32)
    idv = np.where(amax != 0, F32(1) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(F32)
    v = xb * idv[:, None]
    bad = ~np.isfinite(idv)
    if bad.any():  # lroundf(±inf or NaN) + 1 -> 1 (see module doc)
        v[bad] = 0
    t = (v >= F32(0.5)).view(np.uint8)
    t += (v > F32(-0.5)).view(np.uint8)
    return amax, t


_CEIL243 = ((np.arange(256, dtype=np.uint32) * 256 + 242) // 243).astype(np.uint8)  # valid to 242


def _horner3(u: np.ndarray) -> np.ndarray:
    """(nb, n, m) integer lanes of trit bytes -> (nb, m): sum_i u[:, i] * 3^(n-1-i), byte-parallel.

    Every byte stays <= 242, so the lane-wide *3 and + never carry into the next byte."""
    q = u[:, 0].copy()
    three = q.dtype.type(3)
    for i in range(1, u.shape[1]):
        q *= three
        q += u[:, i]
    return q


def tq1_0(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:  # ggml ignores the imatrix
    nb = xb.shape[0]
    d, t = _trits(xb)
    t64 = t.view(np.uint64)  # (nb, 32): 8 consecutive trits per lane
    v = np.empty((nb, 52), dtype=np.uint8)
    # qs[m], m < 32: elements m + 32n; lanes [n, m//8] of elements 0..159
    v[:, 0:32] = _horner3(t64[:, 0:20].reshape(nb, 5, 4)).view(np.uint8).reshape(nb, 32)
    # qs[32 + m], m < 16: elements 160 + m + 16n
    v[:, 32:48] = _horner3(t64[:, 20:30].reshape(nb, 5, 2)).view(np.uint8).reshape(nb, 16)
    # qh[j]: elements 240 + j + 4n, n = 0..3, then *3 (a 5th trit of 0)
    qh = _horner3(t.view(np.uint32)[:, 60:64].reshape(nb, 4, 1))
    qh *= np.uint32(3)
    v[:, 48:52] = qh.view(np.uint8).reshape(nb, 4)
    out = np.empty((nb, 54), dtype=np.uint8)
    _CEIL243.take(v, out=out[:, 0:52], mode="clip")  # ceil(v*256/243)
    out[:, 52:54] = to_f16(d).astype("<u2").view(np.uint8).reshape(nb, 2)
    return out


def tq2_0(xb: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = xb.shape[0]
    d, t = _trits(xb)
    # lanes of 8 trits: [chunk c, pair n, m//8]; byte m of chunk c gets element 128c + 32n + m at
    # bits 2n. Trits are <= 2, so lane-wide shifts by up to 6 stay inside each byte.
    u = t.view(np.uint64).reshape(nb, 2, 4, 4)
    q = u[:, :, 0].copy()
    for n in range(1, 4):
        q |= u[:, :, n] << np.uint64(2 * n)
    out = np.empty((nb, 66), dtype=np.uint8)
    out[:, 0:64] = q.view(np.uint8).reshape(nb, 64)
    out[:, 64:66] = to_f16(d).astype("<u2").view(np.uint8).reshape(nb, 2)
    return out
