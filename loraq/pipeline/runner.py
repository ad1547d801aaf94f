"""The stage chain convert → merge → quantize (one output per type), with checkpoints.

Each stage declares its inputs, output-affecting settings and outputs; it runs only when
`check_stage` says it is stale (or it is forced), and its record is saved as soon as it finishes,
so an interrupted run resumes at the first unfinished stage."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..atomic import (
    InputChanged,
    atomic_output,
    check_not_input,
    check_regular,
    file_identity,
    io_error,
    leftover_size,
    remove_leftover,
    stale_scratch,
    stale_temps,
)
from ..compare.gates import GateFailure, check_gates
from ..compare.report import VariantScore, load_report
from ..compare.stage import Candidate, OtherText, assemble_report, build_reference, meta_path, read_score, score_to_file
from ..convert import convert_adapter, convert_hf_base
from ..convert.lora_gguf import runtime_refusal, vocab_grows
from ..errors import BadArguments, BadInput
from ..llama.calibration import text_overlap
from ..llama.engine import set_blas_threads
from ..merge import AdapterSpec, merge_model
from ..quantize.driver import QuantizeOptions, options_from, quantize_many, quantize_model
from ..quantize.imatrix_file import quant_weights, quantize_kvs, read_imatrix, write_imatrix_gguf
from ..quantize.mix import target_mix, with_mix
from ..quantize.rules import NEEDS_IMATRIX_FTYPES
from .checkpoint import MANIFEST, Manifest, Verdict, check_stage, cpu_threads, record_stage
from .config import CompareConfig, Config, MergedVariant, merged_variants
from .deliver import Deliverable, DeliverSpec, deliver
from .lock import LOCK, running_pid, workdir_lock

Event = dict[str, Any]
STAGE_KINDS = ("convert", "merge", "quantize")
SCORES = "scores"  # workdir/scores/<variant>.json: one per score:<variant> stage
TEXTS = "texts"  # workdir/texts/<name>/: reference.kld and scores/ of each compare.also text


@dataclass
class Stage:
    name: str  # "convert", "merge", "quantize:Q4_K_M"
    kind: str
    settings: dict[str, Any]  # only what changes the output bytes
    inputs: dict[str, Path]
    outputs: list[Path]
    action: Callable[[], object] | None  # None for batched stages: batch_run runs them
    after: list[str] = field(default_factory=list)  # upstream stages whose outputs are inputs here
    # Stages with the same batch key that are due together run as one call (quantize: the F16 is
    # read once for every type); batch_run receives every due stage of the batch, one or more.
    batch_key: str | None = None
    batch_run: Callable[[list[Stage]], None] | None = None


@dataclass
class StageReport:
    name: str
    status: str  # run: "ran" or "skipped"; status: "ok" or "will run"
    reason: str
    outputs: list[Path]
    seconds: float = 0.0


def _is_peft(p: Path) -> bool:
    return p.is_dir()


def stage_threads(cfg: Config, kind: str) -> int:
    """The threads a heavy stage uses. Quantize: quantize.threads when set, else the top-level
    threads. Merge and compare: the top-level threads, else quantize.threads (which set compare's
    threads before the top-level key existed). 0 in both: the CPUs this process may use."""
    q, top = cfg.quantize.threads, cfg.threads
    return cpu_threads((q or top) if kind.startswith("quantize") else (top or q))


def with_threads(cfg: Config, threads: int) -> Config:
    """The config with `run --threads N` applied: the command line beats both config keys.
    Threads change no output byte, so no stage's checkpoint depends on them."""
    out = cfg.model_copy(update={"threads": threads, "quantize": cfg.quantize.model_copy(update={"threads": 0})})
    out.root = cfg.root
    return out


