"""`loraq check`: before anything is written, what can be deployed and what will survive quantization.

Per adapter: whether llama.cpp can run it as a runtime GGUF LoRA and whether loraq's merge can
apply it, each with the one-line reason when not (the same checks convert and merge make, so the
check and the run agree). For the base: whether loraq supports its architecture and tokenizer.

Per adapted tensor and requested type, the comparison is between the fine-tune's delta on that
tensor, ΔW (what the merge adds: s·B·A; for DoRA, modules_to_save and trainable tokens the merged
tensor minus the base), and the type's quantization noise on the base weight, E = Q(W) − W
(imatrix-free). A layer's output moves by ΔW·x and E·x; what compare measures (the KLD of each file
against base + adapter) grows with how much of each lands where the model's activations x and its
downstream sensitivity lie. That weighting is unknown without running the model, and which noise
counts depends on how the delta relates to it:

* a trained LoRA is concentrated (its few directions are where the gradients, hence the data,
  were): the noise that competes with it is the noise inside its own subspaces, the matched filter
  ‖Uᵀ E V‖²_F (U, V: bases of B's columns and A's rows; noise.py). The delta is *below the noise*
  when ‖ΔW‖²_F < ‖Uᵀ E V‖²_F;
* a delta with no structure (factors that look like independent random matrices, as the random
  demo adapter's) is no better placed than the noise itself, so all of it counts, as for inputs
  x ~ N(0, I): E‖ΔW·x‖² = ‖ΔW‖²_F against E‖E·x‖² = ‖E‖²_F.

Which applies is decided per tensor from the delta's stable rank (noise.DeltaBasis.structured);
an explicit delta (DoRA, modules_to_save, trainable tokens, two adapters on one tensor) has no
factors here and gets the second, cautious comparison. `noise_sq` is always ‖E‖²_F,
`subspace_noise_sq` the matched filter (None without factors); `ratio` and `below` are the
comparison the tensor's `measure` ("subspace" or "full") names; `rows_below` is the same comparison
per sampled output row (‖ΔW_i‖² against ‖e_i‖², or against ‖U_i‖²·‖e_i V‖²). The per-type
`kept_estimate` is 1 − Σ noise / Σ ‖ΔW‖²_F over the compared tensors with those same noises, the
linear picture's share of the effect kept; it weighs all tensors alike, so it is a rough guide.

Measured against compare on the demo (SmolLM2-135M, F16 base; effect retention = 1 − KLD(file) /
KLD(base), both against base + adapter):

* the trained rank-16 LoRA (PEFT, domain corpus; held-out domain text, 8 × 256 tokens, effect KLD
  1.72): stable rank 0.11–0.54 of the random figure, every tensor structured. Matched-filter share
  of the effect lost 0.6 %, 2.0 %, 3.0 %, 0.01 % at Q4_K_M, Q3_K_M, Q4_0, Q8_0; measured 1.4 %,
  6.6 %, 8.9 %, 0.09 % (merged files). Verdicts: no tensor below the noise at any of the four,
  "expect the fine-tune to survive"; measured 98.6 %, 93.4 %, 91.1 %, 99.9 % kept. The full-energy
  comparison had said 196 of 210 tensors below Q4_K_M's noise (‖E‖² 11× ‖ΔW‖² in sum): wrong;
* the random demo adapter (scripts/make_demo_adapter.py; GPL text, 4 × 256 tokens, effect KLD
  0.035): stable rank 1.1–1.5 of the random figure, no tensor structured. Full-energy estimate
  −65 %, −737 %, +97 % kept at Q4_K_M, Q4_0, Q8_0; measured −55 %, −640 %, +87 %: lost at Q4_K_M
  and Q4_0 (166 and 210 of 210 tensors below the noise), kept at Q8_0. The matched filter alone
  would have said kept at all three.

Nothing in the base's weights tells the two apart (measured on the demo: the trained delta's
alignment with W's own singular subspaces, with the norm gains, with the embeddings' covariance and
with the downstream layers that read its output are all within 1–3× of a random delta's, where the
gap in effect (KLD) per unit of ‖ΔW‖²_F is ~170× on the same generic text; even the imatrix's
per-column activation energy only gives a 2× gain): the delta's own concentration is what does.
So an adapter trained so long or so broadly that its spectrum looks random is judged cautiously.

‖E‖²_F and ‖Uᵀ E V‖²_F are predicted from sampled rows (noise.py); ‖ΔW‖²_F of a plain LoRA comes
from its factors (‖B·A‖²_F = Σ (BᵀB) ∘ (A·Aᵀ)), anything else from the explicit merged tensor. Each
tensor's type for an ftype is what `loraq quantize` (llama-quantize's rules) would give it, from the
config's quantize options."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from ..convert.hf_base import load_hparams
from ..convert.hf_vocab import check_supported_tokenizer
from ..convert.lora_gguf import NO_PERMUTE_QK, PERMUTE_QK, plan_modules, runtime_refusal, vocab_grows
from ..convert.peft import load_peft_adapter
from ..errors import BadInput, LoraqError
from ..ggml_types import file_type, ggml_type
from ..merge.lora_file import VOCAB_TENSORS, LoraAdapter, load_adapter
from ..merge.merge import _apply
from ..quantize.driver import QuantizeOptions, TypeSettings, options_from, plan_quantize
from ..quantize.mix import MAX_ERASED, row_errors
from .noise import BaseView, DeltaBasis, delta_basis, fro_sq_lowrank, open_base, predict_noise, rel


class _QuantizeSettings(TypeSettings, Protocol):
    @property
    def types(self) -> list[str]: ...


class _AdapterSetting(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def scale(self) -> float: ...


class ConfigLike(Protocol):
    """What the check reads of loraq.pipeline.config.Config (a layer above this one)."""

    @property
    def base(self) -> str: ...
    @property
    def base_outtype(self) -> str: ...
    @property
    def allow_requantized_base(self) -> bool: ...
    @property
    def quantize(self) -> _QuantizeSettings: ...
    @property
    def adapters(self) -> Sequence[_AdapterSetting]: ...
    def resolve(self, p: str) -> Path: ...


@dataclass
class PathVerdict:
    ok: bool
    why: str | None = None  # the one-line reason when not ok


@dataclass
class AdapterCheck:
    path: str
    scale: float
    runtime: PathVerdict  # a llama.cpp runtime GGUF LoRA
    merged: PathVerdict  # loraq's merge
    vocab_grows: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def deployment(self) -> str:
        if self.runtime.ok and self.merged.ok:
            return "runtime adapter and merged"
        if self.merged.ok:
            return "merged only"
        if self.runtime.ok:
            return "runtime adapter only"
        return "neither"


@dataclass
class TypeNoise:
    ftype: str  # the requested ftype, e.g. Q4_K_M
    type: str  # the type this tensor gets under it, e.g. q6_K
    noise_sq: float  # predicted ‖Q(W) − W‖²_F
    ratio: float  # the tensor's measure of noise / delta_sq: above 1, the delta is below the noise
    below: bool
    rows_below: float  # fraction of sampled rows whose delta is below that row's noise (same measure)
    subspace_noise_sq: float | None = None  # predicted ‖Uᵀ (Q(W) − W) V‖²_F; None without factors
    erased: float | None = None  # share of ΔW that quantizing W + ΔW undoes (sampled rows; see _erasure_note)


@dataclass
class TensorCheck:
    tensor: str
    delta_sq: float  # ‖ΔW‖²_F
    weight_sq: float  # ‖W‖²_F, for scale
    how: str  # "factors" or "explicit"
    types: list[TypeNoise] = field(default_factory=list)
    measure: str = "full"  # "subspace" (a structured low-rank delta) or "full": which noise `ratio` uses
    stable_rank: float | None = None  # ‖ΔW‖²_F / ‖ΔW‖²_2, from the factors
    iid_stable_rank: float | None = None  # what independent random factors of this shape give


@dataclass
class TypeSummary:
    ftype: str
    n_tensors: int
    n_below: int
    kept_estimate: float  # 1 − Σ noise / Σ delta over the compared tensors (see the module doc)
    line: str
    n_subspace: int = 0  # tensors compared against the noise in their own subspaces


@dataclass
class CheckResult:
    base: str
    base_kind: str  # gguf | hf
    arch: str | None
    arch_ok: bool
    arch_why: str | None
    tokenizer: str | None
    tokenizer_ok: bool
    tokenizer_why: str | None
    adapters: list[AdapterCheck]
    tensors: list[TensorCheck]
    summaries: list[TypeSummary]
    skipped: list[str] = field(default_factory=list)  # adapted tensors not compared, with why
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for a, d in zip(self.adapters, out["adapters"]):
            d["deployment"] = a.deployment
        return _finite(out)


def _finite(x: Any) -> Any:
    """JSON has no infinity: a ratio over a zero delta becomes null."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def check_config(cfg: ConfigLike) -> CheckResult:
    """`loraq check` for a loaded config (see load_config): the adapters, base and quantize types it names."""
    q = cfg.quantize
    opts = options_from(q, allow_requantize=cfg.allow_requantized_base)
    adapters = [(cfg.resolve(a.path), a.scale) for a in cfg.adapters]
    return check(cfg.resolve(cfg.base), adapters, q.types, opts, base_outtype=cfg.base_outtype)


