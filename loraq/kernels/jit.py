"""Compiled (numba) versions of the hottest scale search, used when numba is installed.

make_qkx2_quants (q4_K / q5_K / q2_K without an imatrix) runs 22 candidate scales per sub-block;
in numpy every candidate is ~16 passes over the chunk (subtract, multiply, round, clip, three
products and sums, the error's five operations and its sum), which keeps the K types slower
than llama.cpp's scalar C. Here each candidate is two fused loops over a group's (n, K) tile,
in L1, with the K lanes (independent blocks) innermost so LLVM vectorizes across blocks.

Parity with ggml (and with numeric.QkxResult, which stays the reference and the fallback):
float32 everywhere, in the C order of operations; no fastmath (no FMA contraction, no
reassociation: each lane's sums are sequential in j); error_model "numpy" so x/0 is inf as in C;
nearest_int is np.rint while |v| is below 2^22 - 1 for every lane of the group (as QkxResult
checks), else the exact bit trick."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .fp import to_f16
from .numeric import QkxResult, QxResult

F32 = np.float32


def _qkx2_search(x, w, nmax, rmin, rdelta, nstep, use_mad, L, scale_out, min_out):  # pragma: no cover - compiled
    """make_qkx2_quants for T-layout sub-blocks x, w (B, n, K) float32. Writes the chosen L
    (B, n, K) uint8 (0 for max == min blocks), the scale and the_min = -min (B, K)."""
    B, n, K = x.shape
    fn = np.float32(nmax)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    magic = np.float32(12582912.0)
    safe = np.float32(4194303.0)
    mn = np.empty(K, np.float32)
    mx = np.empty(K, np.float32)
    sum_w = np.empty(K, np.float32)
    sum_x = np.empty(K, np.float32)
    cur_min = np.empty(K, np.float32)
    isc = np.empty(K, np.float32)
    scale = np.empty(K, np.float32)
    best = np.empty(K, np.float32)
    sl = np.empty(K, np.float32)
    sl2 = np.empty(K, np.float32)
    sxl = np.empty(K, np.float32)
    t_scale = np.empty(K, np.float32)
    t_min = np.empty(K, np.float32)
    cur = np.empty(K, np.float32)
    take = np.empty(K, np.bool_)
    deg = np.empty(K, np.bool_)
    la = np.empty((n, K), np.float32)
    bits = np.empty(1, np.float32)
    ibits = bits.view(np.int32)
    for b in range(B):
        finite = True
        for k in range(K):
            v = x[b, 0, k]
            mn[k] = v
            mx[k] = v
            sum_w[k] = w[b, 0, k]
            sum_x[k] = w[b, 0, k] * v
            if v - v != zero:
                finite = False
        for j in range(1, n):
            for k in range(K):
                v = x[b, j, k]
                if v < mn[k]:
                    mn[k] = v
                if v > mx[k]:
                    mx[k] = v
                ww = w[b, j, k]
                sum_w[k] += ww
                sum_x[k] += ww * v
                if v - v != zero:  # inf or NaN: only the exact nearest_int will do
                    finite = False
        for k in range(K):
            if mn[k] > zero:
                mn[k] = zero
            deg[k] = mx[k] == mn[k]
            cur_min[k] = mn[k]
            isc[k] = fn / (mx[k] - mn[k])
            scale[k] = one / isc[k]
            best[k] = zero
        for step in range(-1, nstep + 1):
            if step >= 0:
                c = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + fn
                for k in range(K):
                    isc[k] = c / (mx[k] - cur_min[k])
            # rint equals nearest_int while |isc*(x - cur_min)| <= 2^22 - 1 in every lane
            fast = finite
            for k in range(K):
                hi = isc[k] * (mx[k] - cur_min[k])
                lo = isc[k] * (cur_min[k] - mn[k])
                if not (hi <= safe and lo <= safe and isc[k] >= zero):
                    fast = False
            for k in range(K):
                sl[k] = zero
                sl2[k] = zero
                sxl[k] = zero
            for j in range(n):
                if fast:  # (v + 1.5*2^23) - 1.5*2^23 rounds half to even, as rint, and vectorizes
                    for k in range(K):
                        v = isc[k] * (x[b, j, k] - cur_min[k])
                        q = (v + magic) - magic
                        la[j, k] = min(max(q, zero), fn)
                else:
                    for k in range(K):
                        v = isc[k] * (x[b, j, k] - cur_min[k])
                        bits[0] = v + magic
                        q = np.float32((ibits[0] & 0x7FFFFF) - 0x400000)
                        la[j, k] = min(max(q, zero), fn) + zero  # int l: never -0.0
                for k in range(K):
                    q = la[j, k]
                    ww = w[b, j, k]
                    wl = ww * q
                    sl[k] += wl
                    sl2[k] += wl * q
                    sxl[k] += wl * x[b, j, k]
            if step < 0:  # the first guess: its error is the one to beat, its L the default
                for k in range(K):
                    t_scale[k] = scale[k]
                    t_min[k] = mn[k]
                    take[k] = True
            else:
                for k in range(K):
                    det = sum_w[k] * sl2[k] - sl[k] * sl[k]
                    ts = (sum_w[k] * sxl[k] - sum_x[k] * sl[k]) / det
                    tm = (sl2[k] * sum_x[k] - sl[k] * sxl[k]) / det
                    if tm > zero:
                        tm = zero
                        ts = sxl[k] / sl2[k]
                    t_scale[k] = ts
                    t_min[k] = tm
                    take[k] = det > zero
            for k in range(K):
                cur[k] = zero
            for j in range(n):
                if use_mad:
                    for k in range(K):
                        diff = t_scale[k] * la[j, k] + t_min[k] - x[b, j, k]
                        cur[k] += w[b, j, k] * abs(diff)
                else:
                    for k in range(K):
                        diff = t_scale[k] * la[j, k] + t_min[k] - x[b, j, k]
                        cur[k] += w[b, j, k] * (diff * diff)
            for k in range(K):
                if step < 0:
                    best[k] = cur[k]
                elif take[k] and cur[k] < best[k]:
                    best[k] = cur[k]
                    scale[k] = t_scale[k]
                    cur_min[k] = t_min[k]
                else:
                    take[k] = False
            for j in range(n):
                for k in range(K):
                    if take[k]:
                        L[b, j, k] = np.uint8(la[j, k])
        for k in range(K):
            if deg[k]:
                scale_out[b, k] = zero
                min_out[b, k] = -mn[k]
                for j in range(n):
                    L[b, j, k] = 0
            else:
                scale_out[b, k] = scale[k]
                min_out[b, k] = -cur_min[k]


def _nearest_clamped(v, exact, lo, hi, bits, ibits):  # pragma: no cover - compiled
    """make_qx_quants' `MAX(-nmax, MIN(nmax-1, nearest_int(v)))` as float32: np.rint when v is
    bounded (not `exact`), else ggml's bit trick through the caller's one-float scratch `bits`
    (`ibits` its int32 view), exact for huge, inf and NaN v."""
    if exact:
        bits[0] = v + np.float32(12582912.0)
        q = np.float32((ibits[0] & 0x7FFFFF) - 0x400000)
    else:
        q = np.rint(v)
    if q < lo:
        return lo
    if q > hi:
        return hi
    return q


def _qx_search(x, w, has_w, nmax, exact, L, scale_out):  # pragma: no cover - compiled
    """make_qx_quants(n, nmax, x, L, rmse_type 1, w) for T-layout blocks x (B, n, K); w the
    weights, or (has_w False) x*x. Writes L (B, n, K) uint8 in [0, 2*nmax-1] and the scale (B, K),
    both 0 where max |x| < 1e-15. As numeric.QxResult: np.rint while `exact` is False (|iscale*x|
    <= nmax + 0.9 by construction), ggml's bit trick (NaN -> 0) when x may hold NaN."""
    B, n, K = x.shape
    fn = np.float32(nmax)
    zero = np.float32(0.0)
    lo = -fn
    hi = fn - np.float32(1.0)
    eps = np.float32(1e-15)
    amax = np.empty(K, np.float32)
    mx = np.empty(K, np.float32)
    isc = np.empty(K, np.float32)
    best_is = np.empty(K, np.float32)
    scale = np.empty(K, np.float32)
    best = np.empty(K, np.float32)
    slx = np.empty(K, np.float32)
    sl2 = np.empty(K, np.float32)
    bits = np.empty(1, np.float32)
    ibits = bits.view(np.int32)
    for b in range(B):
        for k in range(K):  # signed value of the first largest |x| (NaN never wins)
            amax[k] = zero
            mx[k] = zero
        for j in range(n):
            for k in range(K):
                v = x[b, j, k]
                if abs(v) > amax[k]:
                    amax[k] = abs(v)
                    mx[k] = v
        for k in range(K):
            if abs(mx[k]) < eps:
                mx[k] = np.float32(1.0)
                amax[k] = zero  # marks an all-zero block
            else:
                amax[k] = np.float32(1.0)
        for step in range(-10, 10):
            if step == 0:
                continue
            for k in range(K):
                if step == -10:
                    isc[k] = -fn / mx[k]
                else:
                    isc[k] = -(fn + np.float32(0.1) * np.float32(step)) / mx[k]
                slx[k] = zero
                sl2[k] = zero
            for j in range(n):
                for k in range(K):
                    xv = x[b, j, k]
                    v = xv * isc[k]
                    q = _nearest_clamped(v, exact, lo, hi, bits, ibits)
                    ww = w[b, j, k] if has_w else xv * xv
                    slx[k] += (ww * xv) * q
                    sl2[k] += (ww * q) * q
            for k in range(K):
                if step == -10:
                    scale[k] = slx[k] / sl2[k] if sl2[k] != zero else zero
                    best[k] = scale[k] * slx[k]
                    best_is[k] = isc[k]
                elif sl2[k] > zero and slx[k] * slx[k] > best[k] * sl2[k]:
                    scale[k] = slx[k] / sl2[k]
                    best[k] = scale[k] * slx[k]
                    best_is[k] = isc[k]
        for j in range(n):
            for k in range(K):
                v = x[b, j, k] * best_is[k]
                q = _nearest_clamped(v, exact, lo, hi, bits, ibits)
                L[b, j, k] = np.uint8(q + fn) if amax[k] != zero else np.uint8(0)
        for k in range(K):
            scale_out[b, k] = scale[k] if amax[k] != zero else zero


