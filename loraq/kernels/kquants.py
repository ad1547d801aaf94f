"""K quantizers: q2_K, q3_K, q4_K, q5_K, q6_K (reference §5.1, §5.3; ggml-quants.c).

Byte-identical to ggml's `quantize_<type>`: without an imatrix the `quantize_row_<type>_ref`
kernels, with one the `quantize_row_<type>_impl` kernels. Super-blocks of QK_K = 256 are processed
as T-layout groups (G, 256, K) (see numeric.py / knumeric.py); sub-blocks are the free views
(G*8, 32, K) or (G*16, 16, K). Every K type requantizes with the fp16-rounded d/dmin times the
integer scale codes; sub-blocks whose product is 0 keep the L of the search (rare, so those are
re-derived only for the blocks concerned).

Block layouts (little endian, half = fp16):
  q2_K  (84 B): u8 scales[16]; u8 qs[64]; half d; half dmin
  q3_K (110 B): u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d
  q4_K (144 B): half d; half dmin; u8 scales[12]; u8 qs[128]
  q5_K (176 B): half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
  q6_K (210 B): u8 ql[128]; u8 qh[64]; i8 scales[16]; half d"""

from __future__ import annotations

import numpy as np

from . import register
from .knumeric import F32, I32, MAGIC, Q3Quants, QkxResult, QxResult, blend, fp16_round, make_qp_quants, ni_int, rsum, signed_absmax, work
from .numeric import GROUP_MAX_EPS, to_tlayout
from .numeric import pack_blocks as _pack

QK_K = 256
CHUNK = 1 << 18  # elements per chunk (1 MiB float32 temporaries)
LANES = 256
SUPER = 16  # chunks per super-chunk: the sequential refinements of make_q3_quants and
# make_qp_quants run once per super-chunk (4M weights), amortizing numpy's per-call overhead
MIN_LANES = 8  # np.add.reduce over axis 1 is only sequential with several contiguous lanes
U8 = np.uint8


def _tlayout(xb: np.ndarray) -> np.ndarray:
    """(nb, 256) -> (G, 256, K), K >= MIN_LANES lanes, zero padded."""
    return to_tlayout(xb, LANES, MIN_LANES)


def _pos_max(v: np.ndarray) -> np.ndarray:
    """C `float m = 0; for (j) if (v[j] > m) m = v[j];` over axis 1 (NaN never wins, never -0)."""
    m = np.fmax.reduce(v, axis=1)
    return blend(m > 0, m, np.zeros_like(m))


