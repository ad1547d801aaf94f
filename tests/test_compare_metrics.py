"""compare: the llama-perplexity base-logits file, the KLD/PPL statistics, reports and gates.

Oracles: the file layout is checked byte for byte against bytes assembled by hand with struct from
docs/llama-cpp.md §8.2; the statistics against a plain per-token float64 Python loop over the
file's bytes (§8.3–8.4), sharing no code with loraq.compare."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct

import numpy as np
import pytest

from loraq.compare.gates import GateFailure, check_gates, enforce_gates
from loraq.compare.kld_file import ReferenceFile, ReferenceWriter, file_size
from loraq.compare.metrics import KLDAccumulator, KLDResult, PerplexityAccumulator
from loraq.compare.render import write_reports
from loraq.compare.report import VariantScore, build_report
from loraq.errors import BadInput, GateFailed
from loraq.pipeline.config import Gates

U = 2.0**-12  # scale when max − min_logit = 65535·2^-12: codes are exact multiples
M = -65535 * U  # a min_logit 0 − M away from a max of 0


# ---------------------------------------------------------------------------------------------
# Independent oracle


def f32(x: float) -> float:
    return float(np.float32(x))


def c_expf(x: float) -> float:
    return f32(math.exp(f32(x)))


def oracle_record(row: list[float]) -> tuple[float, float, list[int]]:
    """§8.2's encoding of one position, in plain Python with float32 rounding where C has floats."""
    row = [f32(v) for v in row]
    mx, mn = max(row), min(row)
    mn = max(mn, f32(mx - 16))
    lse = f32(math.log(sum(c_expf(v - mx) for v in row)))
    min_log_prob = f32(f32(mn - mx) - lse)
    scale = f32(f32(mx - mn) / 65535)
    if scale == 0:
        return scale, min_log_prob, [0] * len(row)
    inv = f32(1 / scale)
    codes = []
    for v in row:
        if v > mn:
            q = f32(inv * f32(v - mn))
            codes.append(round(q) & 0xFFFF)  # Python's round() is half to even, like nearest_int
        else:
            codes.append(0)
    return scale, min_log_prob, codes