def _f16_tile(h, out):  # pragma: no cover - compiled
    """IEEE fp16 bits h (n,) uint16 -> float32 out (n,), exactly as numpy's cast (NaN payloads
    kept); False when a value is inf or NaN. Two loops LLVM vectorizes on AVX2 too: the integer
    bits of every value (exponent rebiased, sign moved), then subnormals (and zeros) as an exact
    float product, chosen by a select. Each loop writes through one view only: one loop writing
    both the float and the integer view of `out`, or storing only where a branch is taken, stays
    scalar without AVX-512's masked stores (6.3 ns a value on an AVX2 EPYC, against 0.9)."""
    ob = out.view(np.uint32)
    bad = np.uint32(0)
    for i in range(h.size):
        v = np.uint32(h[i])
        em = v & np.uint32(0x7FFF)
        bad |= em + np.uint32(0x400)  # bit 15 set: em >= 0x7C00, inf or NaN
        b = (em << np.uint32(13)) + np.uint32(0x38000000)  # exponent + (127 - 15)
        b = b + np.uint32(0x38000000) if em >= np.uint32(0x7C00) else b  # inf / NaN: exponent all ones
        ob[i] = b | ((v & np.uint32(0x8000)) << np.uint32(16))
    for i in range(h.size):
        v = np.uint32(h[i])
        em = v & np.uint32(0x7FFF)
        s = np.float32(np.int32(em)) * np.float32(5.9604645e-08)  # em * 2^-24
        s = -s if v & np.uint32(0x8000) else s
        out[i] = s if em < np.uint32(0x400) else out[i]
    return bad & np.uint32(0x8000) == np.uint32(0)


