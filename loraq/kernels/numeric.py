"""Vectorized float32 building blocks shared by the block quantizers (reference §5.2, §10).

Everything here works on the "T layout": blocks of n elements are stored as an array of shape
(G, n, K), so element j of block (g, k) is `t[g, j, k]`. Reductions over a block then run along
axis 1 with K contiguous lanes, which numpy vectorizes well (a plain (n_blocks, n) array reduced
along its short last axis is several times slower), and a sequential C loop over the n elements
of a block becomes a Python loop of n whole-array operations.

Parity rules followed throughout (why the code looks the way it does):
* all arithmetic is float32 in the C source order; scalar constants such as `0.1f*is` are formed
  with np.float32 scalars so they round exactly as in C;
* sums are accumulated left to right (`seq_sum`), never with np.sum (pairwise);
* ggml's `nearest_int` is round-half-to-even, which is what np.rint does on float32;
* signs of zero are reproduced where they reach stored bytes (fp16 -0.0 is 0x8000)."""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
LANES = 256  # K: blocks per group in the T layout


def to_tlayout(xb: np.ndarray, lanes: int = LANES, min_lanes: int = 1) -> np.ndarray:
    """(nb, n) blocks -> (G, n, K) float32, zero-padding the last group to K lanes.

    min_lanes > 1 keeps sums over axis 1 sequential: np.add.reduce only sums left to right (as
    C does) when there are several contiguous lanes; with one it switches to pairwise."""
    nb, n = xb.shape
    k = max(min_lanes, min(lanes, nb))
    g = -(-nb // k)
    t = np.empty((g, n, k), dtype=xb.dtype)
    full = nb // k
    if full:
        t[:full] = xb[: full * k].reshape(full, k, n).transpose(0, 2, 1)
    rest = nb - full * k
    if rest:
        t[full, :, :rest] = xb[full * k :].T
        t[full, :, rest:] = 0
    return t


def pack_blocks(nb: int, fields: list[np.ndarray]) -> np.ndarray:
    """Assemble block bytes from T-layout fields.

    Each field is uint8 of shape (G, m, K) (m bytes of each block, in memory order) or a per-block
    (G, K) uint16, written little endian. Returns (nb, sum of m) uint8."""
    g, k = fields[0].shape[0], fields[0].shape[-1]
    parts = []
    for f in fields:
        if f.ndim == 2:  # per-block half: 2 bytes, little endian
            f = f.astype("<u2").view(np.uint8).reshape(g, k, 2).transpose(0, 2, 1)
        parts.append(f)
    width = sum(p.shape[1] for p in parts)
    out = np.empty((g, k, width), dtype=np.uint8)
    off = 0
    for p in parts:
        out[:, :, off : off + p.shape[1]] = p.transpose(0, 2, 1)
        off += p.shape[1]
    return out.reshape(g * k, width)[:nb]


def seq_sum(t: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum over axis 1, left to right in float32, like a C `for` loop.

    from_zero: C starts from `sum = 0` (so an all -0.0 sum is +0.0); otherwise it starts from the
    first term, as `sum_w = weights[0]` does in make_qkx3_quants."""
    acc = t[:, 0].copy()
    if from_zero:
        acc += F32(0)  # 0 + (-0.0) = +0.0, as `sum = 0; sum += t0` does
    for j in range(1, t.shape[1]):
        acc += t[:, j]
    return acc


MAGIC = F32(12582912.0)  # 1.5 * 2^23
NI_MAX = 4194303


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int, as float32 values: `(bits(v + 1.5*2^23) & 0x7fffff) - 0x400000`.

    For |v| <= 4194303 that is round half to even, i.e. np.rint. Outside that range (inf or
    huge values from a subnormal block range, NaN from 0*inf) the C bit trick yields other
    numbers (inf -> -4194304, the default NaN -> 0); those rare arrays take the exact path."""
    r = np.rint(v)
    if r.size and not (r.min() >= -NI_MAX and r.max() <= NI_MAX):  # NaN fails both
        with np.errstate(invalid="ignore", over="ignore"):
            val = (v + MAGIC).astype(F32)
        r = ((val.view(np.int32) & 0x7FFFFF) - 0x400000).astype(F32)
    return r


def c_roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) on float32, exactly.

    np.rint rounds half to even, so it differs only at exact ties (|v - rint(v)| == 0.5, which
    is exact in float32) where it went toward zero. trunc(v + 0.5) would be wrong: the add itself
    rounds (0.49999997f + 0.5f == 1.0f)."""
    r = np.rint(v)
    tie = np.abs(v - r) == F32(0.5)
    if tie.any():
        vt = v[tie]
        r[tie] = np.trunc(vt) + np.sign(vt)
    return r


def signed_absmax(t: np.ndarray) -> np.ndarray:
    """Per block, the signed element of largest |x|: the C loop `if (amax < fabsf(v)) max = v`.

    Starts from +0.0 (so an all-zero block gives +0.0) and keeps the first element on ties, which
    matters when +a and -a are both the largest magnitude."""
    mx = t.max(axis=1)
    mn = t.min(axis=1)
    res = np.where(mx >= -mn, mx, mn)
    res += F32(0)  # -0.0 -> +0.0 for all-zero blocks (C's initial max = 0.0f)
    tie = (mx == -mn) & (mx > 0)
    if tie.any():
        g, k = np.nonzero(tie)
        cols = t[g, :, k]  # (m, n)
        first = np.argmax(np.abs(cols) == mx[g, k][:, None], axis=1)
        res[g, k] = cols[np.arange(len(g)), first]
    return res


def first_min(t: np.ndarray) -> np.ndarray:
    """Per block min as the C loop `if (x < min) min = x` keeps it: the first element holding the
    minimum value. Only the sign of a zero minimum can differ from t.min(), and it reaches the
    stored fp16 `m` (0x0000 vs 0x8000)."""
    mn = t.min(axis=1)
    z = mn == 0
    if z.any():
        g, k = np.nonzero(z)
        cols = t[g, :, k]
        first = np.argmax(cols == 0, axis=1)
        mn[g, k] = cols[np.arange(len(g)), first]
    return mn


def safe_inv(d: np.ndarray) -> np.ndarray:
    """`id = d ? 1.0f/d : 0.0f` (may be inf for tiny subnormal d, as in C)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def c_trunc_u8(v: np.ndarray, suspect: np.ndarray | None = None) -> np.ndarray:
    """C `(int8_t)v` / `(uint8_t)v` for v that is in [0, 256) or non-finite: truncate toward zero.

    x86 converts a NaN/inf float with cvttss2si, giving 0x80000000 whose low byte is 0, so
    non-finite values (from a subnormal d whose inverse overflows) become 0. `suspect` is a
    per-block flag; only flagged blocks are scanned."""
    if suspect is not None and suspect.any():
        bad = ~np.isfinite(v)
        v = np.where(bad, F32(0), v)
    return v.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) over T-layout blocks.

    x, w: (G, n, K) float32 (w None -> x*x, as rmse_type 1 without qw). Returns (scale (G, K),
    L (G, n, K) uint8 in [0, 2*nmax-1]); all-|x| < 1e-15 blocks give scale 0 and L 0."""
    amax_el = signed_absmax(x)
    zero = np.abs(amax_el) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), amax_el)[:, None, :]
    if w is None:
        w = x * x
    wx = w * x  # C evaluates `w*x[i]*l` as (w*x)*l
    fn = F32(nmax)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(nearest_int(iscale * x), -fn, fn - 1)
        sumlx = seq_sum(wx * l)
        suml2 = seq_sum(w * l * l)
        return l, sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l, sumlx, suml2 = sums(-fn / mx)
        L = l
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            c = fn + F32(0.1) * F32(i)  # (nmax + 0.1f*is) in float32
            l, sumlx, suml2 = sums(-c / mx)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if take.any():
                L = np.where(take[:, None, :], l, L)
                new = sumlx / suml2
                scale = np.where(take, new, scale)
                best = np.where(take, new * sumlx, best)
    scale = np.where(zero, F32(0), scale)
    Lq = (L + fn).astype(np.uint8)
    Lq[np.broadcast_to(zero[:, None, :], Lq.shape)] = 0
    return scale.astype(F32), Lq


def make_qkx3_quants(
    x: np.ndarray, nmax: int, w: np.ndarray | None, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx3_quants over T-layout blocks (asymmetric, min <= 0).

    Returns (scale (G, K), the_min (G, K) = -min, L (G, n, K) uint8 in [0, nmax])."""
    if w is None:
        w = x * x
    fn = F32(nmax)
    mn = first_min(x)
    mx = x.max(axis=1)
    mn = np.where(mn > 0, F32(0), mn)  # `if (min > 0) min = 0;` (+0.0)
    sum_w = seq_sum(w, from_zero=False)
    sum_x = seq_sum(w * x, from_zero=False)
    degenerate = mx <= mn
    one = F32(1)

    def err(scale: np.ndarray, L: np.ndarray, mn_: np.ndarray) -> np.ndarray:
        diff = scale[:, None, :] * L + mn_[:, None, :] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return seq_sum(w * diff)

    def quants(c: np.float32, mn_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # C reads the *current* min (updated by accepted steps) for both the range and x - min
        rng = np.where(degenerate, one, mx - mn_)
        iscale = (c / rng)[:, None, :]
        return np.clip(nearest_int(iscale * (x - mn_[:, None, :])), F32(0), fn), rng

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L, rng = quants(fn, mn)  # iscale = nmax/(max - min)
        scale = one / (fn / rng)  # scale = 1/iscale
        best = err(scale, L, mn)
        cur_min = mn
        for i in range(nstep + 1):
            c = F32(rmin) + F32(rdelta) * F32(i) + fn
            la, _ = quants(c, cur_min)
            wl = w * la
            sum_l = seq_sum(wl)
            sum_l2 = seq_sum(wl * la)
            sum_xl = seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            mad = err(this_scale, la, this_min)
            take = (D > 0) & (mad < best)
            if take.any():
                L = np.where(take[:, None, :], la, L)
                best = np.where(take, mad, best)
                scale = np.where(take, this_scale, scale)
                cur_min = np.where(take, this_min, cur_min)
    scale = np.where(degenerate, F32(0), scale).astype(F32)
    cur_min = np.where(degenerate, mn, cur_min).astype(F32)
    Lq = L.astype(np.uint8)
    Lq[np.broadcast_to(degenerate[:, None, :], Lq.shape)] = 0
    return scale, -cur_min, Lq
