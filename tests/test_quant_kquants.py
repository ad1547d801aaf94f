"""Oracle tests for loraq's K quantizers (q2_K, q3_K, q4_K, q5_K, q6_K), with and without an
importance matrix. The oracle is libgguf (ggml's own `ggml_quantize_chunk`); every block must be
byte-identical. loraq is never compared with itself."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

libgguf = pytest.importorskip("libgguf")

import loraq.kernels as kernels  # noqa: E402
from loraq.kernels import quantize, read_f32  # noqa: E402
from oracle import F32, assert_layouts, assert_same, oracle, random_imatrix  # noqa: E402,F401

_rim = partial(random_imatrix, dead=slice(256, 512))

KTYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
IDS = {"q2_K": 10, "q3_K": 11, "q4_K": 12, "q5_K": 13, "q6_K": 14}


# ------------------------------------------------------------------ random and real rows


@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_random_normal(qtype, with_imatrix):
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((40, 1024)).astype(F32)
    rows *= np.logspace(-6, 4, 40, dtype=F32)[:, None]  # very different row scales
    rows[5, 100:300] = 0  # zero sub-blocks and a partly zero super-block
    rows[6, 256:512] = 0  # a zero super-block inside a row
    rows[7] = np.abs(rows[7])  # non-negative rows: the min clamps to 0
    rows[8] = -np.abs(rows[8])
    im = _rim(1024, 8, zeros=True) if with_imatrix else None
    assert_same(rows, qtype, im, "random normal")


@pytest.mark.parametrize("qtype", KTYPES)
def test_heavy_tails(qtype):
    """Student-t rows: outliers make some sub-block scales round to code 0 (the `if (!d)` skip)."""
    rng = np.random.default_rng(21)
    rows = (rng.standard_t(1.5, (24, 768)) * 0.02).astype(F32)
    assert_same(rows, qtype, None, "student-t")
    assert_same(rows, qtype, _rim(768, 22, zeros=True), "student-t")


@pytest.mark.parametrize("qtype", KTYPES)
def test_shapes_and_chunking(qtype, monkeypatch):
    """One block (lanes padded), a few blocks, and tiny chunks/super-chunks so that chunk and
    super-chunk boundaries fall inside rows."""
    rng = np.random.default_rng(9)
    for shape in [(1, 256), (3, 256), (2, 768)]:
        x = rng.standard_normal(shape).astype(F32)
        assert_same(x, qtype, None, f"{shape}")
        assert_same(x, qtype, _rim(shape[1], 1), f"{shape}")
    monkeypatch.setattr(kernels, "CHUNK", 256 * 24)
    monkeypatch.setattr(kernels, "SUPER", 3)
    x = rng.standard_normal((37, 512)).astype(F32) * F32(0.1)
    assert_same(x, qtype, None, "small chunks")
    assert_same(x, qtype, _rim(512, 2, zeros=True), "small chunks")


@pytest.fixture(scope="module")
def ffn_down(smollm2_q4_1) -> np.ndarray:
    from loraq.gguf_io import open_gguf

    f = open_gguf(smollm2_q4_1)
    return np.concatenate([read_f32(f, f.tensor(f"blk.{i}.ffn_down.weight")) for i in (0, 17)])  # 1152 x 1536


@pytest.mark.real
@pytest.mark.parametrize("qtype", KTYPES)
def test_real_weights(qtype, ffn_down):
    assert_same(ffn_down, qtype, None, "ffn_down")
    im = _rim(ffn_down.shape[1], 100, zeros=True)
    assert_same(ffn_down, qtype, im, "ffn_down")


# ------------------------------------------------------------------ adversarial super-blocks


def _blocks() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    n = 256
    b = []
    z = np.zeros(n, F32)
    b.append(z.copy())  # all zero
    nz = z.copy()
    nz[::3] = -0.0
    b.append(nz)  # negative zeros
    small = (rng.standard_normal(n) * 1e-3).astype(F32)
    out = small.copy()
    out[17] = 1e4
    b.append(out)  # one huge outlier: most sub-block scale codes round to 0
    out2 = small.copy()
    out2[200] = -3e5
    b.append(out2)
    b.append(np.full(n, 0.37, F32))  # constant
    b.append(np.full(n, -1234.5, F32))
    b.append(np.full(n, 1.4e-45, F32))  # smallest subnormal, constant
    b.append((rng.standard_normal(n) * 1e-40).astype(F32))  # subnormal block
    sub = z.copy()
    sub[[0, 5, 9, 77, 200]] = [1e-38, -3e-39, 2e-40, 1e-41, -5e-39]
    b.append(sub)
    b.append(np.where(np.arange(n) % 2, 65504, -65504).astype(F32))  # ±max f16, alternating
    b.append(np.where(np.arange(n) % 2, 1.0, -1.0).astype(F32))  # alternating signs
    b.append(np.where(np.arange(n) % 3, 2.0, -1.0).astype(F32))
    zs = rng.standard_normal(n).astype(F32)
    zs[32:64] = 0  # a zero sub-block inside a non-zero super-block
    zs[128:144] = 0
    b.append(zs)
    tiny_sub = rng.standard_normal(n).astype(F32)
    tiny_sub[64:96] *= F32(1e-6)  # a sub-block whose scale code rounds to 0: keeps the search L
    tiny_sub[0:16] *= F32(1e-3)
    b.append(tiny_sub)
    b.append(np.abs(rng.standard_normal(n)).astype(F32) + F32(0.5))  # all positive
    b.append(-np.abs(rng.standard_normal(n)).astype(F32) - F32(0.5))  # all negative
    b.append((rng.standard_normal(n) * 3e-16).astype(F32))  # amax below GROUP_MAX_EPS
    b.append((rng.standard_normal(n) * 6e-16).astype(F32))  # around 1e-15
    tie = rng.standard_normal(n).astype(F32)
    tie[4], tie[20] = -5.0, 5.0  # both signs of the max magnitude: first one wins
    b.append(tie)
    tie2 = tie.copy()
    tie2[4], tie2[20] = 5.0, -5.0
    b.append(tie2)
    b.append(np.tile(np.arange(-8, 8, dtype=F32) * F32(0.5), n // 16))  # grid values: rounding ties
    b.append(np.tile(np.arange(16, dtype=F32), n // 16))
    one = z.copy()
    one[::16] = rng.standard_normal(n // 16).astype(F32)  # one non-zero element per sub-block
    b.append(one)
    sparse = rng.standard_normal(n).astype(F32) * (rng.random(n) < 0.1)
    b.append(sparse.astype(F32))
    b.append((rng.standard_normal(n) * 1e8).astype(F32))  # d overflows fp16 -> inf
    big = (rng.standard_normal(n) * 1e36).astype(F32)
    big[3], big[100] = 3e38, -3e38  # max - min overflows float32
    b.append(big)
    b.append((rng.standard_normal(n) * 1e-20).astype(F32))  # tiny normal values: d underflows fp16
    b.append((rng.standard_normal(n) * 5e-6).astype(F32))  # d fp16-subnormal
    huge = rng.standard_normal(n).astype(F32)
    huge[:64] *= F32(1e20)  # w = x*x overflows in a few sub-blocks only: NaN/inf scales
    b.append(huge)
    huge2 = (rng.standard_normal(n) * 1e19).astype(F32)
    huge2[200:216] = 0.5
    b.append(huge2)
    steps = np.repeat(np.logspace(-4, 2, 16, dtype=F32), 16)
    b.append((rng.standard_normal(n).astype(F32) * steps).astype(F32))  # sub-block scales span 1e6
    return b


@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_adversarial_blocks(qtype, with_imatrix):
    assert_layouts(_blocks(), qtype, lambda k: [_rim(k, 5, zeros=True) if with_imatrix else None])


@pytest.mark.parametrize("qtype", KTYPES)
def test_imatrix_edge_values(qtype):
    """imatrix all zero, with huge/tiny entries, and zeros inside otherwise live columns."""
    rng = np.random.default_rng(13)
    rows = rng.standard_normal((6, 512)).astype(F32)
    assert_same(rows, qtype, np.zeros(512, F32), "zero imatrix")
    im = _rim(512, 14)
    im[::7] = 0
    im[1::11] = F32(1e20)
    im[2::13] = F32(1e-30)
    assert_same(rows, qtype, im, "extreme imatrix")
    # weights*x*l overflow float32 in some sub-blocks only: inf/NaN sub-block scales reach the
    # second-level searches (make_qp_quants / make_qx_quants over the scales)
    big = rows * np.logspace(0, 10, 6, dtype=F32)[:, None]
    assert_same(big, qtype, im, "overflowing weights")
    assert_same(rows, qtype, np.ones(512, F32), "unit imatrix")


def test_shapes_rejected():
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 100), F32), "q4_K")
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 512), F32), "q4_K", np.ones(256, F32))