def _f16_bits_to_f32(h, out):  # pragma: no cover - compiled
    """_f16_tile over the whole of h, in L1-sized tiles so its second loop finds them cached."""
    for i0 in range(0, h.size, 4096):
        _f16_tile(h[i0 : i0 + 4096], out[i0 : i0 + 4096])


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
    xi = x.view(np.int32)
    t = np.empty(16, np.float32)
    d = np.empty(S, np.float32)
    db = d.view(np.uint32)
    half = np.float32(0.49999997)  # roundf(v) = sign(v) * trunc(|v| + 0.49999997f), see c_roundf
    for b0 in range(0, nb, S):
        hs = h[b0 * 32 : (b0 + S) * 32]
        os = out[b0 * 34 : (b0 + S) * 34]
        n = hs.size // 32
        if not _f16_tile(hs, x[: hs.size]):
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
    tp = np.empty(16, np.float32)
    tn = np.empty(16, np.float32)
    d = np.empty(S, np.float32)
    db = d.view(np.uint32)
    bias = np.float32(8.5)
    for b0 in range(0, nb, S):
        hs = h[b0 * 32 : (b0 + S) * 32]
        os = out[b0 * 18 : (b0 + S) * 18]
        n = hs.size // 32
        if not _f16_tile(hs, x[: hs.size]):
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


