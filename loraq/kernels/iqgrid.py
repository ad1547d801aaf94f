"""Lattice-codebook types that need a grid search: iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s, iq1_s,
iq1_m (docs/llama-cpp.md §5).

Byte-identical to ggml's `quantize_iq2_xxs` ... `quantize_iq1_m` (quantize_row_*_impl) as
llama.cpp 0.3.36 ships them. The codebooks are part of the file format and come from gguf-py at
run time (`gguf.quants.IQ2_XXS.grid` ...); the lookup map and neighbour lists are rebuilt here as
iq2xs_init_impl / iq3xs_init_impl build them.

Block layouts (little endian, `half` = IEEE fp16), per 256-element super-block:
  iq2_xxs (66 B): half d; u32 q2[16]. Per 32-element sub-block ib: q2[2ib] holds four 8-bit grid
      indices (one per group of 8), q2[2ib+1] four 7-bit sign masks at bits 7k and the 4-bit
      scale l at bit 28.                                       x = d*(0.5+l)/4 * grid * sign
  iq2_xs (74 B):  half d; u16 qs[32]; u8 scales[8]. qs[2ib+k] = 9-bit grid index | signs << 9 for
      16-element sub-block ib; scales[ib/2] holds l of even ib in the low nibble.
  iq2_s (82 B):   half d; u8 qs[64] (32 grid low bytes, then 32 full 8-bit sign masks); u8 qh[8]
      (2 high index bits per group); u8 scales[8].
  iq3_xxs (98 B): half d; u8 grid[64] (one per group of 4); u32 ss[8] = four 7-bit sign masks
      (one per group of 8) | l << 28.                          x = d*(0.5+l)/2 * grid * sign
  iq3_s (110 B):  half d; u8 qs[64]; u8 qh[8] (9th index bit); u8 signs[32]; u8 scales[4].
  iq1_s (50 B):   half d; u8 qs[32]; u16 qh[8] (3 high index bits per group, 3-bit l, shift bit).
  iq1_m (56 B):   u8 qs[32]; u8 qh[16]; u16 scales[4] (3-bit l's, the fp16 d in the top nibbles).
In iq2_xxs, iq2_xs and iq3_xxs the 8th sign of a group of 8 is implied by even parity: when an
odd number of x are negative, the one with the smallest w*x² is flipped to positive before the
search (the "sign parity trick"); the grids hold magnitudes 2l+1 only.

iq2/iq3, per sub-block: weights w = qw*sqrt(σ² + x²) (σ² = Σx²/256, twice that for the others)
with an imatrix, else x² (σ²/4 + x² for iq2_s); a grid of candidate scales; for each, every
group is rounded to the nearest lattice point l = nearest_int((x/s - 1)/2) clamped, and when
that point is not in the codebook the neighbour list of that point (every codebook entry within
the 2 (1 for iq2_s, 3 for iq3_s) smallest distances) is searched for the least w-weighted error;
the scale with the largest (Σwqx)²/Σwq² wins, the off-grid groups are re-rounded with it and the
scale refit once. The super-block scale is max/31 and each sub-block keeps a 4-bit
l = nearest_int((s/d - 1)/2). iq1_s/iq1_m instead search the two split points of the sorted
sub-block exhaustively over the values {-1, 0, 1} ± 1/8 (see their kernels).

The search is sequential and branchy, so it is written as scalar loops compiled by numba when
available (as jit.py: float32 in C's order of operations, no fastmath, error_model numpy); the
same functions run as plain Python without numba (slow, same bytes)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

import numpy as np

from .fp import to_f16

F32 = np.float32
QK_K = 256


def _identity(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


# The helpers must be callable from compiled code (register_jitable); without numba (or with
# LORAQ_NO_JIT) everything stays Python. This module is imported on first use of its types.
_njit: Any = None
_inline: Any = _identity
if not os.environ.get("LORAQ_NO_JIT"):
    try:
        import numba
        import numba.extending
    except ImportError:  # pragma: no cover - numba is a dependency of the fast path only
        pass
    else:
        _njit, _inline = numba.njit, numba.extending.register_jitable


# ---------------------------------------------------------------- codebooks


class Grid(NamedTuple):
    """A codebook as iq2xs_init_impl / iq3xs_init_impl lay it out.

    pos (G, n) int8: the lattice magnitudes 2l+1 of each entry; kmap (M,) int32: the entry index
    of a packed point u = Σ l_i << (b*i), or -(1 + offset into neigh) when u is off the grid;
    neigh uint16: at each offset a count followed by that many entry indices, sorted by (distance,
    index) as ggml's qsort leaves them."""

    pos: np.ndarray
    kmap: np.ndarray
    neigh: np.ndarray


_GRIDS = {  # type -> (gguf-py class name, bits per element of the packed point, nwant)
    "iq2_xxs": ("IQ2_XXS", 2, 2),
    "iq2_xs": ("IQ2_XS", 2, 2),
    "iq3_xxs": ("IQ3_XXS", 3, 2),
    "iq2_s": ("IQ2_S", 2, 1),
    "iq3_s": ("IQ3_S", 3, 3),
    "iq1_s": ("IQ1_S", 2, 3),
}


def grid(qtype: str) -> Grid:
    with _GRID_LOCK:  # iq1_m uses iq1_s's tables (one iq2_data slot in ggml)
        return _grid("iq1_s" if qtype == "iq1_m" else qtype)


_GRID_LOCK = threading.Lock()