def _requant(x: np.ndarray, dd: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """L = clamp(nearest_int((x + dm)/dd), lo, hi) - lo as uint8, (B, n, K); dd == 0 blocks are
    garbage here (the caller fills them)."""
    v = work("rq", x.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if dm is not None:
            np.add(x, dm[:, None, :], out=v)  # (x + dm)/d
            np.divide(v, dd[:, None, :], out=v)
        else:
            np.divide(x, dd[:, None, :], out=v)
        np.add(v, MAGIC, out=v)  # nearest_int, bit trick: exact for any value
    b = v.view(I32)
    np.bitwise_and(b, 0x7FFFFF, out=b)
    np.clip(b, I32(0x400000 + lo), I32(0x400000 + hi), out=b)
    if lo:
        np.subtract(b, I32(lo), out=b)  # low byte of 0x400000 + l - lo is l - lo
    return b.astype(U8)


def _fill_skipped(L: np.ndarray, skip: np.ndarray, search_L) -> None:
    """Sub-blocks with dd == 0 keep the L of the first pass (`if (!d) continue;`)."""
    if skip.any():
        idx = np.nonzero(skip)
        L[idx[0], :, idx[1]] = search_L(idx)


def _f16_bits_or_zero(v: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, f = fp16_round(blend(ok, v, np.zeros_like(v)))
    return h, f


# ---------------------------------------------------------------- q4_K / q5_K


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(G, 8, K) uint8 scale/min codes -> (G, 12, K) bytes, as the C packing loop."""
    g, _, k = ls.shape
    s = np.empty((g, 12, k), U8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: (G, 12, K) bytes -> sc, m (G, 8, K) uint8."""
    g, _, k = s.shape
    sc = np.empty((g, 8, k), U8)
    m = np.empty((g, 8, k), U8)
    sc[:, 0:4] = s[:, 0:4] & 63
    m[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _q45_finish(t, r, scale_bytes, dh, dmh, nmax: int, five: bool) -> list[np.ndarray]:
    g, _, k = t.shape
    xs = t.reshape(g * 8, 32, k)
    sc, m = _unpack_k4_scales(scale_bytes)
    df = dh.view(np.float16).astype(F32)
    dmf = dmh.view(np.float16).astype(F32)
    dd = (df[:, None, :] * sc).reshape(g * 8, k)
    dm = (dmf[:, None, :] * m).reshape(g * 8, k)
    skip = dd == 0
    L = _requant(xs, dd, dm, 0, nmax)
    _fill_skipped(L, skip, r.L)
    Lr = L.reshape(g, 4, 2, 32, k)
    if not five:
        qs = Lr[:, :, 0] | (Lr[:, :, 1] << 4)
        return [dh, dmh, scale_bytes, qs.reshape(g, 128, k)]
    qs = (Lr[:, :, 0] & 0xF) | ((Lr[:, :, 1] & 0xF) << 4)
    hb = Lr >> 4  # 0/1
    qh = np.zeros((g, 32, k), U8)
    for c in range(4):
        qh |= hb[:, c, 0] << (2 * c)
        qh |= hb[:, c, 1] << (2 * c + 1)
    return [dh, dmh, scale_bytes, qh, qs.reshape(g, 128, k)]


def _q45_ref(t: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, five: bool):
    g, _, k = t.shape
    xs = t.reshape(g * 8, 32, k)
    sum_x2 = rsum(xs * xs)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = np.abs(xs)
    w += av_x[:, None, :]
    r = QkxResult(xs, w, nmax, rmin, rdelta, nstep, False)
    scales = r.scale.reshape(g, 8, k)
    mins = r.the_min.reshape(g, 8, k)
    max_scale = _pos_max(scales)
    max_min = _pos_max(mins)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = blend(max_scale > 0, F32(63) / max_scale, np.zeros_like(max_scale))
        inv_min = blend(max_min > 0, F32(63) / max_min, np.zeros_like(max_min))
        ls = np.minimum((ni_int(inv_scale[:, None, :] * scales) & 255).astype(U8), U8(63))
        lm = np.minimum((ni_int(inv_min[:, None, :] * mins) & 255).astype(U8), U8(63))
        dh, _ = fp16_round(max_scale / F32(63))
        dmh, _ = fp16_round(max_min / F32(63))
    return _q45_finish(t, r, _pack_k4_scales(ls, lm), dh, dmh, nmax, five)


def _sigma2_weights(t: np.ndarray, qw: np.ndarray, factor2: bool) -> np.ndarray:
    """w = qw * sqrtf(sigma2 + x*x), sigma2 = [2*]Σ_superblock x² / 256 (summed from 0)."""
    sumx2 = rsum(t * t)
    if factor2:
        sumx2 = F32(2) * sumx2
    sigma2 = sumx2 / F32(QK_K)
    w = t * t
    w += sigma2[:, None, :]
    np.sqrt(w, out=w)
    w *= qw
    return w


def _imat_p1(t: np.ndarray, qw: np.ndarray, sub: int, nmax: int, factor2: bool) -> dict:
    """Phase 1 of the q2_K/q4_K/q5_K imatrix kernels: weights and the make_qkx3_quants search."""
    g, _, k = t.shape
    ns = QK_K // sub
    xs = t.reshape(g * ns, sub, k)
    w = _sigma2_weights(t, qw, factor2).reshape(g * ns, sub, k)
    sw = rsum(w).reshape(g, ns, k)
    r = QkxResult(xs, w, nmax, -0.9, 0.05, 36, False)
    return {"t": t, "r": r, "sw": sw, "scales": r.scale.reshape(g, ns, k), "mins": r.the_min.reshape(g, ns, k)}


def _compact(a: np.ndarray) -> np.ndarray:
    """(G, n, K) per-super-block values -> (n, G*K)."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


def _imat_p2(states: list[dict], nq: int) -> None:
    """Phase 2: make_qp_quants for the scales and the mins of all super-blocks at once."""
    sw = np.concatenate([_compact(s["sw"]) for s in states], axis=1)
    for key, dkey, lkey in (("scales", "d_block", "Ls"), ("mins", "m_block", "Lm")):
        x = np.concatenate([_compact(s[key]) for s in states], axis=1)
        d, L = make_qp_quants(x, nq, sw)
        off = 0
        for s in states:
            g, n, k = s[key].shape
            m = g * k
            s[dkey] = d[off : off + m].reshape(g, k)
            s[lkey] = L[:, off : off + m].reshape(n, g, k).transpose(1, 0, 2)
            off += m


def _q45_imat_p3(s: dict, nmax: int, five: bool) -> list[np.ndarray]:
    Ls, Lm = s["Ls"], s["Lm"]
    if five:  # q5_K_impl clamps the codes, q4_K_impl does not
        Ls = np.minimum(Ls, U8(63))
        Lm = np.minimum(Lm, U8(63))
    dh, _ = fp16_round(s["d_block"])
    dmh, _ = fp16_round(s["m_block"])
    return _q45_finish(s["t"], s["r"], _pack_k4_scales(Ls, Lm), dh, dmh, nmax, five)


# ---------------------------------------------------------------- q2_K


def _q2_finish(t, r, scale_bytes, dh, dmh) -> list[np.ndarray]:
    g, _, k = t.shape
    xs = t.reshape(g * 16, 16, k)
    df = dh.view(np.float16).astype(F32)
    dmf = dmh.view(np.float16).astype(F32)
    dd = (df[:, None, :] * (scale_bytes & 0xF)).reshape(g * 16, k)
    dm = (dmf[:, None, :] * (scale_bytes >> 4)).reshape(g * 16, k)
    skip = dd == 0
    L = _requant(xs, dd, dm, 0, 3)
    _fill_skipped(L, skip, r.L)
    Lr = L.reshape(g, 2, 4, 32, k)
    qs = Lr[:, :, 0] | (Lr[:, :, 1] << 2) | (Lr[:, :, 2] << 4) | (Lr[:, :, 3] << 6)
    return [scale_bytes, qs.reshape(g, 64, k), dh, dmh]


def _q2_ref(t: np.ndarray, qw) -> list[np.ndarray]:
    g, _, k = t.shape
    xs = t.reshape(g * 16, 16, k)
    r = QkxResult(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales = r.scale.reshape(g, 16, k)
    mins = r.the_min.reshape(g, 16, k)
    max_scale = _pos_max(scales)
    max_min = _pos_max(mins)
    ok_s = max_scale > 0
    ok_m = max_min > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        isc = blend(ok_s, F32(15) / max_scale, np.zeros_like(max_scale))
        imn = blend(ok_m, F32(15) / max_min, np.zeros_like(max_min))
        lo = ni_int(isc[:, None, :] * scales) * ok_s[:, None, :]
        hi = ni_int(imn[:, None, :] * mins) * ok_m[:, None, :]
        dh, _ = _f16_bits_or_zero(max_scale / F32(15), ok_s)
        dmh, _ = _f16_bits_or_zero(max_min / F32(15), ok_m)
    scale_bytes = ((lo | (hi << 4)) & 255).astype(U8)  # uint8 = l; |= l << 4
    return _q2_finish(t, r, scale_bytes, dh, dmh)


def _q2_imat_p3(s: dict) -> list[np.ndarray]:
    dh, _ = fp16_round(s["d_block"])
    dmh, _ = fp16_round(s["m_block"])
    return _q2_finish(s["t"], s["r"], s["Ls"] | (s["Lm"] << 4), dh, dmh)


# ---------------------------------------------------------------- q3_K


def _pack_q3_scales(codes: np.ndarray) -> np.ndarray:
    """(G, 16, K) 6-bit codes -> (G, 12, K) bytes."""
    g, _, k = codes.shape
    s = np.empty((g, 12, k), U8)
    s[:, 0:8] = (codes[:, 0:8] & 0xF) | ((codes[:, 8:16] & 0xF) << 4)
    h = (codes >> 4).reshape(g, 4, 4, k)  # [q, m]: code j = 4q + m
    s[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return s


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    """(G, 12, K) bytes -> (G, 16, K) int8 scales (code - 32)."""
    g, _, k = s.shape
    c = np.empty((g, 16, k), U8)
    c[:, 0:8] = s[:, 0:8] & 0xF
    c[:, 8:16] = s[:, 0:8] >> 4
    for q in range(4):
        c[:, 4 * q : 4 * q + 4] |= ((s[:, 8:12] >> (2 * q)) & 3) << 4
    return c.astype(np.int8) - np.int8(32)


def _q3_finish(t, search_L, scale_bytes, dh) -> list[np.ndarray]:
    g, _, k = t.shape
    xs = t.reshape(g * 16, 16, k)
    sc = _unpack_q3_scales(scale_bytes)
    df = dh.view(np.float16).astype(F32)
    dd = (df[:, None, :] * sc).reshape(g * 16, k)
    skip = dd == 0
    L = _requant(xs, dd, None, -4, 3)
    _fill_skipped(L, skip, search_L)
    Lr = L.reshape(g, 8, 32, k)
    high = Lr > 3
    hmask = np.zeros((g, 32, k), U8)
    for b in range(8):
        hmask |= high[:, b].astype(U8) << b
    L &= 3
    Lq = L.reshape(g, 2, 4, 32, k)
    qs = Lq[:, :, 0] | (Lq[:, :, 1] << 2) | (Lq[:, :, 2] << 4) | (Lq[:, :, 3] << 6)
    return [hmask, qs.reshape(g, 64, k), scale_bytes, dh]


def _q3_ref_p1(t: np.ndarray, qw) -> tuple[np.ndarray, Q3Quants]:
    g, _, k = t.shape
    return t, Q3Quants(t.reshape(g * 16, 16, k), 4)


def _q3_ref_p2(states: list) -> None:
    Q3Quants.refine([q for _, q in states])


def _q3_ref_p3(state) -> list[np.ndarray]:
    t, q = state
    g, _, k = t.shape
    scale = q.scale()
    scales = scale.reshape(g, 16, k)
    max_scale = signed_absmax(scales)
    nz = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-32) / blend(nz, max_scale, np.ones_like(max_scale))
        l = ni_int(iscale[:, None, :] * scales).astype(np.int8).astype(I32)  # int8_t l = ...
        codes = (np.clip(l, -32, 31) + 32) * nz[:, None, :]
        dh, _ = _f16_bits_or_zero(F32(1) / iscale, nz)
    return _q3_finish(t, q.L_of, _pack_q3_scales(codes.astype(U8)), dh)


def _q3_imat(t: np.ndarray, qw: np.ndarray) -> list[np.ndarray]:
    g, _, k = t.shape
    xs = t.reshape(g * 16, 16, k)
    w = _sigma2_weights(t, qw, True).reshape(g * 16, 16, k)
    sw = rsum(w).reshape(g, 16, k)
    r = QxResult(xs, 4, w)
    rb = QxResult(r.scale.reshape(g, 16, k), 32, sw, exact=True)  # scales may be NaN
    dh, _ = fp16_round(rb.scale)
    return _q3_finish(t, r.L, _pack_q3_scales(rb.L()), dh)


# ---------------------------------------------------------------- q6_K


def _q6(t: np.ndarray, qw) -> list[np.ndarray]:
    g, _, k = t.shape
    xs = t.reshape(g * 16, 16, k)
    r = QxResult(xs, 32, None if qw is None else qw.reshape(g * 16, 16, k))  # impl: raw imatrix
    scales = r.scale.reshape(g, 16, k)
    max_scale = signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / blend(zero, np.ones_like(max_scale), max_scale)
        dh, df = fp16_round(F32(1) / iscale)
        sc = np.minimum(ni_int(iscale[:, None, :] * scales), I32(127)).astype(np.int8)
    dd = (df[:, None, :] * sc).reshape(g * 16, k)
    skip = dd == 0
    L = _requant(xs, dd, None, -32, 31)
    _fill_skipped(L, skip, r.L)
    Lr = L.reshape(g, 2, 4, 32, k)
    ql = np.empty((g, 2, 2, 32, k), U8)
    ql[:, :, 0] = (Lr[:, :, 0] & 0xF) | ((Lr[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (Lr[:, :, 1] & 0xF) | ((Lr[:, :, 3] & 0xF) << 4)
    hb = Lr >> 4
    qh = hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)
    ql = ql.reshape(g, 128, k)
    qh = qh.reshape(g, 64, k)
    scb = sc.view(U8)
    if zero.any():  # the whole block is memset to 0
        keep = (~zero).astype(U8)[:, None, :]
        ql *= keep
        qh *= keep
        scb = scb * keep
        dh = dh * (~zero)
    return [ql, qh, scb, dh]


# ---------------------------------------------------------------- driver


class Kernel:
    """p1(t, qw) -> state per chunk; p2(states) over a super-chunk (None: nothing global);
    p3(state) -> fields for pack_blocks. One-phase kernels just return their fields from p1."""

    def __init__(self, p1, p2=None, p3=None):
        self.p1, self.p2, self.p3 = p1, p2, p3 or (lambda s: s)


def _run(rows: np.ndarray, imatrix: np.ndarray | None, kern: Kernel, nbytes: int) -> np.ndarray:
    n, k = rows.shape
    if k % QK_K:
        raise ValueError(f"K quants need rows whose length is a multiple of {QK_K}, got {k}")
    nbpr = k // QK_K
    xb = rows.reshape(-1, QK_K)
    nb = xb.shape[0]
    qwb = None
    if imatrix is not None:
        qwb = imatrix.reshape(nbpr, QK_K)
    out = np.empty((nb, nbytes), dtype=U8)
    step = max(1, CHUNK // QK_K)
    for s0 in range(0, nb, step * SUPER):
        states = []
        for b0 in range(s0, min(nb, s0 + step * SUPER), step):
            chunk = xb[b0 : b0 + step]
            t = _tlayout(chunk)
            qw = None if qwb is None else _tlayout(qwb[np.arange(b0, b0 + len(chunk)) % nbpr])
            states.append((b0, len(chunk), kern.p1(t, qw)))
        if kern.p2 is not None:
            kern.p2([st for _, _, st in states])
        for b0, m, st in states:
            out[b0 : b0 + m] = _pack(m, kern.p3(st))
    return out.reshape(n, nbpr * nbytes)


def _quantizer(ref: Kernel, imat: Kernel, nbytes: int):
    def quantize(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            if imatrix is None:
                return _run(rows, None, ref, nbytes)
            return _run(rows, imatrix, imat, nbytes)

    return quantize


def _imat_kernel(sub: int, nmax: int, factor2: bool, nq: int, p3) -> Kernel:
    return Kernel(lambda t, qw: _imat_p1(t, qw, sub, nmax, factor2), lambda st: _imat_p2(st, nq), p3)


register("q2_K")(_quantizer(Kernel(_q2_ref), _imat_kernel(16, 3, False, 15, _q2_imat_p3), 84))
register("q3_K")(_quantizer(Kernel(_q3_ref_p1, _q3_ref_p2, _q3_ref_p3), Kernel(_q3_imat), 110))
register("q4_K")(
    _quantizer(
        Kernel(lambda t, qw: _q45_ref(t, 15, -1.0, 0.1, 20, False)),
        _imat_kernel(32, 15, True, 63, lambda s: _q45_imat_p3(s, 15, False)),
        144,
    )
)
register("q5_K")(
    _quantizer(
        Kernel(lambda t, qw: _q45_ref(t, 31, -0.5, 0.1, 15, True)), _imat_kernel(32, 31, True, 63, lambda s: _q45_imat_p3(s, 31, True)), 176
    )
)
register("q6_K")(_quantizer(Kernel(_q6), Kernel(_q6), 210))