def _absmax_bits(xi, m):  # pragma: no cover - compiled
    """Per block of the int32 view xi (nb, n), the bits of its largest |x| into m (nb,): for
    non-negative floats the integer order is the float order, and an integer max vectorizes (a
    float one does not, without fastmath). At or above 0x7F800000 a block holds inf or NaN."""
    for b in range(xi.shape[0]):
        mb = np.int32(0)
        for j in range(xi.shape[1]):
            a = xi[b, j] & np.int32(0x7FFFFFFF)
            mb = a if a > mb else mb
        m[b] = mb


def _inverse(d, idv):  # pragma: no cover - compiled
    """`id = d ? 1.0f/d : 0.0f` per block; False when one overflows (subnormal d)."""
    ok = True
    for b in range(d.shape[0]):
        v = np.float32(1.0) / d[b] if d[b] != np.float32(0.0) else np.float32(0.0)
        ok &= v - v == np.float32(0.0)
        idv[b] = v
    return ok


def _q8_0_rows(x, xi, d_out, out):  # pragma: no cover - compiled
    """quantize_row_q8_0_ref for finite blocks x (nb, 32) (xi: its int32 view): d = amax/127
    into d_out, the roundf'ed int8 quants into out[:, 2:34]. Each phase runs over all blocks, so
    LLVM vectorizes it. Returns False, with out unfinished, when a block needs the numpy kernel
    (a non-finite value, or an inverse scale that overflows)."""
    nb = x.shape[0]
    half = np.float32(0.49999997)  # roundf as trunc(v + copysign(0.49999997f, v)), see c_roundf
    m = np.empty(nb, np.int32)
    _absmax_bits(xi, m)
    for b in range(nb):
        if m[b] >= np.int32(0x7F800000):
            return False
    amax = m.view(np.float32)
    for b in range(nb):
        d_out[b] = amax[b] / np.float32(127.0)
    idv = amax  # reused: amax is no longer needed
    if not _inverse(d_out, idv):
        return False
    for b in range(nb):
        s = idv[b]
        for j in range(32):
            v = x[b, j] * s
            out[b, 2 + j] = np.int8(np.int32(v + np.copysign(half, v)))
    return True


def _q4_0_rows(x, xi, d_out, out):  # pragma: no cover - compiled
    """quantize_row_q4_0_ref for finite blocks x (nb, 32): d = max/-8 (max the signed value of
    the first largest |x|) into d_out, the nibbles into out[:, 2:18]; x*id is rounded to float32
    before + 8.5f (no FMA, as ggml). False as in _q8_0_rows."""
    nb = x.shape[0]
    bias = np.float32(8.5)
    m = np.empty(nb, np.int32)
    for b in range(nb):
        # The signed value of the first largest |x| (C: `if (amax < fabsf(v))`): the largest
        # positive and the largest negative magnitude as integer maxima of the bits (they
        # vectorize); only a tie between +a and -a needs the first occurrence.
        p = np.int32(0)
        n = np.int32(0)
        for j in range(32):
            v = xi[b, j]
            pv = v if v >= 0 else np.int32(0)
            nv = v & np.int32(0x7FFFFFFF) if v < 0 else np.int32(0)
            p = pv if pv > p else p
            n = nv if nv > n else n
        if p >= np.int32(0x7F800000) or n >= np.int32(0x7F800000):
            return False
        if p > n:
            m[b] = p
        elif n > p:
            m[b] = n | np.int32(-2147483648)
        elif p == 0:  # nothing above 0: +0.0, the C loop's initial max
            m[b] = 0
        else:
            for j in range(32):
                if xi[b, j] & np.int32(0x7FFFFFFF) == p:
                    m[b] = xi[b, j]
                    break
    mx = m.view(np.float32)
    for b in range(nb):
        d_out[b] = mx[b] / np.float32(-8.0)
    idv = m.view(np.float32)  # reused
    if not _inverse(d_out, idv):
        return False
    for b in range(nb):
        s = idv[b]
        for j in range(16):
            q0 = min(np.int32(15), np.int32(x[b, j] * s + bias))
            q1 = min(np.int32(15), np.int32(x[b, j + 16] * s + bias))
            out[b, 2 + j] = np.uint8(q0 | (q1 << 4))
    return True


