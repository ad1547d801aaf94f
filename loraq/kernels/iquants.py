"""Non-linear 4-bit types: iq4_nl and iq4_xs (docs/llama-cpp.md §5.1, §5.3).

Byte-identical to ggml's `quantize_iq4_nl` / `quantize_iq4_xs`, which both run
`quantize_row_iq4_nl_impl(..., ntry=7)` with or without an importance matrix (the ntry=-1 `_ref`
variant is never used by llama-quantize).

Block layouts (little endian, `half` = IEEE fp16, kv = kvalues_iq4nl):
  iq4_nl (18 B, 32 el):   half d; u8 qs[16]                                     x = d*kv[q]
  iq4_xs (136 B, 256 el): half d; u16 scales_h; u8 scales_l[4]; u8 qs[128]      x = d*(ls-32)*kv[q]
qs[j] holds element j in its low nibble and element j+16 in its high nibble (per 32-element
sub-block in iq4_xs); the 6-bit sub-block code ls has its low 4 bits in scales_l[ib/2] (even ib:
low nibble) and its high 2 bits at bit 2*ib of scales_h.

Per 32-element (sub-)block the scale search is: weights w = x² (no imatrix) or
qw*sqrt(σ² + x²) with σ² = 2*Σx²/n over the (super-)block; L = best_index(x*127/max); d = Σwqx/Σwq²;
then 15 more tries with id = (itry-127)/max, keeping the d with the largest (Σwqx)²/Σwq². The
indices are recomputed at the end from the unrounded d (iq4_nl) or the unrounded d*(ls-32)
(iq4_xs).

Vectorization note (see numeric.py for the T layout): best_index_int8 is "count of midpoints
(v[i]+v[i+1])/2 that are <= x" (ties go up). The midpoints are multiples of 0.5 and C's
`x - v[i] < v[i+1] - x` is exact near them, so the index is a table lookup on floor(2x). NaN (a
NaN scale, after x² overflowed) gives 15, as in C."""

from __future__ import annotations

import numpy as np

from .fp import to_f16
from .numeric import F32, GROUP_MAX_EPS, ni, nibbles, pack_blocks, rsum, safe_inv, signed_absmax, to_tlayout, work

QK = 32
QK_K = 256
NTRY = 7

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)
_MID2 = (KVALUES[:-1] + KVALUES[1:]).astype(np.int64)  # 2 * midpoints, integers
_OFF = 300  # table covers floor(2x) in [-OFF, OFF]
_IDX = np.searchsorted(_MID2, np.arange(-_OFF, _OFF + 1), side="right").astype(np.uint8)
_QV = KVALUES[_IDX]  # the kvalue itself, for the search loop