def build_stages(cfg: Config) -> list[Stage]:
    wd = cfg.workdir_path
    base = cfg.resolve(cfg.base)
    adapters = [(cfg.resolve(a.path), a.scale) for a in cfg.adapters]
    stages: list[Stage] = []
    probe = base  # what the adapter checks read: the HF folder itself before its GGUF exists
    if base.is_dir():  # a Hugging Face folder: the `base` stage converts it once, every stage reads its GGUF
        hf, base = base, wd / f"base-{cfg.base_outtype}.gguf"
        stages.append(
            Stage("base", "base", {"outtype": cfg.base_outtype}, {"hf": hf}, [base], partial(convert_hf_base, hf, base, cfg.base_outtype))
        )

    stages.append(_check_stage(cfg, probe, adapters))
    # Adapters only a merge can apply (DoRA, modules_to_save, ...): no runtime GGUF adapter is made,
    # and compare scores merged variants only, against the merged F16 as its reference.
    merge_only = {i: why for i, (p, _) in enumerate(adapters) if _is_peft(p) and (why := runtime_refusal(p, probe))}
    if merge_only and cfg.deliver is not None and cfg.deliver.adapter:
        i, why = next(iter(merge_only.items()))
        raise BadArguments(
            f"deliver.adapter: adapter {cfg.adapters[i].path} can only be merged ({why}); llama.cpp cannot run it as a LoRA file"
        )
    peft = [(i, p) for i, (p, _) in enumerate(adapters) if _is_peft(p)] if not merge_only else []
    if peft:
        ct = cfg.convert.outtype
        outs = {i: wd / (f"adapter-{ct}.gguf" if len(adapters) == 1 else f"adapter{i}-{ct}.gguf") for i, _ in peft}

        def do_convert() -> None:
            for i, p in peft:
                convert_adapter(p, base, outs[i], outtype=ct)

        stages.append(
            Stage(
                "convert",
                "convert",
                {"outtype": ct},
                {"base": base, **{_aname(i, adapters): p for i, p in peft}},
                list(outs.values()),
                do_convert,
            )
        )

    merged = wd / f"merged-{cfg.merge.outtype}.gguf"
    precision = cfg.merge.base_precision
    # QLoRA: the merge goes into the NF4-roundtripped weights the adapter was trained against; the
    # merge into the original weights is built too, and compare scores both merged files (PPL on the
    # evaluation text says which keeps more of the fine-tune: against the F16 reference, the
    # original merge would win by construction).
    merges = [("merge", merged, precision)]
    if precision != "original" and cfg.compare is not None:
        merges.append(("merge-original", wd / f"merged-original-{cfg.merge.outtype}.gguf", "original"))
    for name, out, prec in merges:

        def do_merge(out: Path = out, prec: str = prec) -> None:
            set_blas_threads(stage_threads(cfg, "merge"))  # B·A products are numpy matmuls
            specs = [AdapterSpec(p, s) for p, s in adapters]
            merge_model(base, specs, out, cfg.merge.outtype, allow_requantize=cfg.allow_requantized_base, base_precision=prec)

        msettings: dict[str, Any] = {
            "outtype": cfg.merge.outtype,
            "scales": [s for _, s in adapters],
            "allow_requantize": cfg.allow_requantized_base,
        }
        if prec != "original":  # absent for the default: workdirs merged before the key existed stay valid
            msettings["base_precision"] = prec
        inputs = {"base": base, **{_aname(i, adapters): p for i, (p, _) in enumerate(adapters)}}
        stages.append(Stage(name, "merge", msettings, inputs, [out], do_merge))

    q = cfg.quantize
    opts = options_from(q, threads=stage_threads(cfg, "quantize"))
    # What changes every quantized file's bytes; imatrix use and targets are per variant.
    qsettings = {k: v for k, v in q.model_dump().items() if k not in ("types", "threads", "imatrix", "targets", "sensitivity_chunks")}
    mode = cfg.imatrix_mode
    imat = _imatrix_stage(cfg, merged, stages) if mode != "never" else None
    # the delta the targets must not erase is merged − base; an NF4-roundtripped merge differs from
    # the base by more than the delta, so it gets no erasure check
    delta_base = base if precision == "original" else None
    sens = _sensitivity_stage(cfg, merged, delta_base, stages) if q.targets and cfg.imatrix is not None and q.sensitivity_chunks else None
    c = cfg.compare
    runtime = c is not None and c.runtime_lora and not merge_only
    wanted = merged_variants(q, mode)
    for prefix, src, after, variants in (
        ("merged", merged, ["merge"], wanted),
        ("base", base, [], [MergedVariant(f"base-{t}", t, t in NEEDS_IMATRIX_FTYPES) for t in q.types] if runtime else []),
    ):
        kind = "quantize" if prefix == "merged" else "quantize-base"
        for v in variants:
            out = wd / v.file
            settings: dict[str, Any] = {"type": v.type, **qsettings}
            inputs = {"base" if prefix == "base" else merged.stem: src}
            if v.imatrix:  # an imatrix (and its name) changes the bytes; without one the key is absent, as before
                assert imat is not None
                settings["imatrix"] = True
                inputs["imatrix"] = imat
            name = f"{kind}:{v.name.removeprefix(prefix + '-')}"
            deps = [*after, *(["imatrix"] if v.imatrix else [])]
            if v.target is not None:
                settings["target"] = v.target.model_dump()
                if sens is not None:
                    inputs["sensitivity"] = sens
                    deps.append("sensitivity")
                if delta_base is not None:
                    inputs["base"] = delta_base
                act = partial(_quantize_target, src, out, v, opts, imat, delta_base, sens)
                stages.append(Stage(name, kind, settings, inputs, [out], act, after=deps))
                continue

            def run_batch(batch: list[Stage], src: Path = src, with_imatrix: bool = v.imatrix) -> None:
                quantize_many(src, [(b.settings["type"], b.outputs[0]) for b in batch], _with_imatrix(opts, imat if with_imatrix else None))

            key = f"quantize:{prefix}" + ("+imatrix" if v.imatrix else "")  # one read of the F16 per batch
            stages.append(Stage(name, kind, settings, inputs, [out], None, after=deps, batch_key=key, batch_run=run_batch))

    if c is not None:
        # A grown vocabulary: the base's logits cover fewer tokens than the reference's, so no KLD to them (no effect size).
        grown = any(vocab_grows(adapters[i][0], probe) for i in merge_only)
        ref_model = None
        if merge_only:  # the full-precision fine-tune is the merged F16 itself (merge is exact to f16 rounding)
            why = "; ".join(f"{cfg.adapters[i].path}: {w}" for i, w in merge_only.items())
            no_base = "; no base variant: the vocabulary grows" if grown else ""
            ref_model = RefModel(merged, f"merged-{cfg.merge.outtype} (runtime LoRA off, llama.cpp cannot run {why}{no_base})")
        stages += _compare_stages(cfg, c, base, adapters, stages, with_base=not grown, ref_model=ref_model)
    if cfg.deliver is not None:
        stages.append(_deliver_stage(cfg, adapters, stages))
    if stages[0].name == "base":  # stages reading the converted base wait for it
        for s in stages[1:]:
            if base in s.inputs.values() and "base" not in s.after:
                s.after.insert(0, "base")
    return stages