@cache
def _grid(qtype: str) -> Grid:
    import gguf.quants as gq

    cls_name, bits, nwant = _GRIDS[qtype]
    cls = getattr(gq, cls_name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)  # dequantized magnitudes
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values)  # l per element
    n_entries, n = levels.shape
    pos = (2 * levels + 1).astype(np.int8)
    shifts = np.arange(n) * bits
    codes = (levels.astype(np.int64) << shifts).sum(axis=1)
    size = 4096 if bits == 3 else 43692  # kmap_size in ggml: every index of a packed point
    kmap = np.full(size, -1, dtype=np.int32)
    kmap[codes] = np.arange(n_entries, dtype=np.int32)
    # neighbour lists only for the points a search can reach: every level <= the largest in use
    top = levels.max()
    u = np.arange(size)
    lv = (u[:, None] >> shifts) & ((1 << bits) - 1)
    need = np.nonzero((kmap < 0) & (lv <= top).all(axis=1))[0]
    g = pos.astype(np.int64)
    gg = (g * g).sum(axis=1)
    lists = []
    for c0 in range(0, len(need), 512):  # in slices: (points, entries) distance tables stay small
        p = 2 * lv[need[c0 : c0 + 512]] + 1
        d2 = (p * p).sum(axis=1)[:, None] - 2 * (p @ g.T) + gg[None, :]  # exact small integers
        order = np.argsort(d2, axis=1, kind="stable")  # by distance, then index: qsort's total order
        sd = np.take_along_axis(d2, order, axis=1)
        # the rank of each distance among the distinct ones; keep the nwant smallest
        rank = np.concatenate([np.zeros((len(p), 1), np.int64), np.cumsum(sd[:, 1:] > sd[:, :-1], axis=1)], axis=1)
        counts = (rank < nwant).sum(axis=1)
        lists += [o[:c] for o, c in zip(order, counts)]
    neigh = np.empty(sum(len(x) + 1 for x in lists), dtype=np.uint16)
    off = 0
    for i, lst in zip(need, lists):
        kmap[i] = -(off + 1)
        neigh[off] = len(lst)
        neigh[off + 1 : off + 1 + len(lst)] = lst
        off += 1 + len(lst)
    return Grid(pos, kmap, neigh)


# ---------------------------------------------------------------- shared pieces (C helpers)


@_inline
def _nint(v):  # pragma: no cover - compiled
    """nearest_int: rint while |v| < 2^22, else ggml's bit trick (what it gives for NaN, inf and
    huge values, before the callers clamp it)."""
    if v >= -4194303.0 and v <= 4194303.0:
        return int(np.rint(v))
    b = np.empty(1, np.float32)
    b[0] = v + np.float32(12582912.0)
    return int((b.view(np.int32)[0] & 0x7FFFFF) - 0x400000)


@_inline
def _neighbour(pos, neigh, start, xval, w, o, n, scale, L):  # pragma: no cover - compiled
    """iq2_find_best_neighbour / iq3_find_best_neighbour: the entry of the list at `start` with the
    least Σ w*(scale*q - x)² (first of equals); writes its levels into L[o:o+n]."""
    cnt = int(neigh[start])
    best = np.float32(3.4028234663852886e38)
    gi = -1
    for j in range(1, cnt + 1):
        g = int(neigh[start + j])
        d2 = np.float32(0.0)
        for i in range(n):
            diff = scale * np.float32(pos[g, i]) - xval[o + i]
            d2 += w[o + i] * diff * diff
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:  # every distance NaN: ggml aborts here; keep the first neighbour
        gi = int(neigh[start + 1])
    for i in range(n):
        L[o + i] = (pos[gi, i] - 1) // 2
    return gi