def _best_index(x: np.ndarray, idv: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues, id*x) for T-layout x with per-block id (G, K), any id."""
    a, ib = work("iq_a", x.shape), work("iq_ib", x.shape, np.intp)
    np.multiply(x, idv[:, None, :], out=a)  # id*x rounded first, then the exact *2
    np.multiply(a, F32(2), out=a)
    np.floor(a, out=a)
    np.clip(a, F32(-_OFF), F32(_OFF), out=a)
    nan = np.isnan(a)
    if nan.any():  # best_index_int8(NaN) falls through every test: 15 (id = NaN from d = NaN)
        a[nan] = F32(_OFF)
    np.add(a, F32(_OFF), out=a)
    np.copyto(ib, a, casting="unsafe")
    return _IDX.take(ib, mode="clip")


def _search(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-block scale of quantize_row_iq4_nl_impl (ntry = 7) for T-layout blocks (G, 32, K)."""
    mx = signed_absmax(x)  # first element of largest |x|, +0.0 for an all-zero block
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)  # placeholder; those blocks get scale 0
    v0 = KVALUES[0]
    a, q, wq = (work(n, x.shape) for n in ("iq_a", "iq_q", "iq_wq"))
    ib = work("iq_ib", x.shape, np.intp)
    off = F32(_OFF)

    def sums(idv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # |id*x| <= 134 here, so doubling id instead of id*x is exact (underflow only moves
        # values that index 8 either way) and no clipping is needed
        np.multiply(x, (idv * F32(2))[:, None, :], out=a)
        np.floor(a, out=a)
        np.add(a, off, out=a)
        np.copyto(ib, a, casting="unsafe")  # exact: a holds small non-negative integers
        _QV.take(ib, out=q, mode="clip")
        np.multiply(w, q, out=wq)
        np.multiply(q, wq, out=q)  # w*q*q as C groups it: (w*q)*q
        np.multiply(wq, x, out=wq)  # (w*q)*x
        return rsum(wq), rsum(q)

    d = -mx / v0
    sumqx, sumq2 = sums(F32(1) / d)
    pos = sumq2 > 0
    d = np.where(pos, sumqx / np.where(pos, sumq2, F32(1)), F32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(F32(itry + v0) / mx)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if take.any():
            nd = sumqx / np.where(take, sumq2, F32(1))
            d = np.where(take, nd, d)
            best = np.where(take, nd * sumqx, best)
    d[zero] = 0
    return d.astype(F32, copy=False)


# ---------------------------------------------------------------- T layout plumbing


def _gk(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-block vector (nb,) -> (G, K) in to_tlayout's block order (block g*K + k)."""
    g, k = shape
    out = np.zeros(g * k, dtype=v.dtype)
    out[: v.shape[0]] = v
    return out.reshape(g, k)


def _flat(v: np.ndarray, nb: int) -> np.ndarray:
    """(G, K) per-block values -> (nb,) in block order."""
    return v.reshape(-1)[:nb]


def _weights(t: np.ndarray, s2: np.ndarray | None, qwt: np.ndarray | None) -> np.ndarray:
    """w = x*x, or qw*sqrtf(σ² + x*x) with σ² per block (G, K)."""
    xx = t * t
    if s2 is None or qwt is None:
        return xx
    xx += s2[:, None, :]
    np.sqrt(xx, out=xx)
    xx *= qwt
    return xx


# ---------------------------------------------------------------- kernels


def iq4_nl(xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    """(nb, 32) blocks (+ their imatrix slices) -> (nb, 18) bytes."""
    nb = xb.shape[0]
    t = to_tlayout(xb)
    s2 = qwt = None
    if qwb is not None:
        s2 = rsum(t * t) * F32(2.0 / QK)  # sigma2 *= 2.f/32 (exact)
        qwt = to_tlayout(qwb)
    d = _search(t, _weights(t, s2, qwt))
    L = _best_index(t, safe_inv(d))  # from the unrounded d
    return pack_blocks(nb, [to_f16(d), nibbles(L)])


def iq4_xs(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 136) bytes."""
    ns = xs.shape[0]
    nsub = ns * 8
    t = to_tlayout(xs.reshape(nsub, QK))
    gk = t.shape[0], t.shape[2]
    s2 = qwt = None
    if qws is not None:
        ts = to_tlayout(xs)  # super-blocks in T layout: sigma2 is a left-to-right sum over 256
        s2s = _flat(rsum(ts * ts), ns) * F32(2.0 / QK_K)  # sigma2 *= 2.f/256 (exact)
        s2 = _gk(np.repeat(s2s, 8), gk)
        qwt = to_tlayout(qws.reshape(nsub, QK))
    scales = _flat(_search(t, _weights(t, s2, qwt)), nsub).reshape(ns, 8)
    # max_scale: the C loop `if (fabsf(d) > amax_scale)` from 0: first of largest |.|, +0.0 if
    # none, and a NaN scale (x² overflowed) is never taken
    amax_scale = np.zeros(ns, dtype=F32)
    max_scale = np.zeros(ns, dtype=F32)
    for ib in range(8):
        a = np.abs(scales[:, ib])
        take = a > amax_scale
        amax_scale = np.where(take, a, amax_scale)
        max_scale = np.where(take, scales[:, ib], max_scale)
    d = -max_scale / F32(32)  # all-zero super-block: -0.0 (stored 00 80)
    idv = safe_inv(d)
    l = np.clip(ni(idv[:, None] * scales), F32(-32), F32(31))
    dl = d[:, None] * l
    idl = safe_inv(dl)
    L = _best_index(t, _gk(idl.reshape(-1), gk))
    qs = pack_blocks(nsub, [nibbles(L)]).reshape(ns, 128)

    code = (l + F32(32)).astype(np.uint8)  # (ns, 8) in 0..63
    scales_l = (code[:, 0::2] & 15) | ((code[:, 1::2] & 15) << 4)
    sh = (code >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))
    scales_h = np.bitwise_or.reduce(sh, axis=1).astype("<u2")

    out = np.empty((ns, 136), dtype=np.uint8)
    out[:, 0:2] = to_f16(d).astype("<u2").view(np.uint8).reshape(ns, 2)
    out[:, 2:4] = scales_h.view(np.uint8).reshape(ns, 2)
    out[:, 4:8] = scales_l
    out[:, 8:] = qs
    return out