def check(
    base: Path, adapters: list[tuple[Path, float]], ftypes: list[str], opts: QuantizeOptions | None = None, base_outtype: str = "f16"
) -> CheckResult:
    """Deployment verdicts, architecture and tokenizer support, and delta-vs-noise verdicts (module doc).

    Raises LoraqError only for what makes the check itself impossible (an unreadable base, an
    unknown type name); an adapter that cannot be applied is a verdict, not an error."""
    t0 = time.monotonic()
    opts = opts or QuantizeOptions()
    fts = [file_type(f) for f in ftypes]
    if base.is_dir() and (base / "config.json").is_file():
        try:
            load_hparams(base)
        except BadInput as exc:  # an architecture loraq cannot convert: that is the verdict
            name, ok, why = _hf_tokenizer(base)
            return CheckResult(str(base), "hf", None, False, str(exc), name, ok, why, [], [], [], [], time.monotonic() - t0)
    with open_base(base, base_outtype) as bm:
        arch_ok, arch_why = _arch_support(bm)
        tok, tok_ok, tok_why = _tokenizer_support(bm)
        checks: list[AdapterCheck] = []
        loaded: list[tuple[LoraAdapter, float]] = []
        for path, scale in adapters:
            ac, lora = _adapter_check(bm, path, scale)
            checks.append(ac)
            if lora is not None:
                loaded.append((lora, scale))
        plans = {ft.name: {e.name: e.dst for e in plan_quantize(bm.g, ft, opts, dry_run=True)[0]} for ft in fts}
        tensors, skipped = _tensor_checks(bm, loaded, plans)
    summaries = [_summary(ft.name, tensors) for ft in fts]
    return CheckResult(
        str(base),
        bm.kind,
        bm.g.arch or None,
        arch_ok,
        arch_why,
        tok,
        tok_ok,
        tok_why,
        checks,
        tensors,
        summaries,
        skipped,
        time.monotonic() - t0,
    )