@_inline
def _qp_scale(nmax, x, w, L):  # pragma: no cover - compiled
    """make_qp_quants(n, nmax, x, L, w)'s returned scale. L is uint8 in C: a negative level
    (x < 0, possible after the parity flip) is stored wrapped and read back as 256+l."""
    n = x.shape[0]
    fmax = np.float32(nmax)
    mx = np.float32(0.0)
    for i in range(n):
        if not (mx > x[i]):
            mx = x[i]
    if mx < np.float32(1e-15):
        return np.float32(0.0)
    iscale = fmax / mx
    for i in range(n):
        L[i] = _nint(iscale * x[i]) & 255
    scale = np.float32(1.0) / iscale
    best_mse = np.float32(0.0)
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += w[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(s) + fmax) / mx
        scale_is = np.float32(1.0) / iscale_is
        mse = np.float32(0.0)
        for i in range(n):
            l = min(nmax, _nint(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += w[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = min(nmax, _nint(iscale * x[i]))
        L[i] = l & 255
        fl = np.float32(l)
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            li = np.float32(L[i])
            slx = sumlx - w[i] * x[i] * li
            sl2 = suml2 - w[i] * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nint(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fl = np.float32(new_l)
                    slx += w[i] * x[i] * fl
                    sl2 += w[i] * fl * fl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 255
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@_inline
def _weights_signs(x, qw, has_qw, o, n, sigma2, weight, waux, xval, signs, parity=True, floor=False):  # pragma: no cover - compiled
    """The weights of sub-block x[o:o+n] (without an imatrix x², or σ²/4 + x² with `floor`) and
    its groups of 8: xval = |x|, signs = 8-bit masks; with `parity`, the cheapest element of an
    odd-negative group stays negative and the masks keep 7 bits."""
    for i in range(n):
        xi = x[o + i]
        if has_qw:
            weight[i] = qw[o + i] * np.sqrt(sigma2 + xi * xi)
        elif floor:
            weight[i] = np.float32(0.25) * sigma2 + xi * xi
        else:
            weight[i] = xi * xi
        waux[i] = np.sqrt(weight[i])
    for k in range(n // 8):
        nflip = 0
        s = 0
        for i in range(8):
            xi = x[o + 8 * k + i]
            if xi >= 0:
                xval[8 * k + i] = xi
            else:
                xval[8 * k + i] = -xi
                nflip += 1
                s |= 1 << i
        if parity and nflip % 2:
            imin = 0
            xi = x[o + 8 * k]
            mn = weight[8 * k] * xi * xi
            for i in range(1, 8):
                xi = x[o + 8 * k + i]
                ax = weight[8 * k + i] * xi * xi
                if ax < mn:
                    mn = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if parity else s


@_inline
def _round_groups(xval, waux, idv, scale, kmaxq, n, bits, pos, kmap, neigh, L, on_grid):  # pragma: no cover - compiled
    """Every group of n (with on_grid[k] False, or all when on_grid is all False) to its nearest
    lattice point at id, off-grid points to their best neighbour at `scale`; writes L and returns
    nothing. on_grid[k] is set to whether the rounded point was in the codebook."""
    ng = xval.shape[0] // n
    for k in range(ng):
        u = 0
        for i in range(n):
            l = _nint(np.float32(0.5) * (idv * xval[n * k + i] - np.float32(1.0)))
            l = max(0, min(kmaxq - 1, l))
            L[n * k + i] = l
            u |= l << (bits * i)
        gi = kmap[u]
        on_grid[k] = gi >= 0
        if gi < 0:
            _neighbour(pos, neigh, -gi - 1, xval, waux, n * k, n, scale, L)


@_inline
def _sums(weight, xval, L):  # pragma: no cover - compiled
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for i in range(xval.shape[0]):
        w = weight[i]
        q = np.float32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@_inline
def _code(L, o, n, bits, kmap):  # pragma: no cover - compiled
    u = 0
    for i in range(n):
        u |= L[o + i] << (bits * i)
    return kmap[u]


# ---------------------------------------------------------------- kernels (scalar, per super-block)


def _iq2_xxs(x, qw, has_qw, pos, kmap, neigh, d_out, q_out):  # pragma: no cover - compiled
    """quantize_row_iq2_xxs_impl over super-blocks x (m, 256): d_out (m,) float32 (before fp16),
    q_out (m, 16) uint32 = q2."""
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    Lqp = np.zeros(32, np.int64)
    signs = np.zeros(4, np.int64)
    on_grid = np.zeros(4, np.bool_)
    scales = np.zeros(8, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(16):
            q_out[b, j] = 0
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = sumx2 / np.float32(QK_K)
        for ib in range(8):
            _weights_signs(xb, qb, has_qw, 32 * ib, 32, sigma2, weight, waux, xval, signs)
            mx = xval[0]
            for i in range(1, 32):
                if not (mx > xval[i]):
                    mx = xval[i]
            scales[ib] = np.float32(0.0)
            if mx < np.float32(1e-15):
                continue
            scale = _qp_scale(4, xval, weight, Lqp)
            eff_max = scale * np.float32(3.0)
            if eff_max <= 0:
                continue
            best = np.float32(0.0)
            for s in range(-6, 7):
                idv = (np.float32(5.0) + np.float32(s) * np.float32(0.1)) / eff_max
                _round_groups(xval, waux, idv, np.float32(1.0) / idv, 3, 8, 2, pos, kmap, neigh, Laux, on_grid)
                sumqx, sumq2 = _sums(weight, xval, Laux)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
            if scale > 0:
                _round_groups(xval, waux, np.float32(1.0) / scale, scale, 3, 8, 2, pos, kmap, neigh, L, on_grid)
                sumqx, sumq2 = _sums(weight, xval, L)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            if scale < 0:  # "should never happen" in ggml: flip the scale and the signs
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(4):
                gi = _code(L, 8 * k, 8, 2, kmap)
                q_out[b, 2 * ib] |= np.uint32(gi) << np.uint32(8 * k)
                q_out[b, 2 * ib + 1] |= np.uint32(signs[k]) << np.uint32(7 * k)
            scales[ib] = scale
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:
            for j in range(16):
                q_out[b, j] = 0
            continue
        d = max_scale / np.float32(31.0)
        d_out[b] = d
        idv = np.float32(1.0) / d
        for ib in range(8):
            l = max(0, min(15, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            q_out[b, 2 * ib + 1] |= np.uint32(l) << np.uint32(28)


def _iq2_xs(x, qw, has_qw, pos, kmap, neigh, d_out, q_out, sc_out):  # pragma: no cover - compiled
    """quantize_row_iq2_xs_impl over super-blocks x (m, 256): d_out (m,), q_out (m, 32) uint16,
    sc_out (m, 8) uint8."""
    weight = np.empty(16, np.float32)
    waux = np.empty(16, np.float32)
    xval = np.empty(16, np.float32)
    L = np.zeros(16, np.int64)
    Laux = np.zeros(16, np.int64)
    signs = np.zeros(2, np.int64)
    on_grid = np.zeros(2, np.bool_)
    on_aux = np.zeros(2, np.bool_)
    scales = np.zeros(16, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(32):
            q_out[b, j] = 0
        for j in range(8):
            sc_out[b, j] = 0
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = sumx2 / np.float32(QK_K)
        for ib in range(16):
            _weights_signs(xb, qb, has_qw, 16 * ib, 16, sigma2, weight, waux, xval, signs)
            mx = xval[0]
            for i in range(1, 16):
                if not (mx > xval[i]):
                    mx = xval[i]
            L[:] = 0
            scales[ib] = np.float32(0.0)
            if mx < np.float32(1e-15):
                continue
            best = np.float32(0.0)
            scale = mx / np.float32(5.0)
            on_grid[:] = True
            for s in range(-9, 10):
                idv = (np.float32(5.0) + np.float32(s) * np.float32(0.1)) / mx
                _round_groups(xval, waux, idv, np.float32(1.0) / idv, 3, 8, 2, pos, kmap, neigh, Laux, on_aux)
                sumqx, sumq2 = _sums(weight, xval, Laux)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_aux
            if not (on_grid[0] and on_grid[1]) and scale > 0:
                idv = np.float32(1.0) / scale
                for k in range(2):
                    if on_grid[k]:
                        continue
                    u = 0
                    for i in range(8):
                        l = max(0, min(2, _nint(np.float32(0.5) * (idv * xval[8 * k + i] - np.float32(1.0)))))
                        u |= l << (2 * i)
                        L[8 * k + i] = l
                    gi = kmap[u]
                    if gi < 0:
                        _neighbour(pos, neigh, -gi - 1, xval, waux, 8 * k, 8, scale, L)
                sumqx, sumq2 = _sums(weight, xval, L)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            if scale < 0:
                scale = -scale
                for k in range(2):
                    signs[k] = ~signs[k] & 127
            for k in range(2):
                gi = _code(L, 8 * k, 8, 2, kmap)
                q_out[b, 2 * ib + k] = np.uint16(gi | (signs[k] << 9))
            scales[ib] = scale
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:
            for j in range(32):
                q_out[b, j] = 0
            continue
        d = max_scale / np.float32(31.0)
        d_out[b] = d
        idv = np.float32(1.0) / d
        for ib in range(16):
            l = max(0, min(15, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            if ib % 2 == 0:
                sc_out[b, ib // 2] = l
            else:
                sc_out[b, ib // 2] |= l << 4


def _iq3_xxs(x, qw, has_qw, pos, kmap, neigh, d_out, g_out, ss_out):  # pragma: no cover - compiled
    """quantize_row_iq3_xxs_impl(256, ...) over super-blocks x (m, 256): d_out (m,) the stored d
    before fp16 (with the 1.0125 fudge), g_out (m, 64) uint8 grid indices, ss_out (m, 8) uint32."""
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    signs = np.zeros(4, np.int64)
    on_grid = np.zeros(8, np.bool_)
    on_aux = np.zeros(8, np.bool_)
    scales = np.zeros(8, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(64):
            g_out[b, j] = 0
        for j in range(8):
            ss_out[b, j] = 0
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
        for ib in range(8):
            _weights_signs(xb, qb, has_qw, 32 * ib, 32, sigma2, weight, waux, xval, signs)
            mx = xval[0]
            for i in range(1, 32):
                if not (mx > xval[i]):
                    mx = xval[i]
            L[:] = 0
            scales[ib] = np.float32(0.0)
            if mx < np.float32(1e-8):
                continue
            best = np.float32(0.0)
            scale = mx / np.float32(15.0)
            on_grid[:] = True
            for s in range(-15, 16):
                idv = (np.float32(15.0) + np.float32(s) * np.float32(0.2)) / mx
                _round_groups(xval, waux, idv, np.float32(1.0) / idv, 8, 4, 3, pos, kmap, neigh, Laux, on_aux)
                sumqx, sumq2 = _sums(weight, xval, Laux)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_aux
            n_off = 0
            for k in range(8):
                if not on_grid[k]:
                    n_off += 1
            if n_off > 0 and scale > 0:
                idv = np.float32(1.0) / scale
                for k in range(8):
                    if on_grid[k]:
                        continue
                    u = 0
                    for i in range(4):
                        l = max(0, min(7, _nint(np.float32(0.5) * (idv * xval[4 * k + i] - np.float32(1.0)))))
                        u |= l << (3 * i)
                    gi = kmap[u]
                    if gi < 0:
                        gi = _neighbour(pos, neigh, -gi - 1, xval, waux, 4 * k, 4, scale, L)
                    for i in range(4):
                        L[4 * k + i] = (pos[gi, i] - 1) // 2
                sumqx, sumq2 = _sums(weight, xval, L)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            if scale < 0:
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(8):
                g_out[b, 8 * ib + k] = _code(L, 4 * k, 4, 3, kmap)
            ss_out[b, ib] = np.uint32(signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21))
            scales[ib] = scale
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:
            for j in range(64):
                g_out[b, j] = 0
            for j in range(8):
                ss_out[b, j] = 0
            continue
        d = max_scale / np.float32(31.0)
        d_out[b] = d * np.float32(1.0125)
        idv = np.float32(1.0) / d
        for ib in range(8):
            l = max(0, min(15, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            ss_out[b, ib] |= np.uint32(l) << np.uint32(28)


def _iq2_s(x, qw, has_qw, pos, kmap, neigh, d_out, q_out):  # pragma: no cover - compiled
    """quantize_row_iq2_s_impl over super-blocks x (m, 256): d_out (m,) the stored d before fp16
    (with the 0.9875 fudge), q_out (m, 80) = qs[64] (grid low bytes, then full 8-bit signs),
    qh[8] (2 high index bits per group), scales[8]. No parity trick here."""
    weight = np.empty(16, np.float32)
    waux = np.empty(16, np.float32)
    xval = np.empty(16, np.float32)
    L = np.zeros(16, np.int64)
    Laux = np.zeros(16, np.int64)
    signs = np.zeros(2, np.int64)
    on_grid = np.zeros(2, np.bool_)
    on_aux = np.zeros(2, np.bool_)
    scales = np.zeros(16, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(80):
            q_out[b, j] = 0
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
        for ib in range(16):
            _weights_signs(xb, qb, has_qw, 16 * ib, 16, sigma2, weight, waux, xval, signs, False, True)
            mx = xval[0]
            for i in range(1, 16):
                if not (mx > xval[i]):
                    mx = xval[i]
            L[:] = 0
            scales[ib] = np.float32(0.0)
            if mx < np.float32(1e-8):
                continue
            best = np.float32(0.0)
            scale = mx / np.float32(5.0)
            on_grid[:] = True
            for s in range(-9, 10):
                idv = (np.float32(5.0) + np.float32(s) * np.float32(0.1)) / mx
                _round_groups(xval, waux, idv, np.float32(1.0) / idv, 3, 8, 2, pos, kmap, neigh, Laux, on_aux)
                sumqx, sumq2 = _sums(weight, xval, Laux)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_aux
            if not (on_grid[0] and on_grid[1]) and scale > 0:
                idv = np.float32(1.0) / scale
                for k in range(2):
                    if on_grid[k]:
                        continue
                    u = 0
                    for i in range(8):
                        l = max(0, min(2, _nint(np.float32(0.5) * (idv * xval[8 * k + i] - np.float32(1.0)))))
                        u |= l << (2 * i)
                        L[8 * k + i] = l
                    gi = kmap[u]
                    if gi < 0:
                        _neighbour(pos, neigh, -gi - 1, xval, waux, 8 * k, 8, scale, L)
                sumqx, sumq2 = _sums(weight, xval, L)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            if scale < 0:
                scale = -scale
                for k in range(2):
                    signs[k] = ~signs[k] & 255
            for k in range(2):
                gi = _code(L, 8 * k, 8, 2, kmap)
                i8 = 2 * ib + k
                q_out[b, i8] = gi & 255
                q_out[b, 64 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                q_out[b, 32 + i8] = signs[k]
            scales[ib] = scale
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:  # the grid bytes written so far stay (ggml only skips d and scales)
            continue
        d = max_scale / np.float32(31.0)
        d_out[b] = d * np.float32(0.9875)
        idv = np.float32(1.0) / d
        for ib in range(16):
            l = max(0, min(15, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            if ib % 2 == 0:
                q_out[b, 72 + ib // 2] = l
            else:
                q_out[b, 72 + ib // 2] |= l << 4


def _iq3_s(x, qw, has_qw, pos, kmap, neigh, d_out, q_out):  # pragma: no cover - compiled
    """quantize_row_iq3_s_impl(32, ...) over super-blocks x (m, 256): d_out (m,) the stored d
    before fp16 (with the 1.033 fudge), q_out (m, 108) = qs[64] (grid low bytes), qh[8] (the 9th
    index bit per group), signs[32] (8-bit masks), scales[4] (two 4-bit l each). ggml advances
    its qs and signs pointers only past live sub-blocks: after a dead (all-zero) one, the later
    sub-blocks' bytes sit earlier, and qh keeps the true positions. Kept as is."""
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    signs = np.zeros(4, np.int64)
    on_grid = np.zeros(8, np.bool_)
    on_aux = np.zeros(8, np.bool_)
    scales = np.zeros(8, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(108):
            q_out[b, j] = 0
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
        qs_off = 0
        sg_off = 72
        for ib in range(8):
            _weights_signs(xb, qb, has_qw, 32 * ib, 32, sigma2, weight, waux, xval, signs, False, False)
            mx = xval[0]
            for i in range(1, 32):
                if not (mx > xval[i]):
                    mx = xval[i]
            L[:] = 0
            scales[ib] = np.float32(0.0)
            if mx == 0:
                continue
            best = np.float32(0.0)
            scale = mx / np.float32(15.0)
            on_grid[:] = False
            for s in range(-9, 10):
                idv = (np.float32(15.0) + np.float32(s) * np.float32(0.2)) / mx
                _round_groups(xval, waux, idv, np.float32(1.0) / idv, 8, 4, 3, pos, kmap, neigh, Laux, on_aux)
                sumqx, sumq2 = _sums(weight, xval, Laux)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_aux
            n_off = 0
            for k in range(8):
                if not on_grid[k]:
                    n_off += 1
            if n_off > 0 and scale > 0:  # every group is re-rounded, on the grid or not
                _round_groups(xval, waux, np.float32(1.0) / scale, scale, 8, 4, 3, pos, kmap, neigh, L, on_aux)
                sumqx, sumq2 = _sums(weight, xval, L)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            if scale < 0:
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 255
            for k in range(8):
                gi = _code(L, 4 * k, 4, 3, kmap)
                q_out[b, qs_off + k] = gi & 255
                j = ib * 8 + k
                q_out[b, 64 + j // 8] |= (gi >> 8) << (j % 8)
            qs_off += 8
            for k in range(4):
                q_out[b, sg_off + k] = signs[k]
            sg_off += 4
            scales[ib] = scale
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:
            continue
        d = max_scale / np.float32(31.0)
        d_out[b] = d * np.float32(1.033)
        idv = np.float32(1.0) / d
        for ib in range(0, 8, 2):
            l1 = max(0, min(15, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            l2 = max(0, min(15, _nint(np.float32(0.5) * (idv * scales[ib + 1] - np.float32(1.0)))))
            q_out[b, 104 + ib // 2] = l1 | (l2 << 4)


@_inline
def _sort_pairs(v, idx, n):  # pragma: no cover - compiled
    """Sort v[:n] ascending, carrying idx: a stable insertion sort. ggml sorts with qsort, which
    need not be stable; glibc's is a merge sort for arrays this small, and ties keep their order."""
    for j in range(1, n):
        key = v[j]
        ki = idx[j]
        k = j - 1
        while k >= 0 and v[k] > key:
            v[k + 1] = v[k]
            idx[k + 1] = idx[k]
            k -= 1
        v[k + 1] = key
        idx[k + 1] = ki


@_inline
def _iq1_neighbour(pos, neigh, start, xb, w, o, scale, xx, L):  # pragma: no cover - compiled
    """iq1_find_best_neighbour2: least Σ w*(scale*xx[l] - x)² over the list (first of equals)."""
    cnt = int(neigh[start])
    best = np.float32(3.4028234663852886e38)
    gi = -1
    for j in range(1, cnt + 1):
        g = int(neigh[start + j])
        d2 = np.float32(0.0)
        for i in range(8):
            q = xx[(pos[g, i] - 1) // 2]
            diff = scale * q - xb[o + i]
            d2 += w[o + i] * diff * diff
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:  # every distance NaN: ggml's fallback reads out of bounds, then asserts
        gi = int(neigh[start + 1])
    for i in range(8):
        L[o + i] = (pos[gi, i] - 1) // 2
    return gi


def _iq1_s(x, qw, has_qw, pos, kmap, neigh, d_out, q_out):  # pragma: no cover - compiled
    """quantize_row_iq1_s_impl over super-blocks x (m, 256) with an imatrix: d_out (m,) the stored
    d before fp16 (with the 1.125 fudge), q_out (m, 48) = qs[32] (grid low bytes), qh u16[8]
    (3 high index bits per group of 8, the 3-bit scale at bit 12, the -δ shift at bit 15).

    Each 32-element sub-block takes the values {-1, 0, 1} + δ or - δ (δ = 1/8): x sorted, the two
    split points searched exhaustively with prefix sums of w*x and w."""
    x_p = np.array([-0.875, 0.125, 1.125], np.float32)
    x_m = np.array([-1.125, -0.125, 0.875], np.float32)
    weight = np.empty(32, np.float32)
    sumx = np.empty(33, np.float32)
    sumw = np.empty(33, np.float32)
    vals = np.empty(32, np.float32)
    idx = np.empty(32, np.int64)
    L = np.zeros(32, np.int64)
    index = np.zeros(4, np.int64)
    scales = np.zeros(8, np.float32)
    shifts = np.zeros(8, np.int64)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(48):
            q_out[b, j] = 0
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
        for ib in range(8):
            o = 32 * ib
            for i in range(32):
                xi = xb[o + i]
                weight[i] = qb[o + i] * np.sqrt(sigma2 + xi * xi)
            mx = abs(xb[o])
            for i in range(1, 32):
                a = abs(xb[o + i])
                if not (mx > a):
                    mx = a
            scales[ib] = np.float32(0.0)
            shifts[ib] = 1
            if mx < np.float32(1e-12):
                continue
            for j in range(32):
                vals[j] = xb[o + j]
                idx[j] = j
            _sort_pairs(vals, idx, 32)
            sumx[0] = np.float32(0.0)
            sumw[0] = np.float32(0.0)
            for j in range(32):
                i = idx[j]
                sumx[j + 1] = sumx[j] + weight[i] * xb[o + i]
                sumw[j + 1] = sumw[j] + weight[i]
            best = np.float32(-3.4028234663852886e38)
            scale = mx
            b1 = -1
            b2 = -1
            shift = 0
            for i1 in range(33):
                for i2 in range(i1, 33):
                    s0 = sumx[i1] - sumx[0]
                    s1 = sumx[i2] - sumx[i1]
                    s2 = sumx[32] - sumx[i2]
                    w0 = sumw[i1] - sumw[0]
                    w1 = sumw[i2] - sumw[i1]
                    w2 = sumw[32] - sumw[i2]
                    sumqx = s0 * x_p[0] + s1 * x_p[1] + s2 * x_p[2]
                    sumq2 = w0 * x_p[0] * x_p[0] + w1 * x_p[1] * x_p[1] + w2 * x_p[2] * x_p[2]
                    if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        b1 = i1
                        b2 = i2
                        shift = 1
                    sumqx = s0 * x_m[0] + s1 * x_m[1] + s2 * x_m[2]
                    sumq2 = w0 * x_m[0] * x_m[0] + w1 * x_m[1] * x_m[1] + w2 * x_m[2] * x_m[2]
                    if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        b1 = i1
                        b2 = i2
                        shift = -1
            if b1 < 0 or b2 < 0 or shift == 0:
                continue
            for j in range(32):
                L[idx[j]] = 0 if j < b1 else (1 if j < b2 else 2)
            if scale < 0:
                for j in range(32):
                    L[j] = 2 - L[j]
                scale = -scale
                shift = -shift
            xx = x_p if shift == 1 else x_m
            all_on = True
            for k in range(4):
                gi = _code(L, 8 * k, 8, 2, kmap)
                if gi < 0:
                    all_on = False
                    gi = _iq1_neighbour(pos, neigh, -gi - 1, xb[o:], weight, 8 * k, scale, xx, L)
                index[k] = gi
            if not all_on:
                sumqx = np.float32(0.0)
                sumq2 = np.float32(0.0)
                for k in range(4):
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(pos[index[k], j] - 1) // 2]
                        sumqx += w * q * xb[o + 8 * k + j]
                        sumq2 += w * q * q
                if sumqx > 0 and sumq2 > 0:
                    scale = sumqx / sumq2
            h = 0
            for k in range(4):
                q_out[b, 4 * ib + k] = index[k] & 255
                h |= (index[k] >> 8) << (3 * k)
            q_out[b, 32 + 2 * ib] = h & 255
            q_out[b, 33 + 2 * ib] = h >> 8
            scales[ib] = scale
            shifts[ib] = shift
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:
            continue
        d = max_scale / np.float32(15.0)
        d_out[b] = d * np.float32(1.125)
        idv = np.float32(1.0) / d
        for ib in range(8):
            l = max(0, min(7, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            if shifts[ib] == -1:
                l |= 8
            q_out[b, 33 + 2 * ib] |= l << 4


def _iq1_m(x, qw, has_qw, pos, kmap, neigh, has_d, d_out, q_out, sc_out):  # pragma: no cover - compiled
    """quantize_row_iq1_m_impl over super-blocks x (m, 256): q_out (m, 48) = qs[32] (grid low
    bytes), qh[16] (per 16-element sub-block: 3 high index bits of each group of 8 in the
    nibbles, the -δ shift of group 0 at 0x08 and of group 1 at 0x80); sc_out (m, 4) uint16 the
    3-bit sub-block scales (four per u16). The super-block scale is refit at the end over all
    sub-blocks and its fp16 bits go into the top nibbles of sc (the caller does that, for the
    blocks with has_d): d_out is that d before fp16, with the 1.1125 fudge.

    As iq1_s, but each group of 8 picks its own shift: the split search scores the four sign
    combinations from prefix sums kept per half."""
    x_p = np.array([-0.875, 0.125, 1.125], np.float32)
    x_m = np.array([-1.125, -0.125, 0.875], np.float32)
    masks = np.array([0x00, 0x80, 0x08, 0x88], np.int64)
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    weight = np.empty(16, np.float32)
    px = np.empty((2, 17), np.float32)
    pw = np.empty((2, 17), np.float32)
    vals = np.empty(16, np.float32)
    idx = np.empty(16, np.int64)
    L = np.zeros(16, np.int64)
    index = np.zeros(2, np.int64)
    scales = np.zeros(16, np.float32)
    shifts = np.zeros(16, np.int64)
    sqx = np.empty(4, np.float32)
    sq2 = np.empty(4, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qb = qw[b]
        for j in range(48):
            q_out[b, j] = 0
        for j in range(4):
            sc_out[b, j] = 0
        has_d[b] = False
        d_out[b] = np.float32(0.0)
        max_scale = np.float32(0.0)
        sumx2 = np.float32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
        for ib in range(16):
            o = 16 * ib
            for i in range(16):
                xi = xb[o + i]
                weight[i] = qb[o + i] * np.sqrt(sigma2 + xi * xi) if has_qw else xi * xi
            mx = abs(xb[o])
            for i in range(1, 16):
                a = abs(xb[o + i])
                if not (mx > a):
                    mx = a
            scales[ib] = np.float32(0.0)
            shifts[ib] = 0
            if mx < np.float32(1e-7):
                continue
            for j in range(16):
                vals[j] = xb[o + j]
                idx[j] = j
            _sort_pairs(vals, idx, 16)
            px[0, 0] = px[1, 0] = pw[0, 0] = pw[1, 0] = np.float32(0.0)
            for j in range(16):
                i = idx[j]
                h = 0 if i < 8 else 1
                px[h, j + 1] = px[h, j] + weight[i] * xb[o + i]
                px[1 - h, j + 1] = px[1 - h, j]
                pw[h, j + 1] = pw[h, j] + weight[i]
                pw[1 - h, j + 1] = pw[1 - h, j]
            best = np.float32(-3.4028234663852886e38)
            scale = mx
            b1 = -1
            b2 = -1
            bk = -1
            for i1 in range(17):
                for i2 in range(i1, 17):
                    sx0 = px[0, i1] + px[0, i2]
                    sx1 = px[1, i1] + px[1, i2]
                    qxp0 = px[0, 16] * p2 - sx0
                    qxp1 = px[1, 16] * p2 - sx1
                    qxm0 = px[0, 16] * m2 - sx0
                    qxm1 = px[1, 16] * m2 - sx1
                    q2p0 = pw[0, 16] * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                    q2p1 = pw[1, 16] * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                    q2m0 = pw[0, 16] * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                    q2m1 = pw[1, 16] * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                    sqx[0] = qxp0 + qxp1
                    sqx[1] = qxp0 + qxm1
                    sqx[2] = qxm0 + qxp1
                    sqx[3] = qxm0 + qxm1
                    sq2[0] = q2p0 + q2p1
                    sq2[1] = q2p0 + q2m1
                    sq2[2] = q2m0 + q2p1
                    sq2[3] = q2m0 + q2m1
                    for k in range(4):
                        if sq2[k] > 0 and sqx[k] * sqx[k] > best * sq2[k]:
                            scale = sqx[k] / sq2[k]
                            best = scale * sqx[k]
                            b1 = i1
                            b2 = i2
                            bk = k
            if b1 < 0 or b2 < 0 or bk < 0:
                continue
            for j in range(16):
                L[idx[j]] = 0 if j < b1 else (1 if j < b2 else 2)
            if scale < 0:
                for j in range(16):
                    L[j] = 2 - L[j]
                scale = -scale
                bk = 3 - bk
            all_on = True
            for k in range(2):
                xx = (x_p if bk < 2 else x_m) if k == 0 else (x_p if bk % 2 == 0 else x_m)
                gi = _code(L, 8 * k, 8, 2, kmap)
                if gi < 0:
                    all_on = False
                    gi = _iq1_neighbour(pos, neigh, -gi - 1, xb[o:], weight, 8 * k, scale, xx, L)
                index[k] = gi
            if not all_on:
                sumqx = np.float32(0.0)
                sumq2 = np.float32(0.0)
                for k in range(2):
                    xx = (x_p if bk < 2 else x_m) if k == 0 else (x_p if bk % 2 == 0 else x_m)
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(pos[index[k], j] - 1) // 2]
                        sumqx += w * q * xb[o + 8 * k + j]
                        sumq2 += w * q * q
                if sumqx > 0 and sumq2 > 0:
                    scale = sumqx / sumq2
            q_out[b, 2 * ib] = index[0] & 255
            q_out[b, 2 * ib + 1] = index[1] & 255
            q_out[b, 32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            scales[ib] = scale
            shifts[ib] = bk
            if not (max_scale > scale):
                max_scale = scale
        if max_scale == 0:
            continue
        d = max_scale / np.float32(15.0)
        idv = np.float32(1.0) / d
        sumqx = np.float32(0.0)
        sumq2 = np.float32(0.0)
        for ib in range(16):  # dead sub-blocks too: grid entry 0, shift +, l = 0
            l = max(0, min(7, _nint(np.float32(0.5) * (idv * scales[ib] - np.float32(1.0)))))
            sc_out[b, ib // 4] |= l << (3 * (ib % 4))
            q_out[b, 32 + ib] |= masks[shifts[ib]]
            o = 16 * ib
            for i in range(16):
                xi = xb[o + i]
                weight[i] = qb[o + i] * np.sqrt(sigma2 + xi * xi) if has_qw else xi * xi
            qh = int(q_out[b, 32 + ib])
            for k in range(2):
                xx = (x_p if shifts[ib] < 2 else x_m) if k == 0 else (x_p if shifts[ib] % 2 == 0 else x_m)
                g = int(q_out[b, 2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(pos[g, j] - 1) // 2] * np.float32(2 * l + 1)
                    sumqx += w * q * xb[o + 8 * k + j]
                    sumq2 += w * q * q
        if sumq2 > 0:
            d = sumqx / sumq2
        has_d[b] = True
        d_out[b] = d * np.float32(1.1125)


_KERNELS: dict[str, Callable[..., Any]] = {}
_LOCK = threading.Lock()  # the driver's threads ask at once: build each table and kernel once


def _kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    name = fn.__name__
    with _LOCK:
        if name not in _KERNELS:
            _KERNELS[name] = fn if _njit is None else _njit(cache=True, nogil=True, error_model="numpy")(fn)
        return _KERNELS[name]


def _prep(xs: np.ndarray, qws: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    x = np.ascontiguousarray(xs, dtype=F32)
    if qws is None:
        return x, x, False
    return x, np.ascontiguousarray(qws, dtype=F32), True


def iq2_xxs(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 66) bytes."""
    x, qw, has = _prep(xs, qws)
    g = grid("iq2_xxs")
    ns = x.shape[0]
    d = np.empty(ns, F32)
    q = np.empty((ns, 16), np.uint32)
    _kernel(_iq2_xxs)(x, qw, has, g.pos, g.kmap, g.neigh, d, q)
    out = np.empty((ns, 66), np.uint8)
    out[:, 0:2] = to_f16(d).astype("<u2").view(np.uint8).reshape(ns, 2)
    out[:, 2:] = q.astype("<u4").view(np.uint8).reshape(ns, 64)
    return out


def iq2_xs(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 74) bytes."""
    x, qw, has = _prep(xs, qws)
    g = grid("iq2_xs")
    ns = x.shape[0]
    d = np.empty(ns, F32)
    q = np.empty((ns, 32), np.uint16)
    sc = np.empty((ns, 8), np.uint8)
    _kernel(_iq2_xs)(x, qw, has, g.pos, g.kmap, g.neigh, d, q, sc)
    out = np.empty((ns, 74), np.uint8)
    out[:, 0:2] = to_f16(d).astype("<u2").view(np.uint8).reshape(ns, 2)
    out[:, 2:66] = q.astype("<u2").view(np.uint8).reshape(ns, 64)
    out[:, 66:] = sc
    return out


def iq3_xxs(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 98) bytes."""
    x, qw, has = _prep(xs, qws)
    g = grid("iq3_xxs")
    ns = x.shape[0]
    d = np.empty(ns, F32)
    gi = np.empty((ns, 64), np.uint8)
    ss = np.empty((ns, 8), np.uint32)
    _kernel(_iq3_xxs)(x, qw, has, g.pos, g.kmap, g.neigh, d, gi, ss)
    out = np.empty((ns, 98), np.uint8)
    out[:, 0:2] = to_f16(d).astype("<u2").view(np.uint8).reshape(ns, 2)
    out[:, 2:66] = gi
    out[:, 66:] = ss.astype("<u4").view(np.uint8).reshape(ns, 32)
    return out


def _bytes_kernel(name: str, kern: Callable[..., Any], width: int, xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """Kernels that write every byte after d themselves: (ns, 256) -> (ns, 2 + width)."""
    x, qw, has = _prep(xs, qws)
    g = grid(name)
    ns = x.shape[0]
    d = np.empty(ns, F32)
    q = np.empty((ns, width), np.uint8)
    _kernel(kern)(x, qw, has, g.pos, g.kmap, g.neigh, d, q)
    out = np.empty((ns, 2 + width), np.uint8)
    out[:, 0:2] = to_f16(d).astype("<u2").view(np.uint8).reshape(ns, 2)
    out[:, 2:] = q
    return out


def iq2_s(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 82) bytes."""
    return _bytes_kernel("iq2_s", _iq2_s, 80, xs, qws)


def iq3_s(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 110) bytes."""
    return _bytes_kernel("iq3_s", _iq3_s, 108, xs, qws)


def iq1_s(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks + their imatrix slices (required) -> (ns, 50) bytes."""
    if qws is None:
        raise ValueError("iq1_s needs an importance matrix")
    return _bytes_kernel("iq1_s", _iq1_s, 48, xs, qws)


def iq1_m(xs: np.ndarray, qws: np.ndarray | None) -> np.ndarray:
    """(ns, 256) super-blocks (+ their imatrix slices) -> (ns, 56) bytes: qs, qh, scales; the fp16
    d spread over the top nibble of each of the four scale u16s."""
    x, qw, has = _prep(xs, qws)
    g = grid("iq1_m")
    ns = x.shape[0]
    has_d = np.empty(ns, np.bool_)
    d = np.empty(ns, F32)
    q = np.empty((ns, 48), np.uint8)
    sc = np.empty((ns, 4), np.uint16)
    _kernel(_iq1_m)(x, qw, has, g.pos, g.kmap, g.neigh, has_d, d, q, sc)
    u = np.where(has_d, to_f16(d), 0).astype(np.uint16)
    nib = [(u & 0x000F) << 12, (u & 0x00F0) << 8, (u & 0x0F00) << 4, u & 0xF000]
    sc |= np.stack(nib, axis=1).astype(np.uint16)
    out = np.empty((ns, 56), np.uint8)
    out[:, :48] = q
    out[:, 48:] = sc.astype("<u2").view(np.uint8).reshape(ns, 8)
    return out