IMATRIX = "imatrix.gguf"


CHECK = "check.json"


def _check_stage(cfg: Config, base: Path, adapters: list[tuple[Path, float]]) -> Stage:
    """The check stage (loraq check): deployment paths, support, and each adapted tensor's delta
    against the requested types' predicted quantization noise, written to check.json (no model
    file). `base` is what the user gave: a GGUF, or the HF folder read in place."""
    from ..check import check_config

    out = cfg.workdir_path / CHECK

    def run() -> None:
        res = check_config(cfg)
        # every run merges: an adapter the merge cannot read (NaN, bad shapes, ...) stops the run
        # here, with the merge's own one-line reason, before anything is written
        for a in res.adapters:
            if not a.merged.ok:
                raise BadInput(f"{a.path}: {a.merged.why}")
        doc = res.to_json()
        doc.pop("seconds", None)  # the workdir holds no times: reruns give identical bytes
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    q = cfg.quantize
    settings = {"types": q.types, "scales": [s for _, s in adapters], **{k: v for k, v in q.model_dump().items() if k in CHECK_KEYS}}
    inputs = {"base": base, **{_aname(i, adapters): p for i, (p, _) in enumerate(adapters)}}
    return Stage("check", "check", settings, inputs, [out], run)


CHECK_KEYS = ("output_tensor_type", "token_embedding_type", "tensor_types", "pure", "leave_output_tensor")