def f16_to_f32(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """fp16 bits (any shape, uint16) -> float32 of that shape (into `out`, C-contiguous float32
    of h's size, when given), compiled; None without numba."""
    kern = compiled(_f16_bits_to_f32)
    if kern is None:
        return None
    h = np.ascontiguousarray(h)
    if out is None:
        out = np.empty(h.shape, F32)
    elif out.dtype != F32 or not out.flags.c_contiguous or out.size != h.size:
        # the kernel writes h.size values without bounds checks; a reshaped copy would lose them
        raise ValueError(f"out must be C-contiguous float32 of {h.size} values, got {out.dtype} {out.shape}")
    kern(h.reshape(-1), out.reshape(-1))
    return out


def _legacy(kern_fn: Callable[..., Any], xb: np.ndarray, nbytes: int) -> np.ndarray | None:
    kern = compiled(kern_fn)
    if kern is None:
        return None
    xb = np.ascontiguousarray(xb, F32)
    nb = xb.shape[0]
    out = np.empty((nb, nbytes), np.uint8)
    d = np.empty(nb, F32)
    if not kern(xb, xb.view(np.int32), d, out):
        return None
    out[:, :2] = to_f16(d).view(np.uint8).reshape(nb, 2)
    return out


def q8_0(xb: np.ndarray) -> np.ndarray | None:
    """q8_0 blocks (nb, 34) of blocks xb (nb, 32), compiled; None where the numpy kernel must
    answer (no numba, or a block with a non-finite value or an overflowing inverse scale)."""
    return _legacy(_q8_0_rows, xb, 34)


def q4_0(xb: np.ndarray) -> np.ndarray | None:
    """q4_0 blocks (nb, 18), as q8_0."""
    return _legacy(_q4_0_rows, xb, 18)


def _q8_0_act(x, xi, out, d, di):  # pragma: no cover - compiled
    """Activations x (rows, k) through ggml's quantize_row_q8_0 and back (engine.round_activations
    'q8_0'): per 32-block id = 127/amax, rint(x·id)·fp16(amax/127). d (2·k/32,) float32 is scratch,
    di its int32 view: a row's amax bits, then its fp16-rounded scales, rounded on the bit pattern
    in place (11 significant bits, nearest even, as engine.round_f16; below 2^-14 a 2^-24 step).
    False, out unfinished, when a block holds inf/NaN or amax/127 is no finite fp16 (the numpy
    version answers)."""
    n, k = x.shape
    nb = k // 32
    t = np.empty(8, np.int32)
    m = np.int32(0x7FFFFFFF)
    for r in range(n):
        xir = xi[r]
        for b in range(nb):
            # the block's largest |x| bits as a tree of elementwise maxima: LLVM leaves a 32-term
            # running maximum scalar (1.0 ns a value on an AVX2 EPYC, against 0.4)
            xs = xir[b * 32 : b * 32 + 32]
            for j in range(8):
                a0 = xs[j] & m
                a1 = xs[j + 8] & m
                a2 = xs[j + 16] & m
                a3 = xs[j + 24] & m
                a0 = a0 if a0 > a1 else a1
                a2 = a2 if a2 > a3 else a3
                t[j] = a0 if a0 > a2 else a2
            for w in (4, 2, 1):
                for j in range(w):
                    t[j] = t[j] if t[j] > t[j + w] else t[j + w]
            di[b] = t[0]
        for b in range(nb):
            if di[b] >= np.int32(0x7F800000):
                return False
            a = d[b]
            d[nb + b] = np.float32(127.0) / a if a != np.float32(0.0) else np.float32(0.0)
            dd = a / np.float32(127.0)
            if dd >= np.float32(65520.0):
                return False
            if dd < np.float32(6.1035156e-05):
                d[b] = np.float32(np.rint(dd * np.float32(16777216.0))) * np.float32(5.9604645e-08)
            else:
                d[b] = dd
                u = di[b]
                di[b] = (u + (np.int32(0xFFF) + ((u >> np.int32(13)) & np.int32(1)))) & np.int32(-8192)
        for b in range(nb):
            s = d[nb + b]
            dv = d[b]
            for j in range(32):
                out[r, b * 32 + j] = np.rint(x[r, b * 32 + j] * s) * dv
    return True


def _round_rows(fn: Any, x: np.ndarray, *scratch: np.ndarray) -> np.ndarray | None:
    """Activations x (rows, k) rounded through the compiled `fn` (x, its int32 view, out,
    *scratch); None without numba or when the kernel hands the call to numpy (inf/NaN)."""
    kern = compiled(fn)
    if kern is None:
        return None
    x = np.ascontiguousarray(x, F32)
    out = np.empty_like(x)
    return out if kern(x, x.view(np.int32), out, *scratch) else None


def q8_0_activations(x: np.ndarray) -> np.ndarray | None:
    """engine.round_activations(x, 'q8_0') compiled, for (rows, k) float32 with k % 32 == 0; None
    without numba or where the numpy version must answer."""
    d = np.empty(2 * (x.shape[1] // 32), F32)  # scratch: no allocation per block in the kernel
    return _round_rows(_q8_0_act, x, d, d.view(np.int32))


def _round_f16(x, xu, out, ou):  # pragma: no cover - compiled
    """engine.round_f16 on flat float32 x (xu its uint32 view) into out (ou): the bits rounded to
    11 significant bits, nearest even (a carry moves into the exponent), ±inf from 65520 up, NaN
    kept; then, where |x| < 2^-14, F16's fixed 2^-24 step: rint(x·2^24)·2^-24, exact in float32.
    Two loops, each writing one view, as _f16_tile (one loop mixing them stays scalar on AVX2)."""
    for i in range(xu.size):
        u = xu[i]
        a = u & np.uint32(0x7FFFFFFF)
        r = (u + (np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1)))) & np.uint32(0xFFFFE000)
        r = (u & np.uint32(0x80000000)) | np.uint32(0x7F800000) if a >= np.uint32(0x477FF000) else r  # 65520.0f
        ou[i] = u if a > np.uint32(0x7F800000) else r  # NaN
    for i in range(x.size):
        v = x[i]
        s = np.rint(v * np.float32(16777216.0)) * np.float32(5.9604645e-08)
        out[i] = s if abs(v) < np.float32(6.1035156e-05) else out[i]


def round_f16(x: np.ndarray) -> np.ndarray | None:
    """engine.round_f16(x) compiled (a new C-contiguous float32 array); None without numba."""
    kern = compiled(_round_f16)
    if kern is None:
        return None
    x = np.ascontiguousarray(x, F32)
    out = np.empty_like(x)
    xf, of = x.reshape(-1), out.reshape(-1)
    kern(xf, xf.view(np.uint32), of, of.view(np.uint32))
    return out


def _q8_0_deq(b, d, out):  # pragma: no cover - compiled
    """q8_0 blocks b (nb, 34) with their scales d (nb,) float32 -> out (nb, 32) = d·q."""
    for i in range(b.shape[0]):
        s = d[i]
        for j in range(32):
            out[i, j] = s * np.float32(np.int8(b[i, 2 + j]))


def _dequantize_32(fn: Any, blocks: np.ndarray, out: np.ndarray | None) -> np.ndarray | None:
    """Blocks of 32 weights led by an fp16 scale d -> (nb, 32) float32 (into `out` when given)
    through the compiled `fn` (b, d, out); None without numba."""
    kern = compiled(fn)
    if kern is None:
        return None
    blocks = np.ascontiguousarray(blocks)
    d = blocks[:, :2].copy().view(np.float16).astype(F32).reshape(-1)
    if out is None:
        out = np.empty((blocks.shape[0], 32), F32)
    kern(blocks, d, out)
    return out


def q8_0_dequantize(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """q8_0 blocks (nb, 34) uint8 -> (nb, 32) float32 as dequantize_row_q8_0; None without numba."""
    return _dequantize_32(_q8_0_deq, blocks, out)


def _q5_0_deq(b, d, out):  # pragma: no cover - compiled
    """q5_0 blocks b (nb, 22) with their scales d (nb,) float32 -> out (nb, 32) = d·(q − 16): the
    low 4 bits of element j (j < 16) are qs[j] & 15, of element j + 16 qs[j] >> 4, the fifth bit
    is bit j of the little-endian u32 qh."""
    for i in range(b.shape[0]):
        s = d[i]
        qh = np.uint32(b[i, 2]) | (np.uint32(b[i, 3]) << 8) | (np.uint32(b[i, 4]) << 16) | (np.uint32(b[i, 5]) << 24)
        for j in range(16):
            q = b[i, 6 + j]
            lo = np.int32(q & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
            out[i, j] = s * np.float32(lo - 16)
            out[i, j + 16] = s * np.float32(hi - 16)


def q5_0_dequantize(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """q5_0 blocks (nb, 22) uint8 -> (nb, 32) float32 as dequantize_row_q5_0; None without numba."""
    return _dequantize_32(_q5_0_deq, blocks, out)


def _q8_k_act(x, xi, out):  # pragma: no cover - compiled
    """Activations x (rows, k) through quantize_row_q8_K_ref and back (engine.round_activations
    'q8_k'): per 256-block the signed value of the first largest |x|, iscale = −127/max,
    min(127, rint(iscale·x))·(1/iscale). False, out unfinished, on inf/NaN (numpy answers)."""
    n, k = x.shape
    for r in range(n):
        for b in range(k // 256):
            o = b * 256
            mb = np.int32(-1)
            at = o
            for j in range(o, o + 256):
                a = xi[r, j] & np.int32(0x7FFFFFFF)
                if a > mb:
                    mb = a
                    at = j
            if mb >= np.int32(0x7F800000):
                return False
            mx = x[r, at]
            if mx == np.float32(0.0):
                for j in range(o, o + 256):
                    out[r, j] = np.float32(0.0)
                continue
            iscale = np.float32(-127.0) / mx
            d = np.float32(1.0) / iscale
            for j in range(o, o + 256):
                out[r, j] = min(np.rint(x[r, j] * iscale), np.float32(127.0)) * d
    return True


def q8_k_activations(x: np.ndarray) -> np.ndarray | None:
    """engine.round_activations(x, 'q8_k') compiled, for (rows, k) float32 with k % 256 == 0; None
    without numba or where the numpy version must answer."""
    return _round_rows(_q8_k_act, x)


def _rope_rows(x, cos, sin, out, n_rot, neox):  # pragma: no cover - compiled
    """x (G, T, H, D), any strides -> out (G, T, H, D): pairs (2i, 2i+1), or (i, i + n_rot/2) when
    neox, rotated by position t's cos/sin (T, n_rot/2); dimensions from n_rot on copied."""
    G, T, H, D = x.shape
    half = n_rot // 2
    for g in range(G):
        for t in range(T):
            for h in range(H):
                for i in range(half):
                    a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                    x0 = x[g, t, h, a]
                    x1 = x[g, t, h, b]
                    c = cos[t, i]
                    s = sin[t, i]
                    out[g, t, h, a] = x0 * c - x1 * s
                    out[g, t, h, b] = x0 * s + x1 * c
                for j in range(n_rot, D):
                    out[g, t, h, j] = x[g, t, h, j]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int, neox: bool) -> np.ndarray | None:
    """engine's RoPE (float32 x (G, T, H, D), cos/sin (T, n_rot/2)) in one compiled pass over a
    strided view, without numpy's four temporaries; None without numba."""
    kern = compiled(_rope_rows)
    if kern is None or x.dtype != F32:
        return None
    out = np.empty(x.shape, F32)
    kern(x, np.ascontiguousarray(cos, F32), np.ascontiguousarray(sin, F32), out, n_rot, neox)
    return out


_COMPILED: dict[str, Callable[..., Any] | None] = {}
_LOCK = threading.Lock()
_HELPERS = ("_nearest_clamped", "_absmax_bits", "_inverse", "_f16_tile")  # called from compiled kernels: compiled (once) before any of them


def _warm_engine_kernels() -> None:
    """One tiny call of each kernel the compare engine uses, with the argument types of its real
    calls (so that the machine code loaded is the one those calls dispatch to)."""
    q8_0_dequantize(np.zeros((1, 34), np.uint8), np.empty((1, 32), F32))
    q5_0_dequantize(np.zeros((1, 22), np.uint8), np.empty((1, 32), F32))
    q8_0_activations(np.ones((1, 32), F32))
    q8_k_activations(np.ones((1, 256), F32))
    x = np.zeros((1, 1, 1, 8), F32)[..., ::2]  # the engine's q and k are strided views
    for neox in (False, True):
        rope(x, np.ones((1, 2), F32), np.zeros((1, 2), F32), 4, neox)


_PRELOAD: list[threading.Thread] = []


def preload_engine_kernels() -> None:
    """Start loading numba and the engine's kernels in a background thread (once per process).

    The first use of numba costs ~0.3 s (its import, then LLVM's set-up at the first call) before
    any kernel runs; an engine that starts this while it parses the model's header, reads the
    reference and embeds the tokens has it (partly) done by its first layer. The engine's calls
    wait for it where they need a kernel (compiled()'s lock, numba's compiler lock); nothing
    changes in what they compute."""
    with _LOCK:
        if _PRELOAD or not available():
            return
        th = threading.Thread(target=_warm_quietly, name="loraq-jit-preload", daemon=True)
        _PRELOAD.append(th)
    th.start()


def _warm_quietly() -> None:
    with contextlib.suppress(Exception):  # a failure here shows again, with its message, at the real call
        _warm_engine_kernels()


def available() -> bool:
    """Whether the compiled kernels will run (numba installed, LORAQ_NO_JIT unset), without
    importing numba."""
    import importlib.util

    return not os.environ.get("LORAQ_NO_JIT") and importlib.util.find_spec("numba") is not None


def compiled(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """fn compiled by numba (cached on disk beside this module), or None without numba or with
    LORAQ_NO_JIT set. numba is imported on first use: processes that never quantize to a K type
    do not pay for it."""
    name = fn.__name__
    if name in _COMPILED:
        return _COMPILED[name]
    with _LOCK:  # the pool's threads ask at once: load (or compile) once
        if name in _COMPILED:
            return _COMPILED[name]
        try:
            if os.environ.get("LORAQ_NO_JIT"):
                raise ImportError("disabled by LORAQ_NO_JIT")
            from numba import njit
        except ImportError:
            _COMPILED[name] = None
        else:
            g = globals()
            for h in _HELPERS:  # numba resolves a called global at compile time: it must be a dispatcher
                if not hasattr(g[h], "py_func"):
                    g[h] = njit(cache=True, nogil=True, error_model="numpy")(g[h])
            _COMPILED[name] = njit(cache=True, nogil=True, error_model="numpy")(fn)
    return _COMPILED[name]


def qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool) -> QkxResult | QkxJit:
    """make_qkx2_quants / make_qkx3_quants: compiled when numba is there, else numeric.QkxResult."""
    if compiled(_qkx2_search) is None:
        return QkxResult(x, w, nmax, rmin, rdelta, nstep, use_mad)
    return QkxJit(x, w, nmax, rmin, rdelta, nstep, use_mad)


def qx_quants(x: np.ndarray, w: np.ndarray | None, nmax: int, exact: bool = False) -> QxResult | QxJit:
    """make_qx_quants: compiled when numba is there, else numeric.QxResult."""
    if compiled(_qx_search) is None:
        return QxResult(x, w, nmax, exact)
    return QxJit(x, w, nmax, exact)


class QxJit:
    """numeric.QxResult's interface (scale, L(idx)) from the compiled search."""

    def __init__(self, x: np.ndarray, w: np.ndarray | None, nmax: int, exact: bool = False):
        B, n, K = x.shape
        self.Lall = np.empty((B, n, K), np.uint8)
        self.scale = np.empty((B, K), F32)
        search = compiled(_qx_search)
        assert search is not None
        x = np.ascontiguousarray(x, F32)
        search(x, x if w is None else np.ascontiguousarray(w, F32), w is not None, nmax, exact, self.Lall, self.scale)

    def L(self, idx: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        if idx is None:
            return self.Lall
        b, k = idx
        return self.Lall[b, :, k]


class QkxJit:
    """numeric.QkxResult's interface (scale, the_min, L(idx)) from the compiled search."""

    def __init__(self, x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
        B, n, K = x.shape
        self.Lall = np.empty((B, n, K), np.uint8)
        self.scale = np.empty((B, K), F32)
        self.the_min = np.empty((B, K), F32)
        search = compiled(_qkx2_search)
        assert search is not None
        search(
            np.ascontiguousarray(x, F32),
            np.ascontiguousarray(w, F32),
            nmax,
            rmin,
            rdelta,
            nstep,
            use_mad,
            self.Lall,
            self.scale,
            self.the_min,
        )

    def L(self, idx: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        if idx is None:
            return self.Lall
        b, k = idx
        return self.Lall[b, :, k]