def oracle_file(n_ctx: int, n_vocab: int, tokens: np.ndarray, chunks: list[np.ndarray]) -> bytes:
    out = b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, len(chunks))
    out += struct.pack(f"<{tokens.size}i", *tokens.ravel().tolist())
    for logits in chunks:
        for j in range(n_ctx // 2, n_ctx - 1):
            scale, mlp, codes = oracle_record(logits[j].tolist())
            out += struct.pack("<ff", scale, mlp) + struct.pack(f"<{n_vocab}H", *codes)
            if n_vocab % 2:
                out += b"\0\0"
    return out


def oracle_read(data: bytes):
    """Parse a base-logits file with struct: (n_ctx, n_vocab, tokens, records[chunk][pos])."""
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", data, 8)
    off = 20
    tokens = list(struct.unpack_from(f"<{n_ctx * n_chunk}i", data, off))
    off += 4 * n_ctx * n_chunk
    nv = 2 * ((n_vocab + 1) // 2) + 4
    recs = []
    for _ in range(n_chunk):
        chunk = []
        for _ in range(n_ctx - 1 - n_ctx // 2):
            scale, mlp = struct.unpack_from("<ff", data, off)
            codes = struct.unpack_from(f"<{n_vocab}H", data, off + 8)
            chunk.append((scale, mlp, codes))
            off += 2 * nv
        recs.append(chunk)
    assert off == len(data)
    return n_ctx, n_vocab, tokens, recs


def first_argmax(xs) -> int:
    best, ib = xs[0], 0
    for i, x in enumerate(xs):
        if x > best:
            best, ib = x, i
    return ib


def expf(values: list[float]) -> list[float]:
    """llama-perplexity's expf of float32 differences or log-probs. numpy's float32 exp, as the
    code under test uses: its SIMD expf is within an ulp or two of the true value, not correctly
    rounded, and a correctly rounded oracle would move each log-partition by up to ~1e-7 nats
    (that exp's accuracy is numpy's to test, not this oracle's)."""
    return [float(v) for v in np.exp(np.asarray(values, dtype=np.float32))]


def oracle_stats(data: bytes, cand: list[np.ndarray], cutoff: bool = True) -> dict:
    """§8.3 per token and §8.4's numbers, one token at a time, float64."""
    n_ctx, _, tokens, recs = oracle_read(data)
    first = n_ctx // 2
    nll_l, nllb_l, kld_l, dp_l, same_l = [], [], [], [], []
    for c, logits in enumerate(cand):
        for k, j in enumerate(range(first, n_ctx - 1)):
            x = [float(v) for v in np.asarray(logits[j], dtype=np.float32)]
            tok = tokens[c * n_ctx + j + 1]
            scale, mlp, codes = recs[c][k]
            lpb = [float(np.float32(scale) * np.float32(q) + np.float32(mlp)) for q in codes]
            mx = max(x)
            lse = math.log(math.fsum(expf([v - mx for v in x])))
            logq = [v - mx - lse for v in x]
            nll = mx + lse - x[tok]
            nll_b = -lpb[tok]
            kld = math.fsum(e * (b - q) for e, b, q in zip(expf(lpb), lpb, logq) if (b > -16.0 or not cutoff))
            nll_l.append(nll)
            nllb_l.append(nll_b)
            kld_l.append(kld)
            dp_l.append(math.exp(-nll) - math.exp(-nll_b))
            same_l.append(first_argmax(x) == first_argmax(lpb))
    n = len(nll_l)

    def mu(vals, sq):
        m = sum(vals) / n
        var = sum(sq) / n - m * m
        return m, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)

    def pct(vals, f):
        v = sorted(vals)
        if f <= 0:
            return v[0]
        if f >= 1:
            return v[-1]
        p = f * (len(v) - 1)
        i = int(p)
        p -= i
        return (1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)]

    def med(vals):
        v = sorted(vals)
        return 0.5 * (v[n // 2] + v[n // 2 - 1]) if n % 2 == 0 else v[n // 2]

    lq, uq = mu(nll_l, [a * a for a in nll_l])
    lb, ub = mu(nllb_l, [a * a for a in nllb_l])
    cov = (sum(a * b for a, b in zip(nll_l, nllb_l)) / n - lq * lb) / (n - 1) if n >= 10 else 0.0
    km, ku = mu(kld_l, [a * a for a in kld_l])
    dm, du = mu(dp_l, [a * a for a in dp_l])
    mse, mse_u = mu([a * a for a in dp_l], [a**4 for a in dp_l])
    same = sum(same_l) / n
    ppl, ppl_b = math.exp(lq), math.exp(lb)
    return {
        "n_tokens": n,
        "ppl": ppl,
        "ppl_unc": ppl * uq,
        "ppl_base": ppl_b,
        "ppl_base_unc": ppl_b * ub,
        "ppl_cor": cov / (uq * ub) if uq * ub > 0 else math.nan,
        "ln_ppl_ratio": lq - lb,
        "ln_ppl_ratio_unc": math.sqrt(uq * uq + ub * ub - 2 * cov),
        "ppl_ratio": math.exp(lq - lb),
        "ppl_diff": ppl - ppl_b,
        "ppl_diff_unc": math.sqrt((ppl * uq) ** 2 + (ppl_b * ub) ** 2 - 2 * ppl * ppl_b * cov),
        "kld_mean": km,
        "kld_unc": ku,
        "kld_max": max(kld_l),
        "kld_min": min(kld_l),
        "kld_p99": pct(kld_l, 0.99),
        "kld_p90": pct(kld_l, 0.90),
        "kld_p1": pct(kld_l, 0.01),
        "kld_median": med(kld_l),
        "dp_mean": dm,
        "dp_unc": du,
        "dp_p75": pct(dp_l, 0.75),
        "dp_median": med(dp_l),
        "dp_rms": math.sqrt(mse),
        "dp_rms_unc": 0.5 / math.sqrt(mse) * mse_u if mse > 0 else 0.0,
        "max_abs_dp": max(abs(a) for a in dp_l),
        "same_top": same,
        "same_top_unc": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "nll": nll_l,
        "same": same_l,
    }


def write_ref(path, n_ctx, tokens, chunks):
    with ReferenceWriter(path, n_ctx, chunks[0].shape[1], tokens) as w:
        for i, c in enumerate(chunks):
            w.add_chunk(i, c)
    return w


def score(path, cand) -> KLDResult:
    with ReferenceFile(path) as ref:
        acc = KLDAccumulator(ref)
        for i, c in enumerate(cand):
            acc.add_chunk(i, c)
        return acc.result()


# ---------------------------------------------------------------------------------------------
# File layout


def hand_chunks(n_vocab: int) -> list[np.ndarray]:
    """n_ctx = 6: positions 3 and 4 are scored; rows 0–2 and 5 must not reach the file."""
    junk = np.full(n_vocab, 1e4, dtype=np.float32)
    if n_vocab == 5:  # odd: exact scale 2^-12, half-to-even ties at 0.5 and 2.5 steps, 1.5 → 2
        a = [0.0, M, M + 0.5 * U, M + 1.5 * U, M + 2.5 * U]
        b = [0.0, -20.0, -12.0, 0.0, -16.5]  # min clamped to max − 16
        c = [1.0] * 5  # scale 0: all codes 0
        d = [-1.0, 0.0, M, -2.0, 3.0]
    else:
        a = [0.0, M, -1.0, M + 2.5 * U]
        b = [2.0, -30.0, -10.0, 2.0]
        c = [-3.0] * 4
        d = [0.5, -0.25, 7.0, 1.0]
    rows0 = [junk, junk, junk, a, b, junk]
    rows1 = [junk, junk, junk, c, d, junk]
    return [np.array(r, dtype=np.float32) for r in (rows0, rows1)]


def test_hand_example_codes():
    # The hand-checkable parts of the example, stated outright.
    scale, mlp, codes = oracle_record([0.0, M, M + 0.5 * U, M + 1.5 * U, M + 2.5 * U])
    assert scale == U and codes == [65535, 0, 0, 2, 2]
    assert mlp == f32(M - f32(math.log(1 + sum(c_expf(v) for v in (M, M + 0.5 * U, M + 1.5 * U, M + 2.5 * U)))))
    scale, mlp, codes = oracle_record([0.0, -20.0, -12.0, 0.0, -16.5])
    assert codes == [65535, 0, 16384, 65535, 0] and scale == f32(f32(16) / 65535)
    scale, mlp, codes = oracle_record([1.0] * 5)
    assert scale == 0 and codes == [0] * 5 and mlp == f32(-f32(math.log(5)))


@pytest.mark.parametrize("n_vocab", [5, 4])
def test_file_bytes_match_hand_layout(tmp_path, n_vocab):
    n_ctx = 6
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % n_vocab
    chunks = hand_chunks(n_vocab)
    p = tmp_path / "ref.kld"
    write_ref(p, n_ctx, tokens, chunks)
    data = p.read_bytes()
    want = oracle_file(n_ctx, n_vocab, tokens, chunks)
    assert data == want
    # Odd vocab: a zero pad u16 closes every record; even: none.
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rec0 = data[20 + 4 * 12 : 20 + 4 * 12 + 2 * nv]
    assert len(rec0) == (8 + 2 * n_vocab + (2 if n_vocab % 2 else 0))
    if n_vocab % 2:
        assert rec0[-2:] == b"\0\0"
    # Reading back gives the same records, tokens and targets.
    with ReferenceFile(p) as ref:
        assert (ref.n_ctx, ref.n_vocab, ref.n_chunk, ref.first, ref.n_scored) == (6, n_vocab, 2, 3, 2)
        assert (ref.tokens == tokens).all()
        assert ref.targets(1).tolist() == tokens[1, 4:].tolist()
        _, _, _, recs = oracle_read(data)
        for c in range(2):
            scale, mlp, codes = ref.chunk(c)
            for k in range(2):
                assert (float(scale[k]), float(mlp[k]), tuple(codes[k].tolist())) == recs[c][k]


@pytest.mark.parametrize("n_ctx,n_vocab,n_chunk", [(6, 5, 2), (7, 4, 1), (16, 11, 3), (9, 8, 2), (4, 1, 1)])
def test_size_formula(tmp_path, n_ctx, n_vocab, n_chunk):
    rng = np.random.default_rng(n_ctx * 100 + n_vocab)
    chunks = [rng.normal(0, 3, (n_ctx, n_vocab)).astype(np.float32) for _ in range(n_chunk)]
    tokens = rng.integers(0, n_vocab, (n_chunk, n_ctx))
    p = tmp_path / "ref.kld"
    write_ref(p, n_ctx, tokens, chunks)
    want = 20 + 4 * n_ctx * n_chunk + n_chunk * (n_ctx - 1 - n_ctx // 2) * (2 * ((n_vocab + 1) // 2) + 4) * 2
    assert p.stat().st_size == want == file_size(n_ctx, n_vocab, n_chunk)
    assert p.read_bytes() == oracle_file(n_ctx, n_vocab, tokens, chunks)


def test_writer_chunk_order_scored_rows_and_atomicity(tmp_path):
    rng = np.random.default_rng(1)
    n_ctx, V = 10, 7
    chunks = [rng.normal(0, 4, (n_ctx, V)).astype(np.float32) for _ in range(3)]
    tokens = rng.integers(0, V, (3, n_ctx))
    a, b = tmp_path / "a.kld", tmp_path / "b.kld"
    write_ref(a, n_ctx, tokens, chunks)
    with ReferenceWriter(b, n_ctx, V, tokens.ravel()) as w:
        for i in (2, 0, 1):  # any order, and only the scored rows
            w.add_chunk(i, chunks[i][n_ctx // 2 : n_ctx - 1])
    assert a.read_bytes() == b.read_bytes()

    c = tmp_path / "c.kld"
    with pytest.raises(RuntimeError), ReferenceWriter(c, n_ctx, V, tokens) as w:
        w.add_chunk(0, chunks[0])
        raise RuntimeError("interrupted")
    w2 = ReferenceWriter(c, n_ctx, V, tokens)
    w2.add_chunk(1, chunks[1])
    with pytest.raises(ValueError, match="never added"):
        w2.close()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.kld", "b.kld"]

    bad = chunks[0].copy()
    bad[7, 3] = np.nan
    with pytest.raises(BadInput, match="NaN"), ReferenceWriter(c, n_ctx, V, tokens) as w:
        w.add_chunk(0, bad)
    with pytest.raises(BadInput, match="shape"), ReferenceWriter(c, n_ctx, V, tokens) as w:
        w.add_chunk(0, chunks[0][:, :5])
    assert not c.exists()


def test_reader_rejects_corrupt_files(tmp_path):
    rng = np.random.default_rng(2)
    p = tmp_path / "ref.kld"
    write_ref(p, 8, rng.integers(0, 5, (2, 8)), [rng.normal(size=(8, 5)).astype(np.float32) for _ in range(2)])
    data = p.read_bytes()
    (tmp_path / "short.kld").write_bytes(data[:-2])
    with pytest.raises(BadInput, match="truncated or corrupt"):
        ReferenceFile(tmp_path / "short.kld")
    (tmp_path / "magic.kld").write_bytes(b"_notlog_" + data[8:])
    with pytest.raises(BadInput, match="not a llama-perplexity"):
        ReferenceFile(tmp_path / "magic.kld")


# ---------------------------------------------------------------------------------------------
# Statistics against the oracle

FIELDS = [
    "ppl", "ppl_unc", "ppl_base", "ppl_base_unc", "ppl_cor", "ln_ppl_ratio", "ln_ppl_ratio_unc", "ppl_ratio",
    "ppl_diff", "ppl_diff_unc", "kld_mean", "kld_unc", "kld_max", "kld_min", "kld_p99", "kld_p90", "kld_p1",
    "kld_median", "dp_mean", "dp_unc", "dp_p75", "dp_median", "dp_rms", "dp_rms_unc", "max_abs_dp", "same_top",
    "same_top_unc",
]  # fmt: skip


def assert_matches_oracle(res: KLDResult, want: dict, loose: tuple[str, ...] = ()):
    """Agreement to double rounding; `loose` fields are differences of nearly equal sums
    (sqrt(u² + u_b² − 2cov) when Q ≈ base), where only the summation order differs."""
    assert res.n_tokens == want["n_tokens"]
    for f in FIELDS:
        tol = {"rel": 1e-4, "abs": 1e-9} if f in loose else {"rel": 1e-9, "abs": 1e-12}
        assert getattr(res, f) == pytest.approx(want[f], nan_ok=True, **tol), f


@pytest.mark.parametrize("n_vocab,n_ctx,n_chunk", [(37, 24, 5), (50, 31, 3)])
def test_metrics_match_per_token_oracle(tmp_path, n_vocab, n_ctx, n_chunk):
    rng = np.random.default_rng(n_vocab)
    base = [rng.normal(0, 5, (n_ctx, n_vocab)).astype(np.float32) for _ in range(n_chunk)]
    cand = [(b + rng.normal(0, 0.7, b.shape)).astype(np.float32) for b in base]
    tokens = rng.integers(0, n_vocab, (n_chunk, n_ctx))
    p = tmp_path / "ref.kld"
    write_ref(p, n_ctx, tokens, base)
    want = oracle_stats(p.read_bytes(), cand)
    assert want["n_tokens"] > 30 and 0 < want["same_top"] < 1  # the test exercises both outcomes
    assert_matches_oracle(score(p, cand), want)

    # The reference's own PPL over the same positions (the reference stage feeds the same logits).
    ref_nll = oracle_stats(p.read_bytes(), base)["nll"]
    n = len(ref_nll)
    m = sum(ref_nll) / n
    unc = math.sqrt((sum(a * a for a in ref_nll) / n - m * m) / (n - 1))
    pa = PerplexityAccumulator(n_ctx, tokens)
    for i, b in enumerate(base):
        pa.add_chunk(i, b)
    for r in (pa.result(),):
        assert r.n_tokens == n
        assert r.ppl == pytest.approx(math.exp(m), rel=1e-12)
        assert r.ppl_unc == pytest.approx(math.exp(m) * unc, rel=1e-9)


def test_identical_logits_give_zero_kld(tmp_path):
    rng = np.random.default_rng(3)
    base = [rng.normal(0, 2, (20, 29)).astype(np.float32) for _ in range(4)]
    tokens = rng.integers(0, 29, (4, 20))
    p = tmp_path / "ref.kld"
    write_ref(p, 20, tokens, base)
    res = score(p, base)
    # Only the uint16 coding error remains (first order, ~scale/2 = 1.2e-4 per logit, either sign).
    assert abs(res.kld_mean) < 2e-5 and max(abs(res.kld_max), abs(res.kld_min)) < 1e-4
    assert res.same_top == 1.0
    assert abs(res.ln_ppl_ratio) < 1e-3 and res.dp_rms < 1e-3
    assert_matches_oracle(res, oracle_stats(p.read_bytes(), base), loose=("ln_ppl_ratio_unc", "ppl_diff_unc"))


def one_row_chunks(rows: list[list[float]]) -> list[np.ndarray]:
    """n_ctx = 4 puts exactly one scored position (index 2) in each chunk."""
    out = []
    for r in rows:
        c = np.zeros((4, len(r)), dtype=np.float32)
        c[2] = r
        out.append(c)
    return out


def test_kld_cutoff_at_minus_16(tmp_path):
    # Four near-certain tokens make lse ≈ 1.4: the −15.5 logits decode to ≈ −16.9 with non-zero
    # codes (above min_logit) and must be left out; the candidate moves mass onto them so it shows.
    row = [0.0, 0.0, 0.0, 0.0, -15.5, -15.9, -30.0, -1.0, -15.7]
    cand_row = [0.0, 0.0, 0.0, 0.0, 2.0, 1.5, -30.0, -1.0, 1.0]
    p = tmp_path / "ref.kld"
    write_ref(p, 4, np.zeros((3, 4), dtype=np.int32), one_row_chunks([row] * 3))
    with ReferenceFile(p) as ref:
        lpb = ref.decoded(0)[0]
        codes = ref.chunk(0)[2]
        assert codes[0, 4] > 0 and -17 < lpb[4] < -16  # coded, but below the cutoff
    cand = one_row_chunks([cand_row] * 3)
    res = score(p, cand)
    with_cut = oracle_stats(p.read_bytes(), cand, cutoff=True)
    no_cut = oracle_stats(p.read_bytes(), cand, cutoff=False)
    assert res.kld_mean == pytest.approx(with_cut["kld_mean"], rel=1e-12)
    assert abs(no_cut["kld_mean"] - with_cut["kld_mean"]) > 1e-8


def test_same_top_uses_first_index_argmax(tmp_path):
    rows = [
        [0.0, 3.0, 1.0, 3.0, -2.0],  # exact tie at 1 and 3: both argmaxes are 1
        [0.0, 3.0, 1.0, 3.0, -2.0],
        [0.0, 5.0 - 1e-5, 5.0, 1.0, 2.0],  # true max at 2, but codes tie at 65535: base argmax is 1
    ]
    cands = [
        [0.0, 3.0, 1.0, 3.0, -2.0],  # same tie → same top
        [0.0, 3.0, 1.0, 3.5, -2.0],  # strict max at 3 → differs
        [0.0, 5.0 - 1e-5, 5.0, 1.0, 2.0],  # identical logits, yet the coded base says 1 → differs
    ]
    p = tmp_path / "ref.kld"
    write_ref(p, 4, np.zeros((3, 4), dtype=np.int32), one_row_chunks(rows))
    with ReferenceFile(p) as ref:
        assert ref.chunk(2)[2][0, 1] == ref.chunk(2)[2][0, 2] == 65535
    cand = one_row_chunks(cands)
    want = oracle_stats(p.read_bytes(), cand)
    assert want["same"] == [True, False, False]
    res = score(p, cand)
    assert res.same_top == pytest.approx(1 / 3)


def test_accumulator_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(4)
    p = tmp_path / "ref.kld"
    write_ref(p, 8, rng.integers(0, 6, (2, 8)), [rng.normal(size=(8, 6)).astype(np.float32) for _ in range(2)])
    with ReferenceFile(p) as ref:
        acc = KLDAccumulator(ref)
        with pytest.raises(BadInput, match="vocabulary or context"):
            acc.add_chunk(0, np.zeros((8, 7), dtype=np.float32))
        inf = np.zeros((8, 6), dtype=np.float32)
        inf[5, 1] = np.inf
        with pytest.raises(BadInput, match="NaN or Inf"):
            acc.add_chunk(0, inf)
        acc.add_chunk(0, np.zeros((8, 6), dtype=np.float32))
        with pytest.raises(ValueError, match="already"):
            acc.add_chunk(0, np.zeros((8, 6), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Report and gates


def fake(kld: float, same: float = 0.95, ppl: float = 2.2) -> KLDResult:
    d = {f.name: 0.0 for f in dataclasses.fields(KLDResult)}
    d.update(n_tokens=2032, n_chunks=16, ppl=ppl, ppl_ratio=ppl / 2.1, kld_mean=kld, kld_p99=8 * kld,
             kld_max=30 * kld, same_top=same, dp_rms=0.02)  # fmt: skip
    return KLDResult(**d)


def variants(tmp_path):
    return [
        VariantScore("merged-Q8_0", "merged", "Q8_0", tmp_path / "merged-Q8_0.gguf", 145 << 20, 8.5, fake(0.001, 0.99)),
        VariantScore("merged-Q4_0", "merged", "Q4_0", tmp_path / "merged-Q4_0.gguf", 92 << 20, 4.5, fake(0.0612, 0.85)),
        VariantScore("runtime-Q4_0", "runtime_lora", "Q4_0", tmp_path / "base-Q4_0.gguf", 101 << 20, 5.0, fake(0.2, 0.93)),
        VariantScore("base-F16", "base", "F16", tmp_path / "base.gguf", 270 << 20, 16.0, fake(0.5, 0.6)),
    ]


def report_for(tmp_path, gates, adapter=0.5):
    return build_report(
        text_path=tmp_path / "eval.txt", text_tokens=4096, ctx=256, chunks=16, reference_name="f16+lora",
        reference_ppl=2.1, adapter_effect=adapter, variants=variants(tmp_path), gates=gates, workdir=tmp_path,
    )  # fmt: skip


def test_gates_pass_and_fail_each_metric(tmp_path):
    assert report_for(tmp_path, None)["gates"] == {"passed": True, "failures": []}
    ok = report_for(tmp_path, Gates(max_kld_mean=0.3, min_same_top=0.8, min_effect_retention=0.5))
    assert ok["gates"] == {"passed": True, "failures": []}  # base-F16 (0.6 same top, retention 0) is not gated

    r = report_for(tmp_path, Gates(max_kld_mean=0.05))
    assert r["gates"]["failures"] == ["merged-Q4_0: kld_mean 0.0612 > max_kld_mean 0.05", "runtime-Q4_0: kld_mean 0.2 > max_kld_mean 0.05"]
    assert r["gates"]["passed"] is False
    r = report_for(tmp_path, {"min_same_top": 0.9})
    assert r["gates"]["failures"] == ["merged-Q4_0: same_top 0.85 < min_same_top 0.9"]
    r = report_for(tmp_path, Gates(min_effect_retention=0.7))
    assert [v["effect_retention"] for v in r["variants"]] == pytest.approx([0.998, 0.8776, 0.6, 0.0])
    assert r["gates"]["failures"] == ["runtime-Q4_0: effect_retention 0.6 < min_effect_retention 0.7"]
    # A value that rounds to the limit is printed with enough digits to differ from it.
    assert [
        str(f) for f in check_gates({"variants": [{"name": "v", "kind": "merged", "kld_mean": 0.0500001}]}, {"max_kld_mean": 0.05})
    ] == ["v: kld_mean 0.0500001 > max_kld_mean 0.05"]
    # No measurable adapter effect: retention is undefined and its gate fails.
    r = report_for(tmp_path, Gates(min_effect_retention=0.7), adapter=0.0)
    assert r["variants"][0]["effect_retention"] is None
    assert len(r["gates"]["failures"]) == 3 and "undefined" in r["gates"]["failures"][0]


def test_enforce_gates(tmp_path):
    enforce_gates(report_for(tmp_path, Gates(max_kld_mean=1.0)), Gates(max_kld_mean=1.0))
    gates = Gates(max_kld_mean=0.05, min_same_top=0.9)
    r = report_for(tmp_path, gates)
    with pytest.raises(GateFailed) as e:
        enforce_gates(r, gates)
    msg = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in msg
    for s in ("merged-Q4_0", "runtime-Q4_0", "kld_mean", "same_top"):
        assert s in msg
    assert "merged-Q8_0" not in msg
    assert e.value.failures == (
        GateFailure("merged-Q4_0", "kld_mean", 0.0612, 0.05),
        GateFailure("merged-Q4_0", "same_top", 0.85, 0.9),
        GateFailure("runtime-Q4_0", "kld_mean", 0.2, 0.05),
    )


def test_report_files(tmp_path):
    gates = Gates(max_kld_mean=0.05)
    rep = report_for(tmp_path, gates)
    rep["variants"][0]["ppl"] = None  # a missing number renders as a dash, and as null in JSON
    paths = write_reports(rep, tmp_path / "out", gates)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json", "report.md"]

    doc = json.loads(paths["json"].read_text())
    assert list(doc) == ["loraq_version", "text", "engine", "reference", "adapter_effect", "variants", "gates"]
    assert doc["engine"] == {"name": "numpy"}
    assert list(doc["text"]) == ["path", "tokens", "ctx", "chunks", "kv_cache"]
    assert list(doc["reference"]) == ["name", "ppl"] and list(doc["adapter_effect"]) == ["kld_mean"]
    assert list(doc["gates"]) == ["passed", "failures"]
    keys = ["name", "kind", "type", "path", "size_bytes", "bpw", "ppl", "ppl_ratio", "kld_mean", "kld_p99",
            "kld_max", "same_top", "dp_rms", "effect_retention", "imatrix", "target", "preferred"]  # fmt: skip
    assert all(list(v) == keys for v in doc["variants"])
    assert doc["variants"][1]["path"] == "merged-Q4_0.gguf" and doc["text"]["path"] == "eval.txt"
    assert doc["variants"][0]["ppl"] is None and doc["variants"][2]["kind"] == "runtime_lora"

    md = paths["md"].read_text()
    for v in doc["variants"]:
        assert f"| `{v['name']}` |" in md
    assert "kld_mean 0.0612 > max_kld_mean 0.05" in md

    page = paths["html"].read_text()
    assert page.count("<svg") == 1
    svg = page[page.index("<svg") : page.index("</svg>")]
    markers = re.findall(r'class="marker (\w+)" data-variant="([^"]+)"', svg)
    assert sorted(markers) == sorted((v["kind"], v["name"]) for v in doc["variants"])
    assert "file size (MiB)" in svg and "KLD mean" in svg and 'class="legend"' in svg
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page


def test_report_html_escapes_names(tmp_path):
    gates = Gates(max_kld_mean=0.05)
    rep = report_for(tmp_path, gates)
    evil = '<script>alert("x")</script>'
    rep["variants"][1]["name"] = evil  # merged-Q4_0, which also fails its gate
    rep["reference"]["name"] = evil
    page = write_reports(rep, tmp_path, gates)["html"].read_text()
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 6  # title, summary, table, failure, marker ×2