def _arch_support(bm: BaseView) -> tuple[bool, str | None]:
    from ..llama.engine import ARCHS

    arch = bm.g.arch
    if arch not in PERMUTE_QK | NO_PERMUTE_QK:
        return False, f"loraq does not know how {arch} stores q/k rows; supported: {', '.join(sorted(PERMUTE_QK | NO_PERMUTE_QK))}"
    if arch not in ARCHS:
        return True, f"convert and merge support {arch}, but compare's engine does not (supported: {', '.join(ARCHS)})"
    return True, None


def _tokenizer_support(bm: BaseView) -> tuple[str | None, bool, str | None]:
    from ..llama.tokenizer import PRE_TOKENIZERS

    if bm.hf is not None:
        return _hf_tokenizer(bm.path)
    g = bm.g
    model, pre = g.get_str("tokenizer.ggml.model"), g.get_str("tokenizer.ggml.pre")
    if model is None:
        return None, False, "the base has no tokenizer.ggml.model; compare cannot tokenize text with it"
    name = model + (f" / {pre}" if pre else "")
    if model == "gpt2" and (pre or "default") not in PRE_TOKENIZERS:
        return name, False, f"pre-tokenizer {pre!r} is not supported by loraq's tokenizer (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
    if model not in ("gpt2", "llama"):
        return name, False, f"tokenizer model {model!r} is not supported by loraq's tokenizer (supported: gpt2, llama)"
    return name, True, None


