"""`loraq compare`: score quantized files against the full-precision fine-tune.

Reference: the F16 base with the adapter applied at runtime. Its log-probabilities over the
evaluation text are stored once, in llama-perplexity's `--kl-divergence-base` format
(`reference.kld`, reusable with `llama-perplexity --kl-divergence`), and every candidate is scored
against that file chunk by chunk:
  merged-<TYPE>   the merged model quantized to TYPE;
  runtime-<TYPE>  the base quantized to TYPE, with the adapter applied at runtime;
  base            the base without the adapter: KLD(reference ‖ base) is the adapter's effect size.
Metrics follow llama-perplexity (docs/llama-cpp.md §8); effect_retention = 1 − KLD(cand)/KLD(base).
The logits come from the engine `compare.engine` names (`engine=`): loraq's numpy Engine, or
llama.cpp through llama-cpp-python (llama/llama_cpp_engine.py), on the same tokens either way."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from ..atomic import atomic_output, check_not_input, check_readable, check_regular, io_error
from ..errors import BadArguments, BadInput
from ..gguf_io import open_gguf
from ..llama.calibration import calibration_tokens, is_chat_file
from ..llama.engine import chunk_tokens
from ..llama.llama_cpp_engine import make_engine
from ..llama.tokenizer import Tokenizer
from .gates import GateLimits
from .kld_file import ReferenceFile, ReferenceWriter, first_scored
from .metrics import KLDAccumulator, KLDResult, PerplexityAccumulator
from .render import write_reports
from .report import VariantScore, build_report, other_text_section
from .schema import Report

Adapters = Sequence[tuple[Path, float]]


class ReferenceMeta(TypedDict):
    """reference.json, beside reference.kld."""

    ppl: float
    text_tokens: int
    ctx: int
    chunks: int
    kv_cache: str


@dataclass
class Candidate:
    name: str  # "merged-Q4_K_M"
    kind: str  # "merged" | "runtime_lora" | "base"
    type: str  # "Q4_K_M", or "F16" for the base
    model: Path
    adapters: list[tuple[Path, float]] = field(default_factory=list)
    size_files: list[Path] = field(default_factory=list)  # what a user deploys (model + adapter)
    imatrix: bool = False  # quantized with the run's importance matrix
    target: str | None = None  # a size-targeted mix: its target, e.g. "size of Q4_K_M" or "4.8 bpw"


@dataclass
class OtherText:
    """A further evaluation text (compare.also): its reference and the candidates scored on it."""

    name: str
    reference: Path  # its reference.kld
    text: Path
    scores: list[VariantScore]


def evaluation_tokens(model: Path, text: Path, ctx: int, chunks: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens as stored in the reference file, tokens as evaluated, tokens in the text).

    The text is tokenized with the model's own vocabulary (a `.json` file may hold token ids
    instead, a `.jsonl` file chat conversations, rendered with the model's chat template); each chunk's first token becomes BOS when the vocabulary adds one (§8.1)."""
    check_readable(text, "evaluation text")
    tok = Tokenizer.from_gguf(model)
    if text.suffix == ".json":
        ids = _token_ids(text, tok.n_vocab)
    elif is_chat_file(text):  # chat JSONL, rendered with the model's own template (as the imatrix stage reads it)
        ids = calibration_tokens(model, text).tokens
    else:
        try:
            body = text.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"{text} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        ids = tok.encode(body, add_special=True)
    if len(ids) < ctx:
        raise BadArguments(f"{text} has {len(ids)} tokens, fewer than one chunk of ctx={ctx}; give more text or a smaller ctx")
    stored = chunk_tokens(ids, ctx, chunks)
    evaluated = chunk_tokens(ids, ctx, chunks, bos=tok.bos_id if tok.add_bos else None)
    return stored, evaluated, len(ids)