def _imatrix_stage(cfg: Config, merged: Path, stages: list[Stage]) -> Path:
    """The imatrix stage: llama-imatrix's statistics of the merged F16 (the fine-tune's own
    activations) over the calibration text, written as a GGUF imatrix."""
    im = cfg.imatrix
    assert im is not None
    out = cfg.workdir_path / IMATRIX
    text = cfg.resolve(im.text)

    def collect() -> None:
        from ..imatrix.collect import collect_imatrix

        threads = stage_threads(cfg, "imatrix")
        set_blas_threads(threads)
        # the dataset is recorded as configured, so the file does not depend on where the workdir is
        res = collect_imatrix(merged, text, im.ctx, im.chunks, process_output=im.process_output, threads=threads, dataset=im.text)
        write_imatrix_gguf(out, res.data)

    settings = {"ctx": im.ctx, "chunks": im.chunks, "process_output": im.process_output, "dataset": im.text}
    stages.append(Stage("imatrix", "imatrix", settings, {merged.stem: merged, "calibration": text}, [out], collect, after=["merge"]))
    return out


SENSITIVITY = "sensitivity.json"


def _sensitivity_stage(cfg: Config, merged: Path, base: Path | None, stages: list[Stage]) -> Path:
    """Each tensor's KLD per unit of quantization error, probed with the engine on the imatrix's
    calibration text (imatrix/sensitivity.py): what the size-targeted mixes are priced by."""
    im = cfg.imatrix
    assert im is not None
    out = cfg.workdir_path / SENSITIVITY
    text = cfg.resolve(im.text)
    chunks = cfg.quantize.sensitivity_chunks

    def measure() -> None:
        from ..imatrix.sensitivity import measure_sensitivity, write_sensitivity

        threads = stage_threads(cfg, "imatrix")
        set_blas_threads(threads)
        write_sensitivity(out, measure_sensitivity(merged, text, base=base, ctx=im.ctx, chunks=chunks, threads=threads))

    inputs = {merged.stem: merged, "calibration": text, **({"base": base} if base is not None else {})}
    stages.append(Stage("sensitivity", "sensitivity", {"ctx": im.ctx, "chunks": chunks}, inputs, [out], measure, after=["merge"]))
    return out


def _with_imatrix(opts: QuantizeOptions, imat: Path | None) -> QuantizeOptions:
    """`opts` quantizing with the imatrix file, recorded in the output's quantize.imatrix.* KVs
    by its name in the workdir (as `llama-quantize --imatrix imatrix.gguf` run there would)."""
    if imat is None:
        return opts
    data = read_imatrix(imat, require_metadata=True)
    return dataclasses.replace(opts, imatrix=quant_weights(data), kv_overrides=[*opts.kv_overrides, *quantize_kvs(imat.name, data)])


def _quantize_target(
    src: Path, out: Path, v: MergedVariant, opts: QuantizeOptions, imat: Path | None, base: Path | None, sens: Path | None
) -> None:
    """A size-targeted mix: each tensor's type chosen for the budget (quantize/mix.py), priced by
    the measured sensitivities when there are some, never a type that erases the fine-tune's
    delta (merged − base), then written with those types as anchored --tensor-type patterns
    (recorded in the file)."""
    from ..imatrix.sensitivity import read_sensitivity

    assert v.target is not None
    o = _with_imatrix(opts, imat if v.imatrix else None)
    per_unit = read_sensitivity(sens).per_unit_all() if sens is not None else None
    pairs, _ = target_mix(src, v.type, o, bpw=v.target.bpw, size_of=v.target.size_of, base=base, sensitivity=per_unit)
    quantize_model(src, out, v.type, with_mix(o, pairs))


def variant_name(s: Stage) -> str:
    """A quantize stage's variant: merged-<...> as its file is named; base-<TYPE> is runtime-<TYPE>."""
    stem = s.outputs[0].stem
    return "runtime-" + stem.removeprefix("base-") if s.kind == "quantize-base" else stem


def _target_text(t: dict[str, Any] | None) -> str | None:
    if t is None:
        return None
    return f"size of {t['size_of']}" if t.get("size_of") else f"{t['bpw']:g} bpw"