def _hf_tokenizer(folder: Path) -> tuple[str | None, bool, str | None]:
    try:
        tj = check_supported_tokenizer(folder)
    except LoraqError as exc:
        return None, False, str(exc)
    model = tj["model"].get("type", "?") if isinstance(tj.get("model"), dict) else "?"
    return f"{model} (tokenizer.json)", True, None


def _adapter_check(bm: BaseView, path: Path, scale: float) -> tuple[AdapterCheck, LoraAdapter | None]:
    """The two deployment paths for one adapter, and the adapter as the merge reads it (or None)."""
    runtime = PathVerdict(True)
    if path.is_dir():
        why = runtime_refusal(path, bm.path) if bm.kind == "gguf" else None
        if why is not None:
            runtime = PathVerdict(False, f"llama.cpp cannot run {why}; use the merged path")
        else:
            try:  # what `loraq convert` checks before it writes anything
                peft = load_peft_adapter(path)
                plan_modules(peft, bm.g, ggml_type("f16"))
            except LoraqError as exc:
                runtime = PathVerdict(False, str(exc))
    merged = PathVerdict(True)
    lora = None
    try:
        lora = load_adapter(path, bm.g, merge=True)
    except LoraqError as exc:
        merged = PathVerdict(False, str(exc))
    if lora is not None and bm.kind == "hf" and runtime.ok and lora.tied_output and "output.weight" in lora.pairs:
        runtime = PathVerdict(
            False, "llama.cpp cannot run an lm_head LoRA on a base whose output is tied to its embeddings; use the merged path"
        )
    grows = False
    if lora is not None:
        grows = vocab_grows(path, bm.path) if bm.kind == "gguf" else _grows(bm, lora)
    notes = []
    if grows:
        notes.append("the vocabulary grows: compare can score no base-without-adapter variant (no effect size)")
    if lora is not None and lora.tied_output:
        notes.append("the base ties output to token_embd; the merge writes an untied output.weight")
    return AdapterCheck(str(path), scale, runtime, merged, grows, notes), lora


def _grows(bm: BaseView, lora: LoraAdapter) -> bool:
    if not bm.g.has_tensor("token_embd.weight"):
        return False
    n = bm.g.tensor("token_embd.weight").ne[1]
    rows = [x.shape[0] for k, x in lora.full.items() if k in VOCAB_TENSORS]
    rows += [int(ids.max(initial=-1)) + 1 for k, (ids, _) in lora.rows.items() if k in VOCAB_TENSORS]
    return max(rows, default=0) > n


def _touched(lora: LoraAdapter) -> set[str]:
    return set(lora.pairs) | set(lora.full) | set(lora.rows)


