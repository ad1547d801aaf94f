"""llama-perplexity's KL-divergence and perplexity statistics (docs/llama-cpp.md §8.3–8.4).

Per scored token (the second half of each chunk, predicting the next token), against the decoded
uint16 base log-probs of a ReferenceFile:

* `nll = max + lse − logit[tok]`, `nll_base = −(scale·code[tok] + min_log_prob)`;
* `KLD = Σ_{i: logp_base_i > −16} exp(logp_base_i)·(logp_base_i − logq_i)`;
* `Δp = exp(−nll) − exp(−nll_base)`;
* same top: first-index argmax of the logits equals first-index argmax of the decoded base.

The base is decoded exactly as llama-perplexity decodes it (float32 `scale·code + min_log_prob`);
the exponentials of the logits and of the base log-probs are float32 as its `expf`; everything
else (sums, logs, the KLD terms) is double precision, vectorized over positions. The reported
numbers follow llama-perplexity's final block (`mean_and_uncertainty`, `covariance`, percentiles
by linear interpolation at `fraction·(N−1)`, median averaging the two middle values).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from ..errors import BadInput
from .kld_file import ReferenceFile, block_rows, first_scored, n_scored, scored_rows

KLD_CUTOFF = -16.0  # base log-probs at or below this are left out of the KLD sum
# rows per block of add_chunk: its (rows, n_vocab) temporaries stay in the L2 cache (2 rows of
# SmolLM2's 49152; 5 rows took 3x as long on a 512 KiB-L2 EPYC, 1 Mi-element blocks longer still)
_CACHE_ELEMENTS = 1 << 17


def mean_unc(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty: (s/N, sqrt((s2/N − mean²)/(N−1))) when that
    variance is > 0 and N > 10, else uncertainty 0."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance(sa: float, sb: float, sab: float, n: int) -> float:
    """llama-perplexity's covariance of the means: (sab/N − (sa/N)(sb/N))/(N−1); 0 if N < 10."""
    if n < 10:
        return 0.0
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation at fraction·(N−1) of ascending values (llama-perplexity's lambda)."""
    v = sorted_values
    if len(v) == 0:
        return math.nan
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v = sorted_values
    n = len(v)
    if n == 0:
        return math.nan
    return float(0.5 * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def _sqrt0(x: float) -> float:
    return math.sqrt(x) if x > 0 else 0.0


@dataclass(frozen=True)
class KLDResult:
    """The numbers llama-perplexity prints for `--kl-divergence` (fractions, not percent)."""

    n_tokens: int
    n_chunks: int
    # Perplexity statistics
    ppl: float
    ppl_unc: float
    ppl_base: float
    ppl_base_unc: float
    ppl_cor: float  # Cor(ln PPL(Q), ln PPL(base)), a fraction
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    ppl_ratio: float
    ppl_ratio_unc: float
    ppl_diff: float
    ppl_diff_unc: float
    # KL divergence statistics
    kld_mean: float
    kld_unc: float
    kld_max: float
    kld_p999: float
    kld_p99: float
    kld_p95: float
    kld_p90: float
    kld_median: float
    kld_p10: float
    kld_p5: float
    kld_p1: float
    kld_p01: float
    kld_min: float
    # Token probability statistics
    dp_mean: float
    dp_unc: float
    dp_max: float
    dp_p999: float
    dp_p99: float
    dp_p95: float
    dp_p90: float
    dp_p75: float
    dp_median: float
    dp_p25: float
    dp_p10: float
    dp_p5: float
    dp_p1: float
    dp_p01: float
    dp_min: float
    dp_rms: float
    dp_rms_unc: float
    max_abs_dp: float
    same_top: float
    same_top_unc: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PerplexityResult:
    """PPL over the scored positions, as llama-perplexity's "Final estimate: PPL = … +/- …"."""

    n_tokens: int
    n_chunks: int
    ppl: float
    ppl_unc: float
    nll_mean: float
    nll_unc: float

    def to_dict(self) -> dict:
        return asdict(self)


def _log_partition(x32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max + log Σ exp(x − max) per row in double, a float32 scratch of x's shape) for float32 rows.

    As llama-perplexity: expf of the float32 differences (numpy's SIMD float32 exp; its float64
    exp has no SIMD path without AVX-512, and took two thirds of a compare run's metrics on such
    a machine), the sum in double."""
    mx = x32.max(axis=1)
    e = x32 - mx[:, None]
    np.exp(e, out=e)
    return mx.astype(np.float64) + np.log(np.add.reduce(e, axis=1, dtype=np.float64)), e


class KLDAccumulator:
    """Scores one candidate against a ReferenceFile, chunk by chunk.

    `add_chunk(i, logits)` takes chunk i's logits, float32 (n_ctx, n_vocab) — or only its scored
    rows (n_ctx − 1 − n_ctx/2, n_vocab) — computed on the reference file's tokens for chunk i.
    `result()` may be called at any time and summarizes the chunks added so far."""

    def __init__(self, reference: ReferenceFile):
        self.ref = reference
        self._done = np.zeros(reference.n_chunk, dtype=bool)
        self._s = np.zeros(10, dtype=np.float64)  # nll, nll², nll_b, nll_b², nll·nll_b, kld, kld², dp, dp², dp⁴
        self._max_abs_dp = 0.0
        self._n_same = 0
        self._count = 0
        self._kld: list[np.ndarray] = []
        self._dp: list[np.ndarray] = []

    def add_chunk(self, i: int, logits: np.ndarray) -> None:
        ref = self.ref
        if not 0 <= i < ref.n_chunk:
            raise ValueError(f"chunk {i} out of range [0, {ref.n_chunk})")
        if self._done[i]:
            raise ValueError(f"chunk {i} was already scored")
        x32 = scored_rows(logits, ref.n_ctx, ref.n_vocab, f"candidate logits, chunk {i}")
        scale, mlp, codes = ref.chunk(i)
        tgt = ref.targets(i)
        step = block_rows(ref.n_vocab, _CACHE_ELEMENTS)
        klds, dps = [], []
        for r in range(0, x32.shape[0], step):
            sl = slice(r, r + step)
            xb32 = x32[sl]
            rows = np.arange(xb32.shape[0])
            t = tgt[sl]
            lz, e = _log_partition(xb32)
            nll = lz - xb32[rows, t]
            lpb32 = codes[sl].astype(np.float32)
            lpb32 *= np.asarray(scale[sl], dtype=np.float32)[:, None]  # decode_rows, in place
            lpb32 += np.asarray(mlp[sl], dtype=np.float32)[:, None]
            nll_b = -lpb32[rows, t].astype(np.float64)
            same = np.argmax(xb32, axis=1) == np.argmax(lpb32, axis=1)  # first index of the max, both
            # KLD = Σ_{lpb > −16} expf(lpb)·(lpb − x + lz): e reused for expf(lpb), zeroed past the cutoff
            np.exp(lpb32, out=e)
            e *= lpb32 > np.float32(KLD_CUTOFF)
            d = lpb32.astype(np.float64)
            d -= xb32
            d += lz[:, None]
            kld = np.einsum("ij,ij->i", e.astype(np.float64), d)
            dp = np.exp(-nll) - np.exp(-nll_b)
            dp2 = dp * dp
            self._s += (
                nll.sum(), (nll * nll).sum(), nll_b.sum(), (nll_b * nll_b).sum(), (nll * nll_b).sum(),
                kld.sum(), (kld * kld).sum(), dp.sum(), dp2.sum(), (dp2 * dp2).sum(),
            )  # fmt: skip
            self._max_abs_dp = max(self._max_abs_dp, float(np.abs(dp).max()))
            self._n_same += int(same.sum())
            self._count += len(rows)
            klds.append(kld)
            dps.append(dp)
        self._kld.append(np.concatenate(klds))
        self._dp.append(np.concatenate(dps))
        self._done[i] = True

    @property
    def n_tokens(self) -> int:
        return self._count

    def result(self) -> KLDResult:
        n = self._count
        s_nll, s_nll2, s_b, s_b2, s_nb, s_kld, s_kld2, s_dp, s_dp2, s_dp4 = (float(v) for v in self._s)
        log_ppl, log_ppl_unc = mean_unc(s_nll, s_nll2, n)
        log_base, log_base_unc = mean_unc(s_b, s_b2, n)
        cov = covariance(s_nll, s_b, s_nb, n)
        ppl = math.exp(log_ppl) if n else math.nan
        ppl_base = math.exp(log_base) if n else math.nan
        ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
        den = log_ppl_unc * log_base_unc
        ln_ratio = log_ppl - log_base
        ln_ratio_unc = _sqrt0(log_ppl_unc**2 + log_base_unc**2 - 2.0 * cov)
        ratio = math.exp(ln_ratio) if n else math.nan
        kld_mean, kld_unc = mean_unc(s_kld, s_kld2, n)
        dp_mean, dp_unc = mean_unc(s_dp, s_dp2, n)
        mse, mse_unc = mean_unc(s_dp2, s_dp4, n)
        rms = math.sqrt(mse)
        same = self._n_same / n if n else math.nan
        kv = np.sort(np.concatenate(self._kld)) if self._kld else np.zeros(0)
        dv = np.sort(np.concatenate(self._dp)) if self._dp else np.zeros(0)
        kp = partial(percentile, kv)
        dq = partial(percentile, dv)
        return KLDResult(
            n_tokens=n,
            n_chunks=int(self._done.sum()),
            ppl=ppl,
            ppl_unc=ppl_unc,
            ppl_base=ppl_base,
            ppl_base_unc=ppl_base_unc,
            ppl_cor=cov / den if den > 0 else math.nan,
            ln_ppl_ratio=ln_ratio if n else math.nan,
            ln_ppl_ratio_unc=ln_ratio_unc,
            ppl_ratio=ratio,
            ppl_ratio_unc=ratio * ln_ratio_unc,
            ppl_diff=ppl - ppl_base,
            ppl_diff_unc=_sqrt0(ppl_unc**2 + ppl_base_unc**2 - 2.0 * ppl * ppl_base * cov),
            kld_mean=kld_mean if n else math.nan,
            kld_unc=kld_unc,
            kld_max=kp(1.0),
            kld_p999=kp(0.999),
            kld_p99=kp(0.99),
            kld_p95=kp(0.95),
            kld_p90=kp(0.90),
            kld_median=median(kv),
            kld_p10=kp(0.10),
            kld_p5=kp(0.05),
            kld_p1=kp(0.01),
            kld_p01=kp(0.001),
            kld_min=kp(0.0),
            dp_mean=dp_mean if n else math.nan,
            dp_unc=dp_unc,
            dp_max=dq(1.0),
            dp_p999=dq(0.999),
            dp_p99=dq(0.99),
            dp_p95=dq(0.95),
            dp_p90=dq(0.90),
            dp_p75=dq(0.75),
            dp_median=median(dv),
            dp_p25=dq(0.25),
            dp_p10=dq(0.10),
            dp_p5=dq(0.05),
            dp_p1=dq(0.01),
            dp_p01=dq(0.001),
            dp_min=dq(0.0),
            dp_rms=rms if n else math.nan,
            dp_rms_unc=0.5 / rms * mse_unc if rms > 0 else 0.0,
            max_abs_dp=self._max_abs_dp if n else math.nan,
            same_top=same,
            same_top_unc=_sqrt0(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0,
        )


class PerplexityAccumulator:
    """PPL of a model over the scored positions of each chunk (llama-perplexity's base run).

    `tokens`: (n_chunk, n_ctx) or flat n_chunk·n_ctx evaluation tokens; `add_chunk(i, logits)` as
    for KLDAccumulator."""

    def __init__(self, n_ctx: int, tokens: np.ndarray):
        tok = np.asarray(tokens)
        if tok.size == 0 or tok.size % n_ctx:
            raise ValueError(f"{tok.size} tokens is not a positive multiple of n_ctx={n_ctx}")
        self.n_ctx = n_ctx
        self.tokens = tok.reshape(-1, n_ctx)
        self.n_chunk = self.tokens.shape[0]
        self.n_vocab: int | None = None
        self._done = np.zeros(self.n_chunk, dtype=bool)
        self._s = 0.0
        self._s2 = 0.0
        self._count = 0

    def add_chunk(self, i: int, logits: np.ndarray) -> None:
        if not 0 <= i < self.n_chunk:
            raise ValueError(f"chunk {i} out of range [0, {self.n_chunk})")
        if self._done[i]:
            raise ValueError(f"chunk {i} was already scored")
        a = np.asarray(logits)
        if self.n_vocab is None and a.ndim == 2:
            self.n_vocab = a.shape[1]
        x32 = scored_rows(a, self.n_ctx, self.n_vocab or 0, f"logits, chunk {i}")
        tgt = np.asarray(self.tokens[i, first_scored(self.n_ctx) + 1 :], dtype=np.int64)
        if tgt.min() < 0 or tgt.max() >= x32.shape[1]:
            raise BadInput(f"token ids outside the vocabulary [0, {x32.shape[1]}); tokenizer and model do not match")
        step = block_rows(x32.shape[1], _CACHE_ELEMENTS)
        for r in range(0, x32.shape[0], step):
            xb32 = x32[r : r + step]
            lz, _ = _log_partition(xb32)
            nll = lz - xb32[np.arange(xb32.shape[0]), tgt[r : r + step]]
            self._s += float(nll.sum())
            self._s2 += float((nll * nll).sum())
            self._count += xb32.shape[0]
        self._done[i] = True

    def result(self) -> PerplexityResult:
        n = self._count
        if n == 0:
            return PerplexityResult(0, 0, math.nan, math.nan, math.nan, math.nan)
        m = self._s / n
        var = self._s2 / n - m * m
        unc = math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0
        ppl = math.exp(m)
        return PerplexityResult(n, int(self._done.sum()), ppl, unc * ppl, m, unc)


__all__ = [
    "KLDAccumulator",
    "KLDResult",
    "PerplexityAccumulator",
    "PerplexityResult",
    "covariance",
    "mean_unc",
    "median",
    "n_scored",
    "percentile",
]