def _deliver_stage(cfg: Config, adapters: list[tuple[Path, float]], before: list[Stage]) -> Stage:
    """dist/ (deliver.py): after compare, from report.json and the files it may ship."""
    d = cfg.deliver
    assert d is not None
    wd = cfg.workdir_path
    # The adapters a user deploys: the converted GGUF for a PEFT folder, a GGUF LoRA as given.
    convert = next((s for s in before if s.kind == "convert"), None)
    peft = iter(convert.outputs if convert is not None else [])
    deployed = [(next(peft, p) if p.is_dir() else p, s) for p, s in adapters]  # no convert: merge-only adapters, never deployed
    variants = []
    for s in before:
        t = str(s.settings.get("type"))
        if s.kind == "quantize":
            variants.append(Deliverable(variant_name(s), "merged", t, s.outputs[0]))
        elif s.kind == "quantize-base":
            variants.append(Deliverable(variant_name(s), "runtime_lora", t, s.outputs[0], tuple(deployed)))
    wanted = [v for v in variants if d.best is not None or v.name in d.files]
    report = wd / "report.json" if cfg.compare is not None else None
    inputs: dict[str, Path] = {"report": report} if report is not None else {}
    for p in [f for v in wanted for f in v.files] + ([p for p, _ in deployed] if d.adapter else []):
        inputs[f"file:{p.name}"] = p  # by the name it has in dist/ (deliver refuses two files with one name)
    gates = cfg.compare.gates if cfg.compare is not None else None
    spec = DeliverSpec(
        name=cfg.name,
        workdir=wd,
        options=d,
        variants=variants,
        adapters=deployed,
        base_name=cfg.resolve(cfg.base).name,
        adapter_names=[(cfg.resolve(a.path).name, a.scale) for a in cfg.adapters],
        gates=gates,
        report=report,
    )
    return Stage(
        "deliver",
        "deliver",
        {
            "deliver": d.model_dump(),
            "gates": gates.model_dump() if gates is not None else None,
            "name": cfg.name,
            "base": spec.base_name,
            "adapters": [list(a) for a in spec.adapter_names],
        },
        inputs,
        [wd / "dist"],
        lambda: deliver(spec),
        after=[s.name for s in before if s.kind in ("convert", "quantize", "quantize-base", "compare")],
    )


@dataclass(frozen=True)
class RefModel:
    """The reference when it is not base + runtime adapters: the merged F16 (merge-only adapters)."""

    path: Path
    label: str  # recorded in the reference stage's settings


