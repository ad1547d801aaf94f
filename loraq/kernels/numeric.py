"""Vectorized float32 building blocks of the block quantizers (docs/llama-cpp.md §5.2, §10; ggml-quants.c
is the truth): the T layout, ggml's rounding and summing in C order, and the scale searches
(make_qx_quants, make_qkx2/3_quants, make_qp_quants, make_q3_quants).

Blocks of n elements are stored in the "T layout", an array of shape (G, n, K): element j of
block (g, k) is `t[g, j, k]`. Reductions over a block then run along axis 1 with K contiguous
lanes, which numpy vectorizes well (reducing a plain (n_blocks, n) array along its short last
axis is several times slower), and a sequential C loop over the n elements of a block becomes a
Python loop of n whole-array operations.

Parity rules followed throughout (why the code looks the way it does):
* all arithmetic is float32 in the C source order; scalar constants such as `0.1f*is` are formed
  with np.float32 scalars so they round exactly as in C;
* `rsum` reduces with np.add.reduce over axis 1. With K >= 2 contiguous lanes numpy adds the n
  rows one after the other (a strictly sequential float32 sum, as the C loop; pairwise summation
  only happens along the contiguous axis), so to_tlayout pads to at least MIN_LANES lanes;
* ggml's `nearest_int` is a bit trick (`ni`), exact for every input (huge, inf, NaN); where the
  argument is bounded by construction (|v| <= nmax + 1) the searches use np.rint, which is the
  same (round half to even) and faster;
* searches never select whole (B, n, K) arrays per candidate (np.where on a random mask costs
  ~4 ns an element, 50x an add): they keep the winning iscale (and min) per block and re-derive
  L at the end, which is exactly what ggml does on acceptance; per-block selects use `blend`, a
  bitwise select on the int32 views (exact, branch free);
* signs of zero are reproduced where they reach stored bytes (fp16 -0.0 is 0x8000);
* inf/NaN intermediates (subnormal or overflowing block ranges) are expected and handled as C
  handles them; the driver runs every kernel under np.errstate(all="ignore")."""

from __future__ import annotations

import threading

import numpy as np

from .fp import to_f16

F32 = np.float32
I32 = np.int32
MAGIC = F32(12582912.0)  # 1.5 * 2^23: adding it leaves round-half-even(v) in the low mantissa bits
NI_SAFE = F32(4194303.0)  # below this magnitude np.rint equals the bit trick
GROUP_MAX_EPS = F32(1e-15)
LANES = 256  # K: blocks per group in the T layout
MIN_LANES = 8  # np.add.reduce over axis 1 is only sequential with several contiguous lanes

_WS = threading.local()


