"""Oracle tests for loraq's iq4_nl, iq4_xs, tq1_0 and tq2_0 quantizers.

The oracle is libgguf (ggml's own `ggml_quantize_chunk`): iq4_* with and without an imatrix
(both run quantize_row_iq4_nl_impl with ntry = 7), tq* ignore the imatrix. Every block must be
byte-identical. loraq is never compared with itself; the two helper checks at the end compare
loraq's vectorized pieces with plain transcriptions of the C loops."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

libgguf = pytest.importorskip("libgguf")

from loraq.ggml_types import ggml_type  # noqa: E402
from loraq.kernels import iquants, numeric, read_f32  # noqa: E402
from oracle import F32, assert_layouts, assert_same, oracle, random_imatrix, seq_sum  # noqa: E402,F401

IQ4 = ["iq4_nl", "iq4_xs"]
TERNARY = ["tq1_0", "tq2_0"]
ALL = IQ4 + TERNARY
KV = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
_rim = partial(random_imatrix, dead=slice(64, 96))


# ------------------------------------------------------------------ helpers


def imatrix_cases(qtype: str, k: int, seed: int) -> list[np.ndarray | None]:
    if qtype in TERNARY:
        return [None, _rim(k, seed)]  # must be ignored
    return [None, _rim(k, seed), _rim(k, seed + 1, zeros=True)]


# ------------------------------------------------------------------ random and real rows


@pytest.mark.parametrize("qtype", ALL)
def test_random_normal(qtype):
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((24, 1024)).astype(F32)
    rows *= np.logspace(-6, 4, 24, dtype=F32)[:, None]  # very different row scales
    rows[5, 256:512] = 0  # a zero super-block inside a row
    rows[6, 32:64] = 0  # a zero sub-block inside a non-zero super-block
    rows[7, 512:768] *= F32(1e-3)  # a quiet super-block next to loud ones
    rows[8] = rng.standard_t(2, 1024).astype(F32)  # heavy tails: outlier-driven scales
    for im in imatrix_cases(qtype, 1024, 8):
        assert_same(rows, qtype, im, "random normal")


@pytest.mark.parametrize("qtype", ALL)
def test_odd_shapes(qtype):
    """Fewer blocks than lanes (padding), and long rows spanning several chunks."""
    rng = np.random.default_rng(9)
    qk = ggml_type(qtype).block
    small = rng.standard_normal((1, qk)).astype(F32)
    three = rng.standard_normal((3, 2 * qk)).astype(F32)
    long = rng.standard_normal((2, 300_544)).astype(F32)  # 1174 super-blocks per row
    for rows, what in [(small, "1 block"), (three, "3 rows"), (long, "2 long rows")]:
        for im in imatrix_cases(qtype, rows.shape[1], 3)[:2]:
            assert_same(rows, qtype, im, what)


@pytest.fixture(scope="module")
def real_rows(smollm2_q4_1) -> dict[str, np.ndarray]:
    from loraq.gguf_io import open_gguf

    f = open_gguf(smollm2_q4_1)
    return {
        "attn_q.0": read_f32(f, f.tensor("blk.0.attn_q.weight")),  # 576 x 576 (iq4_nl only)
        "ffn_down.0": read_f32(f, f.tensor("blk.0.ffn_down.weight")),  # 576 x 1536
    }


@pytest.mark.real
@pytest.mark.parametrize("qtype", ALL)
def test_real_weights(qtype, real_rows):
    for i, (name, rows) in enumerate(real_rows.items()):
        if rows.shape[1] % ggml_type(qtype).block:
            continue
        for im in imatrix_cases(qtype, rows.shape[1], 100 + i):
            assert_same(rows, qtype, im, name)


# ------------------------------------------------------------------ adversarial blocks


def _superblocks() -> list[np.ndarray]:
    """256-element blocks (8 sub-blocks of 32) built to hit edge cases."""
    rng = np.random.default_rng(11)
    b = []
    z = np.zeros(256, F32)
    b.append(z.copy())  # all zero: iq4_xs d = -0.0, scales_h AAAA; iq4_nl d = +0, qs 88
    nz = z.copy()
    nz[::7] = -0.0
    b.append(nz)  # signed zeros
    part = (rng.standard_normal(256)).astype(F32)
    part[64:96] = 0
    part[160:192] = 1e-16  # below GROUP_MAX_EPS
    b.append(part)  # zero sub-blocks inside a live super-block
    b.append(np.full(256, 0.37, F32))  # constant
    b.append(np.full(256, -1234.5, F32))
    out = (rng.standard_normal(256) * 1e-3).astype(F32)
    out[17] = 1e4
    b.append(out)  # one huge outlier
    out2 = out.copy()
    out2[200] = -3e5  # past fp16 range: d overflows to inf in fp16
    b.append(out2)
    b.append(np.where(np.arange(256) % 2, 65504, -65504).astype(F32))  # ±max f16, alternating
    b.append(np.where(np.arange(256) % 2, 1.0, -1.0).astype(F32))  # alternating signs
    tie = rng.standard_normal(256).astype(F32)
    tie[4], tie[20] = -5.0, 5.0  # both signs of the max magnitude: the first one wins
    b.append(tie)
    b.append((rng.standard_normal(256) * 1e-40).astype(F32))  # subnormal
    sub = z.copy()
    sub[[0, 5, 9, 100]] = [1e-38, -3e-39, 2e-40, 1e-45]  # tq: d subnormal, 1/d = inf
    b.append(sub)
    sub2 = z.copy()
    sub2[[3, 77]] = [3e-39, -1e-39]  # tq: d subnormal but 1/d finite
    b.append(sub2)
    b.append(np.full(256, 1.4e-45, F32))  # smallest subnormal, constant
    b.append((rng.standard_normal(256) * 3e-16).astype(F32))  # amax below 1e-15
    b.append((rng.standard_normal(256) * 6e-16).astype(F32))  # around 1e-15
    # best_index_int8 ties: max 127 -> first pass id = 1 and itry=0 id = -1, so id*x is x itself;
    # midpoints of kvalues and their float neighbours (ties go up)
    mids = np.array([(KV[i] + KV[i + 1]) / 2 for i in range(15)], F32)
    cand = np.concatenate([mids, np.nextafter(mids, np.inf), -mids, np.nextafter(-mids, -np.inf)]).astype(F32)
    for s in range(0, len(cand), 31):
        blk = np.resize(cand[s : s + 31], 31)
        x = np.concatenate([[127], blk]).astype(F32)
        b.append(np.tile(x, 8))
        b.append(np.tile(np.concatenate([[-127], blk]).astype(F32), 8))
    # kvalues themselves at unit scale, and a scale whose sub-block codes are exact
    b.append(np.tile(np.array(KV + KV, F32), 8))
    b.append(np.repeat(np.array([1, 2, 4, 8, 16, 32, 0.5, 0.25], F32), 32) * np.tile(np.array(KV + KV, F32), 8) / 127)
    # lroundf ties: max 2 -> d = 2, id = 0.5, x = ±1 gives x*id = ±0.5 exactly (away from zero)
    t = np.resize(np.array([1, -1, np.nextafter(F32(1), F32(0)), np.nextafter(F32(-1), F32(0)), 0.5, 2, -2], F32), 256)
    t[0] = 2
    b.append(t.astype(F32))
    b.append(-t.astype(F32))
    # a sub-block scale of -0.0 or exact zero next to negative-dominated ones
    neg = -np.abs(rng.standard_normal(256)).astype(F32)
    neg[0:32] = 0
    b.append(neg)
    return b


@pytest.mark.parametrize("qtype", ALL)
def test_adversarial_blocks(qtype):
    assert_layouts(_superblocks(), qtype, lambda k: imatrix_cases(qtype, k, 5))


@pytest.mark.parametrize("qtype", IQ4)
def test_imatrix_edge_values(qtype):
    """All-zero imatrix (every sumq2 = 0), tiny and huge importances, imatrix zero exactly on the
    outliers (the scale is then set by the small elements)."""
    rng = np.random.default_rng(21)
    rows = rng.standard_normal((8, 512)).astype(F32)
    rows[:, ::37] *= 50
    cases = [
        np.zeros(512, F32),
        np.full(512, 1e-30, F32),
        np.full(512, 1e30, F32),
        np.where(np.arange(512) % 37 == 0, 0, 1).astype(F32),
        np.where(np.arange(512) % 37 == 0, 1e6, 1e-6).astype(F32),
    ]
    for i, im in enumerate(cases):
        assert_same(rows, qtype, im, f"imatrix case {i}")


@pytest.mark.parametrize("qtype", IQ4)
def test_overflowing_weights(qtype):
    """x² overflows float32 (w = inf, d = NaN): ggml still writes bytes (fp16 NaN d, index 15)."""
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((2, 256)).astype(F32)
    rows[0, 3] = 3e20
    rows[1, 40:48] = -2e38
    assert_same(rows, qtype, None, "overflow")
    assert_same(rows, qtype, _rim(256, 6), "overflow")


# ------------------------------------------------------------------ helpers vs C transcriptions


def _best_index_c(x: float) -> int:
    """best_index_int8(16, kvalues_iq4nl, x), line by line in float32."""
    x = F32(x)
    v = [F32(k) for k in KV]
    if x <= v[0]:
        return 0
    if x >= v[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < v[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if F32(x - v[mu - 1]) < F32(v[mu] - x) else mu


def test_best_index_lookup_matches_c_loop():
    rng = np.random.default_rng(1)
    mids = np.array([(KV[i] + KV[i + 1]) / 2 for i in range(15)], F32)
    near = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    xs = np.concatenate(
        [
            near,
            np.array(KV, F32),
            rng.uniform(-140, 140, 3000),
            rng.standard_normal(500) * 1e-30,
            [0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, np.inf, -np.inf, np.nan, 300, -300, 151, -151],
        ]
    ).astype(F32)
    pad = (-len(xs)) % 32
    xs = np.concatenate([xs, np.zeros(pad, F32)])
    t = xs.reshape(-1, 32).T[None]  # (1, 32, n) T layout, id = 1
    got = iquants._best_index(t, np.ones((1, t.shape[2]), F32))[0].T.reshape(-1)
    want = np.array([_best_index_c(v) for v in xs])
    bad = np.nonzero(got != want)[0]
    assert len(bad) == 0, f"x={xs[bad[:5]].tolist()} got {got[bad[:5]].tolist()} want {want[bad[:5]].tolist()}"


@pytest.mark.parametrize("shape", [(1, 32, 16), (3, 32, 17), (32, 32, 256), (2, 256, 16), (1, 32, 2)])
def test_rsum_is_sequential(shape):
    """The kernels sum blocks with np.add.reduce over axis 1; that must be the C left-to-right sum."""
    rng = np.random.default_rng(shape[2])
    t = (rng.standard_normal(shape) * np.exp2(rng.integers(-24, 24, shape))).astype(F32)
    np.testing.assert_array_equal(numeric.rsum(t).view(np.uint32), seq_sum(t).view(np.uint32))