def _compare_stages(
    cfg: Config,
    c: CompareConfig,
    base: Path,
    adapters: list[tuple[Path, float]],
    before: list[Stage],
    with_base: bool = True,
    ref_model: RefModel | None = None,
) -> list[Stage]:
    """reference, score:<variant> per candidate, for compare.text; the same under texts/<name>/ for
    each compare.also text (stages reference:<name>, score:<name>:<variant>); then compare, which
    assembles report.json from all of them."""
    wd = cfg.workdir_path
    threads = stage_threads(cfg, "compare")
    # The engine is part of every compare checkpoint key (its logits differ in the last bits); the
    # default is left out of the key, so workdirs scored before compare.engine existed stay valid.
    eng = {} if c.engine == "numpy" else {"engine": c.engine}
    convert = next((s for s in before if s.kind == "convert"), None)
    # Runtime candidates use the adapter a user deploys: the converted GGUF where there is one.
    deployed = list(adapters)
    if convert is not None:
        peft_idx = [k for k, (p, _) in enumerate(adapters) if p.is_dir()]
        for j, k in enumerate(peft_idx):
            deployed[k] = (convert.outputs[j], adapters[k][1])
    cands = [Candidate("base", "base", "F16", base)] if with_base else []
    if any(s.name == "merge-original" for s in before):  # QLoRA: the two merged files themselves, scored side by side
        for s in before:
            if s.name in ("merge", "merge-original"):
                how = "original" if s.name == "merge-original" else str(s.settings["base_precision"]).removesuffix("_roundtrip")
                cands.append(Candidate(f"merged-{cfg.merge.outtype}-{how}", "merged", cfg.merge.outtype.upper(), s.outputs[0]))
    for s in before:
        t = str(s.settings.get("type"))
        imat, target = bool(s.settings.get("imatrix")), _target_text(s.settings.get("target"))
        if s.kind == "quantize":
            cands.append(Candidate(variant_name(s), "merged", t, s.outputs[0], imatrix=imat, target=target))
        elif s.kind == "quantize-base":
            files = [s.outputs[0], *(p for p, _ in deployed)]
            cands.append(Candidate(variant_name(s), "runtime_lora", t, s.outputs[0], deployed, files, imatrix=imat))

    out: list[Stage] = []
    per_text: list[tuple[str | None, Path, Stage, list[Stage]]] = []
    for tag, text_cfg in [(None, c.text), *c.also.items()]:
        text = cfg.resolve(text_cfg)
        folder = wd if tag is None else wd / TEXTS / tag
        suffix = "" if tag is None else f":{tag}"
        ref = folder / "reference.kld"
        settings: dict[str, Any] = {"ctx": c.ctx, "chunks": c.chunks, "scales": [s for _, s in adapters], "kv_cache": c.kv_cache, **eng}
        if ref_model is None:
            ref_inputs = {"base": base, "text": text, **{_aname(i, adapters): p for i, (p, _) in enumerate(adapters)}}
            act = partial(build_reference, base, adapters, text, c.ctx, c.chunks, ref, threads, kv_cache=c.kv_cache, engine=c.engine)
            after: list[str] = []
        else:
            settings["reference_model"] = ref_model.label
            ref_inputs = {"merged": ref_model.path, "text": text}
            act = partial(build_reference, ref_model.path, [], text, c.ctx, c.chunks, ref, threads, kv_cache=c.kv_cache, engine=c.engine)
            after = ["merge"]
        reference = Stage(f"reference{suffix}", "reference", settings, ref_inputs, [ref, meta_path(ref)], act, after=after)
        # One score:<variant> stage per candidate, its JSON checkpointed on its own: adding a type scores
        # only that type's variants. Kind "compare", so --force=compare rescores every variant.
        scores: list[Stage] = []
        for x in cands:
            sfile = folder / SCORES / f"{x.name}.json"
            reads = [x.model, *(p for p, _ in x.adapters)]
            upstream = [s.name for s in before if any(f in s.outputs for f in reads)]  # quantize, convert
            scores.append(
                Stage(
                    f"score{suffix}:{x.name}",
                    "compare",
                    {
                        "kind": x.kind,
                        "type": x.type,
                        "scales": [s for _, s in x.adapters],
                        "ctx": c.ctx,
                        "chunks": c.chunks,
                        "kv_cache": c.kv_cache,
                        **eng,
                    },
                    {"reference": ref, "text": text, "model": x.model, **{f"adapter{k}": p for k, (p, _) in enumerate(x.adapters)}},
                    [sfile],
                    partial(score_to_file, ref, x, sfile, threads, c.kv_cache, c.engine),
                    after=[reference.name, *upstream],
                )
            )
        per_text.append((tag, text, reference, scores))
        out += [reference, *scores]

    def assemble() -> None:
        def scored(ss: list[Stage]) -> list[VariantScore]:
            return [read_score(s.outputs[0], x) for s, x in zip(ss, cands, strict=True)]

        (_, text, reference, scores), extra = per_text[0], per_text[1:]
        others = [OtherText(str(tag), r.outputs[0], t, scored(ss)) for tag, t, r, ss in extra]
        assemble_report(reference.outputs[0], scored(scores), text, wd, c.gates, c.kv_cache, c.engine, others=others)

    # The report only assembles the score files (fast). Gates are not a setting: run re-applies
    # changed gates to the report without rescoring (check_run_gates).
    inputs: dict[str, Path] = {}
    for _, _, r, ss in per_text:
        inputs |= {r.name: r.outputs[0], f"{r.name}-meta": r.outputs[1], **{s.name: s.outputs[0] for s in ss}}
    also = {"also": list(c.also)} if c.also else {}  # absent without extra texts: older workdirs stay valid
    compare = Stage(
        "compare",
        "compare",
        {"variants": [x.name for x in cands], **eng, **also},
        inputs,
        [wd / "report.json", wd / "report.md", wd / "report.html"],
        assemble,
        after=[s.name for s in out],
    )
    return [*out, compare]


def check_run_gates(cfg: Config) -> list[GateFailure]:
    """The configured gates applied to the current report (gates can change without rescoring)."""
    path = cfg.workdir_path / "report.json"
    if cfg.compare is None or not path.exists():
        return []
    return check_gates(load_report(path), cfg.compare.gates)


def _aname(i: int, adapters: list) -> str:
    return "adapter" if len(adapters) == 1 else f"adapter{i}"


def _select(stages: list[Stage], which: str | None, flag: str) -> set[str]:
    if which is None:
        return set()
    if which == "all":
        return {s.name for s in stages}
    hit = {s.name for s in stages if s.name == which or s.kind == which}
    if not hit:
        raise BadArguments(f"{flag}: no stage named '{which}'; stages are: {', '.join(s.name for s in stages)}")
    return hit