def _tensor_checks(
    bm: BaseView, loras: list[tuple[LoraAdapter, float]], plans: dict[str, dict[str, Any]]
) -> tuple[list[TensorCheck], list[str]]:
    names = sorted(set().union(*(_touched(lo) for lo, _ in loras)), key=_order(bm)) if loras else []
    out: list[TensorCheck] = []
    skipped: list[str] = []
    for name in names:
        if not bm.g.has_tensor(name):
            skipped.append(f"{name}: written by the merge (untied head), not in the base; its noise is not predicted")
            continue
        w = bm.read(name)
        hits = [(lo, s) for lo, s in loras if name in _touched(lo)]
        delta_sq, delta_rows, how, basis, delta_of = _delta(name, w, hits)
        erased: dict[str, float | None] = {}
        w64 = w.astype(np.float64)
        tc = TensorCheck(name, delta_sq, float(np.einsum("ij,ij->", w64, w64)), how)
        if basis is not None:
            tc.stable_rank, tc.iid_stable_rank = basis.stable_rank, basis.iid_stable_rank
            tc.measure = "subspace" if basis.structured else "full"
        del w64
        cache: dict[str, Any] = {}
        for ftype, plan in plans.items():
            t = plan.get(name)
            if t is None:
                continue
            if t.name not in cache:
                try:
                    cache[t.name] = predict_noise(w, t, basis=basis)
                except (LoraqError, ValueError) as exc:
                    cache[t.name] = exc
            nz = cache[t.name]
            if isinstance(nz, Exception):
                skipped.append(f"{name} at {ftype} ({t.name}): {nz}")
                continue
            sub = tc.measure == "subspace" and nz.subspace is not None and nz.sub_row_sq is not None
            noise, row_noise = (nz.subspace, nz.sub_row_sq) if sub else (nz.predicted, nz.row_sq)
            below_rows = float(np.mean(delta_rows[nz.rows] < row_noise)) if len(nz.rows) else 0.0
            ratio = rel(noise, delta_sq)
            if t.name not in erased:
                erased[t.name] = _erased(w, nz.rows, delta_of(nz.rows), t)
            tc.types.append(TypeNoise(ftype, t.name, nz.predicted, ratio, ratio > 1.0, below_rows, nz.subspace, erased[t.name]))
        out.append(tc)
    return out, skipped


def _order(bm: BaseView) -> Any:
    pos = {t.name: i for i, t in enumerate(bm.g.tensors)}
    return lambda n: pos.get(n, len(pos))


def _delta(
    name: str, w: np.ndarray, hits: list[tuple[LoraAdapter, float]]
) -> tuple[float, np.ndarray, str, DeltaBasis | None, Callable[[np.ndarray], np.ndarray]]:
    """(‖ΔW‖²_F, per-row ‖ΔW_i‖², how, the delta's bases, rows of ΔW by index): from the factors
    for one plain LoRA pair, else explicit (no bases)."""
    if len(hits) == 1:
        lora, s = hits[0]
        if name in lora.pairs and name not in lora.magnitudes and name not in lora.full and name not in lora.rows:
            p = lora.pairs[name]
            sc = lora.scale(name, s)
            # token_embd: ΔW = A·Bᵀ, rows indexed by token
            left, right = (p.a, p.b.T) if name == "token_embd.weight" else (p.b, p.a)
            total, rows = fro_sq_lowrank(left, right)

            def of(idx: np.ndarray) -> np.ndarray:
                return (sc * (left[idx].astype(np.float64) @ right.astype(np.float64))).astype(np.float32)

            return sc * sc * total, sc * sc * rows, "factors", delta_basis(left, right), of
    w0 = w.astype(np.float64)
    n = w0.shape[0]
    # rows past the base's vocabulary have no base weight to compare with: they are left out
    trimmed = [(_base_rows(lo, n), s) for lo, s in hits]
    shape = SimpleNamespace(n_vocab=n, untie=False)
    d = _apply(name, w0, trimmed, shape)[:n] - w0  # type: ignore[arg-type]
    rows = np.einsum("ij,ij->i", d, d)
    return float(rows.sum()), rows, "explicit", None, lambda idx: d[idx].astype(np.float32)