def work(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A per-thread scratch array kept between calls. Fresh ~1 MiB numpy temporaries come from
    mmap (glibc raises its mmap threshold to exactly the freed size, so same-size requests keep
    missing the heap) and page-fault on every use; a dense pass with many live temporaries ran
    6x slower than its arithmetic."""
    d = getattr(_WS, "bufs", None)
    if d is None or len(d) > 32:
        d = _WS.bufs = {}
    key = (name, shape, np.dtype(dtype).str)
    b = d.get(key)
    if b is None:
        b = d[key] = np.empty(shape, dtype)
    return b


# ---------------------------------------------------------------- layout


def to_tlayout(xb: np.ndarray, min_lanes: int = MIN_LANES) -> np.ndarray:
    """(nb, n) blocks -> (G, n, K) float32, zero-padding the last group to K lanes."""
    nb, n = xb.shape
    k = max(min_lanes, min(LANES, nb))
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


def nibbles(q: np.ndarray) -> np.ndarray:
    """(G, 32, K) values (low 4 bits used) -> (G, 16, K) bytes: element j in the low nibble of
    byte j, element j+16 in its high nibble."""
    return (q[:, :16] & 15) | (q[:, 16:] << 4)


# ---------------------------------------------------------------- C arithmetic


def rsum(a: np.ndarray) -> np.ndarray:
    """C `s = 0; for (i) s += a[i];` over axis 1 (sequential; +0.0 start fixes -0.0 sums)."""
    s = np.add.reduce(a, axis=1)
    s += F32(0)
    return s


def rsum1(a: np.ndarray) -> np.ndarray:
    """C `s = a[0]; for (i = 1..) s += a[i];` over axis 1."""
    return np.add.reduce(a, axis=1)


def ni_int(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int as int32: (bits(v + 1.5*2^23) & 0x7fffff) - 0x400000, exact for any v
    (inf -> -4194304, the default NaN -> 0)."""
    b = np.add(v, MAGIC, dtype=F32).view(I32)
    b &= 0x7FFFFF
    b -= 0x400000
    return b


def ni(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int as float32 values (exact for any v)."""
    return ni_int(v).astype(F32)


def c_roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) on float32, exactly.

    trunc(v + copysign(0.49999997f, v)): adding the largest float below one half never carries
    a fraction below .5 across the next integer (below 0.5 the sum stays under 1; above, the
    sum's rounding error is under half its ulp), while exact halves reach it (ties of the sum
    round to even, which is the integer). trunc(v + 0.5) would be wrong: 0.49999997f + 0.5f
    rounds to 1.0f."""
    r = np.copysign(F32(0.49999997), v)  # the float just below 0.5: x + 0.5f itself could round up
    r += v
    return np.trunc(r, out=r)


def safe_inv(d: np.ndarray) -> np.ndarray:
    """`id = d ? 1.0f/d : 0.0f` (may be inf for tiny subnormal d, as in C)."""
    return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def c_trunc_u8(v: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    """C `(int8_t)v` / `(uint8_t)v` for v that is in [0, 256) or non-finite: truncate toward zero.

    x86 converts a NaN/inf float with cvttss2si, giving 0x80000000 whose low byte is 0, so
    non-finite values (from a subnormal d whose inverse overflows) become 0. `suspect` is a
    per-block flag; only flagged blocks are scanned."""
    if suspect.any():
        v = np.where(np.isfinite(v), v, F32(0))
    return v.astype(np.uint8)


def blend(m: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact `m ? a : b` for float32 arrays (bitwise select; np.where is branchy and slow)."""
    return blend_i(fmask(m), a, b)


def blend_i(mi: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """As blend with a ready int32 mask (0 or -1)."""
    bi = b.view(I32)
    r = np.bitwise_xor(a.view(I32), bi)
    r &= mi
    r ^= bi
    return r.view(F32)


def fmask(m: np.ndarray) -> np.ndarray:
    """bool -> int32 0 / -1 mask for blend_i."""
    mi = m.astype(I32)
    np.negative(mi, out=mi)
    return mi


def fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 then back: (uint16 bits, float32 value)."""
    h = to_f16(v)
    return h, h.view(np.float16).astype(F32)


def signed_absmax(t: np.ndarray) -> np.ndarray:
    """Per block (axis 1) the signed value of largest |v|, as the C loop
    `amax = 0; max = 0; if (fabsf(v) > amax) { amax = fabsf(v); max = v; }`: first occurrence on
    ties (+a vs -a), +0.0 when nothing is above 0, and NaN never wins (its comparison is false).
    Scales can be NaN when the data overflow float32 (w = x*x = inf)."""
    mx = np.fmax.reduce(t, axis=1)
    mn = np.fmin.reduce(t, axis=1)
    res = blend(mx >= -mn, mx, mn)
    res = blend(np.abs(res) > 0, res, np.zeros_like(res))  # also false for NaN and zeros
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
    stored fp16 `m` of q4_1/q5_1 (0x0000 vs 0x8000)."""
    mn = t.min(axis=1)
    z = mn == 0
    if z.any():
        g, k = np.nonzero(z)
        cols = t[g, :, k]
        first = np.argmax(cols == 0, axis=1)
        mn[g, k] = cols[np.arange(len(g)), first]
    return mn


# ---------------------------------------------------------------- make_qx_quants


class QxResult:
    """make_qx_quants(n, nmax, x, L, 1, qw) for T-layout blocks; L is derived lazily."""

    def __init__(self, x: np.ndarray, w: np.ndarray | None, nmax: int, exact: bool = False):
        """exact: x may hold NaN (scales computed from overflowing data), so nearest_int must
        be the C bit trick (NaN -> 0) rather than np.rint."""
        self.x, self.nmax, self.exact = x, nmax, exact
        fn = F32(nmax)
        amax_el = signed_absmax(x)
        self.zero = np.abs(amax_el) < GROUP_MAX_EPS
        mx = blend(self.zero, np.ones_like(amax_el), amax_el)
        if w is None:
            w = x * x
        wx = w * x  # C: w*x[i]*l == (w*x)*l
        lo, hi = -fn, fn - F32(1)
        l = np.empty_like(x)
        t = np.empty_like(x)

        def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # |iscale*x| <= (nmax + 0.9)*(1+eps): np.rint is nearest_int here
            np.multiply(x, iscale[:, None, :], out=l)
            if exact:
                l[...] = ni(l)
            else:
                np.rint(l, out=l)
            np.clip(l, lo, hi, out=l)
            np.multiply(wx, l, out=t)
            sumlx = rsum(t)
            np.multiply(w, l, out=t)
            np.multiply(t, l, out=t)
            return sumlx, rsum(t)

        iscale = -fn / mx
        sumlx, suml2 = sums(iscale)
        scale = blend(suml2 != 0, sumlx / suml2, np.zeros_like(sumlx))
        best = scale * sumlx
        best_is = iscale
        for i in range(-9, 10):
            if i == 0:
                continue
            iscale = -(fn + F32(0.1) * F32(i)) / mx
            sumlx, suml2 = sums(iscale)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            mi = fmask(take)
            new = sumlx / suml2
            scale = blend_i(mi, new, scale)
            best = blend_i(mi, new * sumlx, best)
            best_is = blend_i(mi, iscale, best_is)
        self.scale = blend(self.zero, np.zeros_like(scale), scale)
        self.iscale = best_is

    def L(self, idx: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """uint8 L in [0, 2*nmax-1] (0 for all-zero blocks): all blocks (B, n, K), or the blocks
        idx = (b, k) as (m, n)."""
        fn = F32(self.nmax)
        if idx is None:
            x, isc, zero = self.x, self.iscale[:, None, :], self.zero[:, None, :]
        else:
            b, k = idx
            x, isc, zero = self.x[b, :, k], self.iscale[b, k][:, None], self.zero[b, k][:, None]
        l = ni(x * isc) if self.exact else np.rint(x * isc)
        np.clip(l, -fn, fn - F32(1), out=l)
        l += fn
        l *= ~zero
        return l.astype(np.uint8)


# ---------------------------------------------------------------- make_qkx2 / make_qkx3


class QkxResult:
    """make_qkx2_quants / make_qkx3_quants (weights given) for T-layout blocks.

    scale (B, K), the_min (B, K) = -min; L derived lazily from the winning (iscale, min used)."""

    def __init__(self, x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
        self.x, self.nmax = x, nmax
        fn = F32(nmax)
        one, zero = F32(1), F32(0)
        mn = first_min(x)  # q4_1/q5_1 store a zero min with its sign
        mx = x.max(axis=1)
        sum_w = rsum1(w)  # C starts from weights[0]
        sum_x = rsum1(w * x)  # sum_w*x[0] == w0*x0
        mn = blend(mn > 0, np.zeros_like(mn), mn)  # if (min > 0) min = 0, keeping a -0.0 min
        self.degenerate = deg = mx <= mn  # qkx2: max == min, same for ordered values
        la = np.empty_like(x)
        t = np.empty_like(x)
        u = np.empty_like(x)

        def quant(iscale: np.ndarray, cur_min: np.ndarray, exact: bool) -> None:
            np.subtract(x, cur_min[:, None, :], out=la)  # iscale*(x[i] - min)
            np.multiply(la, iscale[:, None, :], out=la)
            if exact:
                la[...] = ni(la)
            else:
                np.rint(la, out=la)
            np.clip(la, zero, fn, out=la)

        def err(scale: np.ndarray, mn_: np.ndarray) -> np.ndarray:
            np.multiply(la, scale[:, None, :], out=t)  # scale*L + min - x
            np.add(t, mn_[:, None, :], out=t)
            np.subtract(t, x, out=t)
            if use_mad:
                np.abs(t, out=t)
            else:
                np.multiply(t, t, out=t)
            np.multiply(t, w, out=t)
            return rsum(t)

        def needs_exact(iscale, cur_min) -> bool:
            # rint == nearest_int while |iscale*(x - min)| <= 4194303: x - min <= max - min, and
            # below by min - cur_min (cur_min is a fitted min, it may exceed the data min)
            hi = iscale * (mx - cur_min)
            lo = iscale * (cur_min - mn)
            return not (np.all(hi <= NI_SAFE) and np.all(lo <= NI_SAFE) and np.all(iscale >= 0))

        rng = blend(deg, np.ones_like(mx), mx - mn)
        iscale = fn / rng
        scale = one / iscale
        quant(iscale, mn, needs_exact(iscale, mn))
        best = err(scale, mn)
        cur_min = mn
        best_is, best_qmin = iscale, mn
        for i in range(nstep + 1):
            c = F32(rmin) + F32(rdelta) * F32(i) + fn
            rng = blend(deg, np.ones_like(mx), mx - cur_min)
            iscale = c / rng
            quant(iscale, cur_min, needs_exact(iscale, cur_min))
            np.multiply(w, la, out=u)  # w*l
            sum_l = rsum(u)
            np.multiply(u, la, out=t)
            sum_l2 = rsum(t)
            np.multiply(u, x, out=t)
            sum_xl = rsum(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = fmask(this_min > 0)
            this_min = blend_i(pos, np.zeros_like(this_min), this_min)
            this_scale = blend_i(pos, sum_xl / sum_l2, this_scale)
            cur = err(this_scale, this_min)
            mi = fmask((D > 0) & (cur < best))
            best = blend_i(mi, cur, best)
            scale = blend_i(mi, this_scale, scale)
            best_is = blend_i(mi, iscale, best_is)
            best_qmin = blend_i(mi, cur_min, best_qmin)
            cur_min = blend_i(mi, this_min, cur_min)
        self.scale = blend(deg, np.zeros_like(scale), scale)
        self.the_min = -blend(deg, mn, cur_min)
        self.iscale, self.qmin = best_is, best_qmin

    def L(self, idx: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """uint8 L in [0, nmax] (0 for degenerate blocks): all blocks (B, n, K), or the blocks
        idx = (b, k) as (m, n)."""
        if idx is None:
            x, qmin, isc, deg = self.x, self.qmin[:, None, :], self.iscale[:, None, :], self.degenerate[:, None, :]
        else:
            b, k = idx
            x, qmin, isc, deg = self.x[b, :, k], self.qmin[b, k][:, None], self.iscale[b, k][:, None], self.degenerate[b, k][:, None]
        l = np.clip(ni((x - qmin) * isc), F32(0), F32(self.nmax))
        l *= ~deg
        return l.astype(np.uint8)


# ---------------------------------------------------------------- coordinate descent


def csum(a: np.ndarray) -> np.ndarray:
    """rsum for the compact layout (n, M): sequential over axis 0 (needs M >= 2)."""
    s = np.add.reduce(a, axis=0)
    s += F32(0)
    return s


class CoordDescent:
    """The `for (itry < 5) { for (i < n) ... if (!n_changed) break; }` refinement shared by
    make_q3_quants (kind "q3": L in [-nmax, nmax-1], `slx > 0`, accept needs `sl2 > 0` after
    the update) and make_qp_quants (kind "qp": L = MIN(nmax, l) stored as uint8, so negative l
    wrap; `slx > 0 && sl2 > 0` before the update).

    Blocks are lanes of the compact layout (n, M). A pass runs element by element for all lanes
    at once; before each pass a speculative evaluation of all n elements against the pass-start
    state finds the lanes that would accept nothing (their pass changes nothing, so they have
    converged exactly as in C) and drops them. Typically 10-15% of the blocks change in pass 1
    and a few percent later, so most of the sequential work disappears."""

    def __init__(self, kind: str, nmax: int):
        self.qp = kind == "qp"
        self.lo, self.hi = I32(-nmax), I32(nmax if self.qp else nmax - 1)

    def _proposal(self, x, w, wx, L, sumlx, suml2):
        """Per element: slx, sl2 without it, the new l it would take (int32), and whether C's
        precondition for trying it holds."""
        slx = sumlx - wx * L
        sl2 = suml2 - (w * L) * L
        newi = ni_int((x * sl2) / slx)
        if self.qp:
            np.minimum(newi, self.hi, out=newi)
            return slx, sl2, newi, (slx > 0) & (sl2 > 0)
        np.clip(newi, self.lo, self.hi, out=newi)
        return slx, sl2, newi, slx > 0

    def step(self, x, w, wx, L, sumlx, suml2):
        slx, sl2, newi, pre = self._proposal(x, w, wx, L, sumlx, suml2)
        new = newi.astype(F32)
        slx2 = slx + wx * new
        sl22 = sl2 + (w * new) * new
        acc = pre & (new != L) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
        if not self.qp:
            acc &= sl22 > 0
        else:
            new = (newi & 255).astype(F32)  # uint8_t L[i] = new_l
        return acc, new, slx2, sl22

    def speculate(self, x, w, wx, L, sumlx, suml2) -> np.ndarray:
        """Lanes (columns of the compact (n, M) arrays) whose next pass would accept a change.
        Dense work only up to the candidates (a new l that differs); the acceptance test then
        runs on those few elements."""
        slx, sl2, newi, cand = self._proposal(x, w, wx, L, sumlx, suml2)
        new = newi.astype(F32)
        cand &= new != L
        i, j = np.nonzero(cand)
        slx, sl2, new, s1, s2 = slx[i, j], sl2[i, j], new[i, j], sumlx[j], suml2[j]
        slx2 = slx + wx[i, j] * new
        sl22 = sl2 + (w[i, j] * new) * new
        acc = (slx2 * slx2) * s2 > (s1 * s1) * sl22
        if not self.qp:
            acc &= sl22 > 0
        act = np.zeros(x.shape[1], bool)
        act[j[acc]] = True
        return act

    def run(self, x, w, wx, L, sumlx, suml2, first_active=None, npass: int = 5):
        """Refine compact (n, M) float32 L in place; returns the final (sumlx, suml2).
        first_active: lanes already known to change in the first pass (speculated elsewhere)."""
        n = x.shape[0]
        sumlx, suml2 = sumlx.copy(), suml2.copy()
        ix = np.arange(x.shape[1])
        cx, cw, cwx, cL, c1, c2 = x, w, wx, L, sumlx, suml2  # cL is L (in place) until compacted

        def write_back() -> None:
            if cL is not L:
                L[:, ix] = cL
            sumlx[ix], suml2[ix] = c1, c2

        for p in range(npass):
            if p == 0 and first_active is not None:
                act = first_active
            else:
                act = self.speculate(cx, cw, cwx, cL, c1, c2)
            if not act.all():
                write_back()
                sel = np.flatnonzero(act)
                ix = ix[sel]
                if not ix.size:
                    return sumlx, suml2
                cx, cw, cwx, cL, c1, c2 = cx[:, sel], cw[:, sel], cwx[:, sel], cL[:, sel], c1[sel], c2[sel]
            for i in range(n):
                acc, new, slx2, sl22 = self.step(cx[i], cw[i], cwx[i], cL[i], c1, c2)
                mi = fmask(acc)
                cL[i] = blend_i(mi, new, cL[i])
                c1 = blend_i(mi, slx2, c1)
                c2 = blend_i(mi, sl22, c2)
        write_back()
        return sumlx, suml2


# ---------------------------------------------------------------- make_qp_quants


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, qw) for the compact layout: x, qw (n, M), M >= 2 blocks
    (n = 8 or 16 scales/mins of one super-block per column).

    Returns (scale (M,), L (n, M) uint8 as C stores it: `uint8_t L = (int)l`, which wraps for
    negative l; 0 for blocks whose max < 1e-15)."""
    fn = F32(nmax)
    mx = np.zeros(x.shape[1], F32)
    for i in range(x.shape[0]):  # max = MAX(max, x[i]): NaN is taken, then dropped by the next
        mx = blend(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    mx = blend(zero, np.ones_like(mx), mx)
    one = F32(1)
    iscale = fn / mx
    L0 = (ni_int(x * iscale) & 255).astype(F32)  # uint8_t L[i] = nearest_int(iscale*x[i])
    scale = one / iscale
    d = x - scale * L0
    best = csum((qw * d) * d)
    for i in range(-4, 5):
        if i == 0:
            continue
        isc = (F32(0.1) * F32(i) + fn) / mx
        sc = one / isc
        l = np.minimum(ni(x * isc), fn)  # int l, no wrap
        d = x - sc * l
        mse = csum((qw * d) * d)
        mi = fmask(mse < best)
        best = blend_i(mi, mse, best)
        iscale = blend_i(mi, isc, iscale)
    l = np.minimum(ni(x * iscale), fn)
    wx = qw * x
    sumlx = csum(wx * l)
    suml2 = csum((qw * l) * l)
    L = (l.astype(I32) & 255).astype(F32)
    sumlx, suml2 = CoordDescent("qp", nmax).run(x, qw, wx, L, sumlx, suml2)
    res = blend(suml2 > 0, sumlx / suml2, np.zeros_like(sumlx))
    res = blend(zero, np.zeros_like(res), res)
    Lq = L.astype(np.uint8)
    Lq *= ~zero
    return res, Lq


# ---------------------------------------------------------------- make_q3_quants


class Q3Quants:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) in three steps, so that the sequential
    refinement of many chunks runs in one go: `Q3Quants(x)` per T-layout chunk (B, n, K) does
    the dense start and the first speculation; `Q3Quants.refine(list)` runs the passes for the
    lanes that change; then `.scale()` (B, K) and `.L_of((b, k))` (m, n) uint8 L in
    [0, 2*nmax-1] (0 for all-zero blocks)."""

    def __init__(self, x: np.ndarray, nmax: int = 4):
        self.nmax = nmax
        self.x = x
        self.cd = CoordDescent("q3", nmax)
        fn = F32(nmax)
        amax_el = signed_absmax(x)
        self.zero = np.abs(amax_el) < GROUP_MAX_EPS
        mx = blend(self.zero, np.ones_like(amax_el), amax_el)
        L = np.multiply(x, (-fn / mx)[:, None, :], out=work("L", x.shape))
        np.rint(L, out=L)  # |iscale*x| <= nmax: rint is nearest_int
        np.clip(L, -fn, fn - F32(1), out=L)
        w = np.multiply(x, x, out=work("w", x.shape))
        wx = np.multiply(w, x, out=work("wx", x.shape))
        a = np.multiply(wx, L, out=work("a", x.shape))  # w*x[i]*l
        self.sumlx = rsum(a)
        b = np.multiply(w, L, out=work("b", x.shape))
        np.multiply(b, L, out=b)  # w*l*l
        self.suml2 = rsum(b)
        self.L = L.astype(np.int8)  # kept per chunk: a quarter of the float size
        act = self._speculate_dense(x, w, wx, L, a, b, fn)
        bi, ki = np.nonzero(act)
        _, n, K = x.shape
        self.gidx = (bi * (n * K) + ki)[None, :] + (np.arange(n) * K)[:, None]  # flat (n, m)
        self.lane = bi * K + ki  # flat (B, K) index of each changing block
        self.cx = np.take(x.reshape(-1), self.gidx)  # the changing blocks, compact (n, m)

    def _speculate_dense(self, x, w, wx, L, a, b, fn) -> np.ndarray:
        """CoordDescent.speculate over the T layout: which blocks change in the first pass.
        a, b hold w*x*L and w*L*L. The dense part only finds the candidates (slx > 0 and a
        different new_l, ~2% of the elements); the acceptance test runs on those alone."""
        sh = x.shape
        c, d = work("c", sh), work("d", sh)
        m1, m2 = work("m1", sh, bool), work("m2", sh, bool)
        s1, s2 = self.sumlx[:, None, :], self.suml2[:, None, :]
        np.subtract(s1, a, out=a)  # slx = sumlx - w*x*L
        np.subtract(s2, b, out=b)  # sl2 = suml2 - w*L*L
        np.multiply(x, b, out=c)
        np.divide(c, a, out=c)  # x*sl2/slx
        np.add(c, MAGIC, out=c)  # nearest_int, bit trick
        ci = c.view(I32)
        np.bitwise_and(ci, 0x7FFFFF, out=ci)
        np.subtract(ci, 0x400000, out=ci)
        np.clip(ci, I32(-fn), I32(fn - 1), out=ci)
        np.copyto(d, ci, casting="unsafe")  # new_l
        np.greater(a, F32(0), out=m1)
        np.not_equal(d, L, out=m2)
        m1 &= m2
        cand = np.flatnonzero(m1)
        slx, sl2, new = a.reshape(-1)[cand], b.reshape(-1)[cand], d.reshape(-1)[cand]
        wi, wxi = w.reshape(-1)[cand], wx.reshape(-1)[cand]
        bb, _, kk = np.unravel_index(cand, sh)
        sumlx, suml2 = self.sumlx[bb, kk], self.suml2[bb, kk]
        slx2 = slx + wxi * new
        sl22 = sl2 + (wi * new) * new
        acc = (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
        act = np.zeros(sh[0::2], bool)
        act[bb[acc], kk[acc]] = True
        return act

    @staticmethod
    def refine(items: list[Q3Quants]) -> None:
        items = [q for q in items if q.cx.shape[1]]
        if not items:
            return
        x = np.concatenate([q.cx for q in items], axis=1)
        L = np.concatenate([np.take(q.L.reshape(-1), q.gidx) for q in items], axis=1).astype(F32)
        lane = [q.lane for q in items]
        s1 = np.concatenate([np.take(q.sumlx.reshape(-1), ln) for q, ln in zip(items, lane)])
        s2 = np.concatenate([np.take(q.suml2.reshape(-1), ln) for q, ln in zip(items, lane)])
        w = x * x
        wx = w * x
        cd = items[0].cd
        s1, s2 = cd.run(x, w, wx, L, s1, s2, first_active=np.ones(x.shape[1], bool))
        off = 0
        for q, ln in zip(items, lane):
            m = q.cx.shape[1]
            q.L.reshape(-1)[q.gidx] = L[:, off : off + m]
            q.sumlx.reshape(-1)[ln] = s1[off : off + m]
            q.suml2.reshape(-1)[ln] = s2[off : off + m]
            off += m
            q.cx = q.cx[:, :0]

    def scale(self) -> np.ndarray:
        scale = blend(self.suml2 > 0, self.sumlx / self.suml2, np.zeros_like(self.sumlx))
        return blend(self.zero, np.zeros_like(scale), scale)

    def L_of(self, idx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        b, k = idx
        L = self.L[b, :, k].astype(np.int16) + self.nmax
        L *= ~self.zero[b, k][:, None]
        return L.astype(np.uint8)
