"""Ternary types: tq1_0 and tq2_0 (reference §5.1, §5.3).

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

from . import register
from .fp import to_f16
from .numeric import F32

QK_K = 256
CHUNK = 1 << 16  # elements per chunk: temporaries stay in L2


def _trits(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, 256) blocks -> (d (nb,) float32, trits (nb, 256) uint8 in 0..2)."""
    # max|x| on the bit patterns: for non-negative floats the integer order is the float order
    # (and an integer max reduction is several times faster); -0.0 becomes +0.0 as in C
    amax = (xb.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1).view(F32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idv = np.where(amax != 0, F32(1) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(F32)
        v = xb * idv[:, None]
    bad = ~np.isfinite(idv)
    if bad.any():  # lroundf(±inf or NaN) + 1 -> 1 (see module doc)
        v[bad] = 0
    t = (v >= F32(0.5)).view(np.uint8)
    t += (v > F32(-0.5)).view(np.uint8)
    return amax, t


def _ceil243(v: np.ndarray) -> np.ndarray:
    """uint8 v (0..242) -> ((uint16)v*256 + 242) / 243, as uint8."""
    return ((v.astype(np.uint16) << 8) + np.uint16(242)) // np.uint16(243)


def _base3(t: np.ndarray) -> np.ndarray:
    """(nb, n, m) trits -> (nb, m) sum_n t[:, n] * 3^(n_last - n), in uint8 (at most 242)."""
    q = t[:, 0].copy()
    for i in range(1, t.shape[1]):
        q *= np.uint8(3)
        q += t[:, i]
    return q


def _tq1_0_chunk(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    d, t = _trits(xb)
    out = np.empty((nb, 54), dtype=np.uint8)
    out[:, 0:32] = _ceil243(_base3(t[:, :160].reshape(nb, 5, 32)))
    out[:, 32:48] = _ceil243(_base3(t[:, 160:240].reshape(nb, 5, 16)))
    qh = _base3(t[:, 240:].reshape(nb, 4, 4))
    qh *= np.uint8(3)  # the missing 5th trit is 0: the first one lands on the top trit
    out[:, 48:52] = _ceil243(qh)
    out[:, 52:54] = to_f16(d).astype("<u2").view(np.uint8).reshape(nb, 2)
    return out


def _tq2_0_chunk(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    d, t = _trits(xb)
    t = t.reshape(nb, 2, 4, 32)  # (chunk c, pair n, byte m)
    q = t[:, :, 0].copy()
    for n in range(1, 4):
        q |= t[:, :, n] << np.uint8(2 * n)
    out = np.empty((nb, 66), dtype=np.uint8)
    out[:, 0:64] = q.reshape(nb, 64)
    out[:, 64:66] = to_f16(d).astype("<u2").view(np.uint8).reshape(nb, 2)
    return out


def _quantizer(nbytes: int, kernel):
    def quantize(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:  # imatrix unused
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n, k = rows.shape
        xb = rows.reshape(-1, QK_K)
        out = np.empty((xb.shape[0], nbytes), dtype=np.uint8)
        step = max(1, CHUNK // QK_K)
        for b0 in range(0, xb.shape[0], step):
            out[b0 : b0 + step] = kernel(xb[b0 : b0 + step])
        return out.reshape(n, k // QK_K * nbytes)

    return quantize


register("tq1_0")(_quantizer(54, _tq1_0_chunk))
register("tq2_0")(_quantizer(66, _tq2_0_chunk))