def _erased(w: np.ndarray, idx: np.ndarray, delta: np.ndarray, t: Any) -> float | None:
    """The share of the delta that rounding W + ΔW to type t takes back, on the sampled rows
    (mix.erased_share): ~0 for a base that lies on no grid; near 1 when the base was dequantized
    from a file of that type's grid (the demo's SmolLM2, from Q4_1: q4_1 undoes 94 %)."""
    if not len(idx) or not np.any(delta):
        return None
    try:
        rows = np.ascontiguousarray(w[idx].astype(np.float32) + delta)
        return row_errors(rows, t, None, delta)[2]
    except (LoraqError, ValueError):
        return None


def _base_rows(lora: LoraAdapter, n: int) -> LoraAdapter:
    full = {k: (v[:n] if k in VOCAB_TENSORS else v) for k, v in lora.full.items()}
    rows = {k: (ids[ids < n], x[ids < n]) for k, (ids, x) in lora.rows.items()}
    return dataclasses.replace(lora, full=full, rows=rows)


def _summary(ftype: str, tensors: list[TensorCheck]) -> TypeSummary:
    pairs = [(tc, tn) for tc in tensors for tn in tc.types if tn.ftype == ftype]
    n, below = len(pairs), sum(tn.below for _, tn in pairs)
    n_sub = sum(tc.measure == "subspace" for tc, _ in pairs)
    noise = sum(_noise_of(tc, tn) for tc, tn in pairs)
    delta = sum(tc.delta_sq for tc, _ in pairs)
    kept = 1.0 - rel(noise, delta) if delta > 0 else 0.0
    if n == 0:
        line = f"no adapted tensor to compare at {ftype}"
    else:
        if below == 0:
            expect = f"expect the fine-tune to survive {ftype}"
        elif below * 2 > n:
            expect = f"expect most of the fine-tune to be lost at {ftype}"
        else:
            expect = f"expect part of the fine-tune to be lost at {ftype}"
        where = "" if n_sub == 0 else " in its own subspaces" if n_sub == n else f" ({n_sub} of {n} compared in their own subspaces)"
        line = f"the delta on {below} of {n} tensors is below {ftype}'s noise{where}: {expect}" + _erasure_note(pairs)
    return TypeSummary(ftype, n, below, kept, line, n_sub)


def _erasure_note(pairs: list[tuple[TensorCheck, TypeNoise]]) -> str:
    """A note when a type's grid takes back more than MAX_ERASED of the delta on some tensors: the
    base lies on that grid (dequantized from such a file) and rounding W + ΔW returns to W. It does
    not change the verdict: how much that costs depends on the tensors (on the demo q4_K undoes
    ~94 % of 16 ffn_down deltas at Q4_K_M, and 98.6 % of the effect is kept); a size-targeted mix
    never uses such a type (quantize/mix.py)."""
    hit = [(tc, tn) for tc, tn in pairs if tn.erased is not None and abs(tn.erased) > MAX_ERASED]
    if not hit:
        return ""
    by_type: dict[str, list[float]] = {}
    for _, tn in hit:
        by_type.setdefault(tn.type, []).append(tn.erased or 0.0)
    parts = []
    for t, v in sorted(by_type.items()):
        m = float(np.median(v))
        what = f"takes back {100 * m:.0f} % of the delta" if m > 0 else f"overshoots the delta by {-100 * m:.0f} %"
        parts.append(f"{t} {what} on {len(v)} tensor{'s' if len(v) > 1 else ''}")
    return f" ({'; '.join(parts)}: the base lies on that grid)"


def _noise_of(tc: TensorCheck, tn: TypeNoise) -> float:
    """The noise the tensor's verdict compares its delta with."""
    return tn.subspace_noise_sq if tc.measure == "subspace" and tn.subspace_noise_sq is not None else tn.noise_sq