def _until(stages: list[Stage], until: str | None) -> list[Stage]:
    if until is None:
        return stages
    _select(stages, until, "--until")
    last = max(i for i, s in enumerate(stages) if s.name == until or s.kind == until)
    return stages[: last + 1]


def _verdict(m: Manifest, s: Stage, stale: set[str]) -> tuple[Verdict, dict[str, str]]:
    waiting = [a for a in s.after if a in stale]
    for k, p in s.inputs.items():
        check_regular(p, k)  # before hashing: reading a FIFO or a device would block
    inputs = {k: m.file_hash(p) for k, p in s.inputs.items() if p.exists()}
    if waiting:
        return Verdict(False, f"waits-for:{waiting[0]}"), inputs
    return check_stage(m, s.name, s.settings, inputs, s.outputs), inputs


OVERLAP_WARN = 0.05  # share of the evaluation text's passages also in the calibration text


def overlap_warning(cfg: Config) -> str | None:
    """A warning when the imatrix's calibration text overlaps the evaluation text: the imatrix
    variants would be scored on the text they were tuned for."""
    if cfg.imatrix is None or cfg.compare is None or cfg.imatrix_mode == "never":
        return None
    cal, ev = cfg.resolve(cfg.imatrix.text), cfg.resolve(cfg.compare.text)
    shared, total = text_overlap(cal, ev)
    if total == 0 or shared < OVERLAP_WARN * total:
        return None
    return (
        f"{shared} of the {total} passages of the evaluation text {cfg.compare.text} are also in the calibration text "
        f"{cfg.imatrix.text}: the imatrix variants are scored on text they were tuned on; use disjoint texts"
    )


def _config_inputs(cfg: Config) -> dict[str, Path]:
    ins = {"base model": cfg.resolve(cfg.base)}
    for i, a in enumerate(cfg.adapters):
        ins[_aname(i, cfg.adapters)] = cfg.resolve(a.path)
    if cfg.compare is not None:
        ins["evaluation text"] = cfg.resolve(cfg.compare.text)
        for name, t in cfg.compare.also.items():
            ins[f"evaluation text {name}"] = cfg.resolve(t)
    if cfg.imatrix is not None:
        ins["calibration text"] = cfg.resolve(cfg.imatrix.text)
    return ins


def _check_workdir(cfg: Config, stages: list[Stage]) -> None:
    """Inputs are regular files (or folders of them), and nothing the run writes is an input."""
    inputs = _config_inputs(cfg)
    for label, p in inputs.items():
        check_regular(p, label)
    wd = cfg.workdir_path
    for out in [wd / MANIFEST, wd / LOCK, *(o for s in stages for o in s.outputs)]:
        check_not_input(out, inputs)


def _identity(p: Path) -> object:
    """What a stage is about to read: (dev, inode, size, mtime_ns) of the file, or of each file of a folder."""
    try:
        if p.is_dir():
            return tuple((c.name, file_identity(c)) for c in sorted(p.iterdir()) if c.is_file() and not c.name.startswith("."))
        return file_identity(p)
    except OSError:
        return None


def stage_status(cfg: Config) -> list[StageReport]:
    """Each stage: up to date or not, and why, without running anything."""
    stages = build_stages(cfg)
    _check_workdir(cfg, stages)
    m = Manifest(cfg.workdir_path)
    stale: set[str] = set()
    reports = []
    for s in stages:
        v, _ = _verdict(m, s, stale)
        if not v.up_to_date:
            stale.add(s.name)
        reports.append(StageReport(s.name, "ok" if v.up_to_date else "will run", v.reason, s.outputs))
    return reports


@dataclass
class WorkdirState:
    running_pid: int | None  # a run holds the workdir's lock (0: its pid is unknown)
    leftovers: list[Path]  # temporaries and scratch folders of killed runs, which the next run removes


def workdir_state(cfg: Config) -> WorkdirState:
    """Whether a run is in progress, and the leftovers of killed runs; takes no lock, writes nothing."""
    wd = cfg.workdir_path
    return WorkdirState(running_pid(wd), _stale_temps(wd) + stale_scratch())