def _token_ids(text: Path, n_vocab: int) -> list[int]:
    """A `.json` evaluation file: a flat list of integer token ids, each in [0, n_vocab)."""
    try:
        data = json.loads(text.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise io_error(exc, text, "read") from exc
    except RecursionError:
        raise BadInput(f"{text}: expected a flat JSON list of token ids (it nests too deeply)") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to convert
        raise BadInput(f"{text}: expected a JSON list of token ids ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, list):
        raise BadInput(f"{text}: expected a JSON list of token ids, got a {type(data).__name__}")
    for i, t in enumerate(data):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            shown = repr(t) if len(repr(t)) <= 40 else repr(t)[:40] + "…"
            raise BadInput(f"{text}: entry {i} is {shown}; token ids must be integers in [0, {n_vocab})")
    return data


def build_reference(
    base: Path,
    adapters: Adapters,
    text: Path,
    ctx: int,
    chunks: int,
    out: Path,
    threads: int = 0,
    progress: Callable[[str], None] | None = None,
    kv_cache: str = "f32",
    engine: str = "numpy",
) -> ReferenceMeta:
    """Evaluate base + adapters and write `out` (.kld) plus `out.json` (PPL, token counts).

    `kv_cache` "f16" emulates llama.cpp's default F16 KV cache (what a stock llama-perplexity run
    uses), "f32" an F32 cache; reference and candidates must be evaluated with the same."""
    inputs = [("base model", Path(base)), ("evaluation text", Path(text)), *(("adapter", Path(a)) for a, _ in adapters)]
    for label, p in inputs:
        check_regular(p, label)
    for o in (out, meta_path(out)):
        check_not_input(o, inputs)
    stored, evaluated, n_text = evaluation_tokens(base, text, ctx, chunks)
    eng = make_engine(engine, base, list(adapters), threads, kv_type=kv_cache)
    ppl_acc = PerplexityAccumulator(ctx, stored)  # the reference's own PPL, as llama-perplexity prints it

    def chunk_done(i: int, logits: np.ndarray) -> None:
        w.add_chunk(i, logits)
        ppl_acc.add_chunk(i, logits)
        if progress:
            progress(f"reference chunk {i + 1}/{len(evaluated)}")

    with ReferenceWriter(out, ctx, eng.n_vocab, stored) as w:
        eng.run(evaluated, chunk_done, rows=scored(ctx))
    ppl = ppl_acc.result()
    meta: ReferenceMeta = {"ppl": float(ppl.ppl), "text_tokens": n_text, "ctx": ctx, "chunks": len(stored), "kv_cache": kv_cache}
    with atomic_output(meta_path(out)) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def meta_path(kld: Path) -> Path:
    return kld.with_suffix(".json")


def score(ref: ReferenceFile, cand: Candidate, threads: int = 0, kv_cache: str = "f32", engine: str = "numpy") -> KLDResult:
    eng = make_engine(engine, cand.model, cand.adapters, threads, kv_type=kv_cache)
    if eng.n_vocab != ref.n_vocab:
        raise BadInput(f"{cand.model} has {eng.n_vocab} tokens in its vocabulary, the reference {ref.n_vocab}")
    acc = KLDAccumulator(ref)
    tokens = ref.tokens.reshape(ref.n_chunk, ref.n_ctx).copy()
    with open_gguf(cand.model) as g:
        bos = g.get("tokenizer.ggml.bos_token_id")
        add_bos = bool(g.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tokens[:, 0] = int(bos)
    eng.run(tokens, acc.add_chunk, rows=scored(ref.n_ctx))
    return acc.result()


def scored(n_ctx: int) -> slice:
    """The positions whose next-token prediction is scored (§8.1): the second half of a chunk."""
    return slice(first_scored(n_ctx), n_ctx - 1)


def _n_weights(model: Path) -> int:
    with open_gguf(model) as g:
        return sum(t.n_elements for t in g.tensors)


def score_variant(ref: ReferenceFile, cand: Candidate, threads: int = 0, kv_cache: str = "f32", engine: str = "numpy") -> VariantScore:
    """One candidate scored against an open reference: its KLD statistics, size and bits per weight."""
    stats = score(ref, cand, threads, kv_cache, engine)
    size = sum(p.stat().st_size for p in cand.size_files or [cand.model])
    bpw = 8.0 * size / max(1, _n_weights(cand.model))
    return VariantScore(cand.name, cand.kind, cand.type, cand.model, size, bpw, stats, cand.imatrix, cand.target)


def score_to_file(
    reference: Path, cand: Candidate, out: Path, threads: int = 0, kv_cache: str = "f32", engine: str = "numpy"
) -> VariantScore:
    """`loraq run`'s score:<variant> stage: score one candidate and write it to `out` (write_score)."""
    with ReferenceFile(reference) as ref:
        s = score_variant(ref, cand, threads, kv_cache, engine)
    write_score(s, out)
    return s


def write_score(s: VariantScore, out: Path) -> None:
    """A VariantScore as JSON, atomically. No path is stored (the workdir holds no absolute paths):
    read_score takes it from the candidate. JSON writes floats with repr, so they read back exactly
    and a report assembled from score files is byte-identical to one scored in a single pass."""
    stats = {k: int(v) if isinstance(v, int | np.integer) else float(v) for k, v in s.stats.to_dict().items()}
    doc = {"name": s.name, "kind": s.kind, "type": s.type, "size_bytes": int(s.size_bytes), "bpw": float(s.bpw), "stats": stats}
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def read_score(path: Path, cand: Candidate) -> VariantScore:
    """A score file written by write_score for `cand`; BadInput if it is not one."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
        if doc["name"] != cand.name:
            raise ValueError(f"it scores {doc['name']!r}, not {cand.name!r}")
        stats = KLDResult(**doc["stats"])
        return VariantScore(
            cand.name, cand.kind, cand.type, cand.model, int(doc["size_bytes"]), float(doc["bpw"]), stats, cand.imatrix, cand.target
        )
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadInput(f"{path} is not a loraq score file ({exc}); rerun with --force=compare") from None


def assemble_report(
    reference: Path,
    scores: Sequence[VariantScore],
    text: Path,
    workdir: Path,
    gates: GateLimits = None,
    kv_cache: str = "f32",
    engine: str = "numpy",
    others: Sequence[OtherText] = (),
) -> Report:
    """report.json/.md/.html from scored variants (in report order), and a section per further
    evaluation text; returns the report, whose "gates" entry says whether every gate passed (the
    caller decides how to fail: gates.enforce_gates)."""
    report = build_report(**_report_args(reference, scores, text), gates=gates, workdir=workdir, kv_cache=kv_cache, engine=engine)
    if others:
        report["other_texts"] = [
            other_text_section(o.name, build_report(**_report_args(o.reference, o.scores, o.text), workdir=workdir, kv_cache=kv_cache))
            for o in others
        ]
    write_reports(report, workdir, gates)
    return report


def _report_args(reference: Path, scores: Sequence[VariantScore], text: Path) -> dict[str, Any]:
    # A reference.kld made by llama-perplexity has no reference.json: fall back to what the .kld says.
    meta: ReferenceMeta | None = json.loads(meta_path(reference).read_text()) if meta_path(reference).exists() else None
    adapter_effect: KLDResult | None = None
    for s in scores:
        if s.kind == "base":
            adapter_effect = s.stats
    with ReferenceFile(reference) as ref:
        n_chunk, n_ctx = ref.n_chunk, ref.n_ctx
    ref_ppl = meta["ppl"] if meta else scores[0].stats.ppl_base if scores else float("nan")
    return {
        "text_path": text,
        "text_tokens": int(meta["text_tokens"] if meta else n_chunk * n_ctx),
        "ctx": n_ctx,
        "chunks": n_chunk,
        "reference_name": "f16+lora",
        "reference_ppl": ref_ppl,
        "adapter_effect": adapter_effect,
        "variants": scores,
    }


def compare_models(
    reference: Path,
    candidates: Sequence[Candidate],
    text: Path,
    workdir: Path,
    gates: GateLimits = None,
    threads: int = 0,
    on_variant: Callable[[str], None] | None = None,
    kv_cache: str = "f32",
    engine: str = "numpy",
) -> Report:
    """Score every candidate against `reference` (.kld) and write report.json/.md/.html.

    Returns the report; its "gates" entry says whether every gate passed (the caller decides
    how to fail: gates.enforce_gates)."""
    inputs = [("reference", Path(reference)), ("evaluation text", Path(text))]
    for c in candidates:
        inputs += [("model", Path(c.model)), *(("adapter", Path(a)) for a, _ in c.adapters)]
    for name in ("report.json", "report.md", "report.html"):
        check_not_input(Path(workdir) / name, inputs)
    scores: list[VariantScore] = []
    with ReferenceFile(reference) as ref:
        for c in candidates:
            if on_variant:
                on_variant(c.name)
            scores.append(score_variant(ref, c, threads, kv_cache, engine))
    return assemble_report(reference, scores, text, workdir, gates, kv_cache, engine)