def _stale_temps(wd: Path) -> list[Path]:
    """Temporaries of killed runs in the workdir, its scores/ folder and each extra text's folders."""
    extra = sorted(p for p in (wd / TEXTS).glob("*") if p.is_dir()) if (wd / TEXTS).is_dir() else []
    return stale_temps(wd) + stale_temps(wd / SCORES) + [t for d in extra for t in stale_temps(d) + stale_temps(d / SCORES)]


def _remove_leftovers(wd: Path, emit: Callable[[Event], None]) -> None:
    removed, kept, size = [], [], 0
    for p in _stale_temps(wd) + stale_scratch():
        try:
            n = leftover_size(p)
            remove_leftover(p)
        except OSError as exc:
            kept.append({"path": str(p), "error": exc.strerror or str(exc)})
            continue
        removed.append(str(p))
        size += n
    if removed or kept:
        emit({"event": "leftovers", "removed": removed, "size_bytes": size, "not_removed": kept})


def run_pipeline(
    cfg: Config, force: str | None = None, until: str | None = None, on_event: Callable[[Event], None] | None = None, wait: bool = True
) -> list[StageReport]:
    """Run every stale stage, holding the workdir's lock (another run on it: wait, or with
    wait=False raise BadArguments). Leftover temporaries of killed runs are removed first."""
    emit = on_event or (lambda e: None)
    stages = build_stages(cfg)
    forced = _select(stages, force, "--force")
    _check_workdir(cfg, stages)
    stages = _until(stages, until)
    wd = cfg.workdir_path
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, wd, "create workdir") from exc
    with workdir_lock(wd, wait, lambda pid: emit({"event": "waiting", "workdir": str(wd), "pid": pid})):
        _remove_leftovers(wd, emit)
        if (msg := overlap_warning(cfg)) is not None:
            emit({"event": "warning", "message": msg})
        return _run_stages(Manifest(wd), stages, forced, emit)


def _run_stages(m: Manifest, stages: list[Stage], forced: set[str], emit: Callable[[Event], None]) -> list[StageReport]:
    reports: list[StageReport] = []
    done: set[str] = set()
    for k, s in enumerate(stages):
        if s.name in done:
            continue
        v, _ = _verdict(m, s, set())
        if v.up_to_date and s.name not in forced:
            emit({"event": "stage_skipped", "stage": s.name, "reason": v.reason})
            reports.append(StageReport(s.name, "skipped", v.reason, s.outputs))
            continue
        batch = [(s, "forced" if v.up_to_date else v.reason)]
        if s.batch_key is not None:
            for nxt in stages[k + 1 :]:
                if nxt.batch_key != s.batch_key:
                    continue
                nv, _ = _verdict(m, nxt, set())
                if not nv.up_to_date or nxt.name in forced:
                    batch.append((nxt, "forced" if nv.up_to_date else nv.reason))
        # What the stage is about to read, then its hashes: a file replaced or rewritten while the
        # stage runs is caught below, and the stage's hashes are those of what it read.
        before = {p: _identity(p) for b, _ in batch for p in b.inputs.values()}
        hashes = {b.name: {n: m.file_hash(p) for n, p in b.inputs.items()} for b, _ in batch}
        for b, reason in batch:
            emit({"event": "stage_started", "stage": b.name, "reason": reason})
        t0 = time.perf_counter()
        try:
            if s.batch_run is not None:
                s.batch_run([b for b, _ in batch])
            elif s.action is not None:
                s.action()
        except InputChanged as exc:
            raise InputChanged(exc.path, f"stage {s.name} was reading it") from exc
        for p, ident in before.items():
            if _identity(p) != ident:
                raise InputChanged(p, f"stage {s.name} was reading it")
        dt = (time.perf_counter() - t0) / len(batch)  # a batch's time is shared evenly
        for b, reason in batch:
            record_stage(m, b.name, b.kind, b.settings, hashes[b.name], b.outputs, dt)
            m.save()
            done.add(b.name)
            emit(
                {
                    "event": "stage_done",
                    "stage": b.name,
                    "seconds": round(dt, 3),
                    "outputs": [{"path": str(o), "size_bytes": o.stat().st_size} for o in b.outputs],
                }
            )
            reports.append(StageReport(b.name, "ran", reason, b.outputs, dt))
    m.save()
    order = {x.name: i for i, x in enumerate(stages)}
    reports.sort(key=lambda r: order[r.name])
    return reports
