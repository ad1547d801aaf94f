"""The command line: parse, call one core function, render, map errors to exit codes.

Exit codes (docs/design.md): 0 ok, 1 unexpected error, 2 bad arguments or config, 3 quality gate
failed, 4 bad input data, 5 I/O, 128+N killed by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP).
Errors print one line; `-v` shows the traceback."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .atomic import check_not_input, check_regular, leftover_size, scratch_dir
from .compare.gates import enforce_gates, gate_failed
from .compare.stage import Candidate, build_reference, compare_models, meta_path
from .convert import convert_adapter, convert_hf_base
from .errors import BadArguments, BadInput, LoraqError
from .ggml_types import file_type
from .gguf_io import open_gguf
from .inspect import describe
from .llama.engine import set_blas_threads
from .llama.llama_cpp_engine import ENGINES, load_llama_cpp
from .merge import AdapterSpec, merge_model
from .pipeline.checkpoint import cpu_threads
from .pipeline.config import MAX_CHUNKS, MAX_CTX, MAX_SCALE, MAX_THREADS, Config, Gates, load_config
from .pipeline.runner import Event, build_stages, check_run_gates, run_pipeline, stage_status, with_threads, workdir_state
from .quantize.driver import QuantizeOptions, QuantizeResult, quantize_model
from .quantize.imatrix_file import for_quantize
from .quantize.mix import parse_tensor_type_file, target_mix, with_mix

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA fine-tune -> llama.cpp GGUF files, with proof the fine-tune survived.",
)
# markup=False everywhere: paths and messages are data, and "[run]" in a path is not a style tag.
err = Console(stderr=True, highlight=False, markup=False)
# Tables are data: when stdout is not a terminal, do not squeeze them into 80 columns.
out = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 160)
_verbose = False


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr when it is a terminal; otherwise a no-op tick."""
    with _progress_of(label) as update:
        done = 0

        def tick(*_: object) -> None:
            nonlocal done
            done += 1
            update(done, total)

        yield tick


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")) -> None:
    global _verbose
    _verbose = verbose


@app.command()
def convert(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."),
    base: Path = typer.Option(
        ..., "--base", help="Base model GGUF (or Hugging Face folder): supplies architecture, head counts and tensor names."
    ),
    output: Path = typer.Option(..., "-o", "--outfile", "--output", help="Output GGUF LoRA adapter."),
    outtype: str = typer.Option("f16", "--outtype", help="f32, f16, bf16 or q8_0."),
) -> None:
    """PEFT adapter -> GGUF LoRA adapter (convert_lora_to_gguf.py, with rsLoRA and alpha_pattern right)."""
    with _gguf_base(base, output) as gguf_base:
        res = convert_adapter(adapter, gguf_base, output, outtype=outtype)
    out.print(f"wrote {res.out} ({res.n_tensors} tensors, alpha {res.alpha:g})")
    for note in res.notes:
        err.print(f"note: {note}")


@app.command("convert-base")
def convert_base(
    folder: Path = typer.Argument(..., help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)."),
    output: Path = typer.Argument(..., help="Output GGUF."),
    outtype: str = typer.Option("f16", "--outtype", help="f16, bf16 or f32."),
) -> None:
    """Hugging Face model folder -> F16 GGUF (convert_hf_to_gguf.py's output, streamed tensor by tensor)."""
    res = convert_hf_base(folder, output, outtype)
    out.print(f"wrote {res.out} ({res.arch}, {res.n_tensors} tensors, pre-tokenizer {res.pre})")


@contextmanager
def _gguf_base(base: Path, output: Path) -> Iterator[Path]:
    """The base as a GGUF: a Hugging Face folder is converted to F16 in a scratch folder for this
    one command (`loraq run` keeps its conversion as the `base` stage's checkpoint instead)."""
    if not (base.is_dir() and (base / "config.json").is_file()):
        yield base
        return
    check_not_input(output, [("base model", base)])
    with scratch_dir() as d:
        res = convert_hf_base(base, d / "base-f16.gguf")
        err.print(f"note: converted the Hugging Face folder {base} to an F16 GGUF ({res.arch}) for this command")
        yield res.out


def _parse_scaled(values: list[str]) -> list[tuple[Path, float]]:
    pairs = []
    for v in values:
        path, sep, scale = v.rpartition(":")
        try:
            pairs.append((Path(path), float(scale)))
        except ValueError:
            sep = ""
        if not sep:
            raise BadArguments(f"--lora-scaled expects PATH:SCALE, got '{v}'")
        _number("--lora-scaled scale", pairs[-1][1], -MAX_SCALE, MAX_SCALE)
    return pairs


def _number(option: str, v: float, lo: float, hi: float) -> None:
    """Numbers on the command line obey the config's bounds: finite and in range (click's FLOAT
    accepts 'nan' and 'inf', which would disable a gate or poison a merge)."""
    if not (math.isfinite(v) and lo <= v <= hi):
        raise BadArguments(f"{option} must be a finite number in [{lo:g}, {hi:g}], got {v}")


def _gates(max_kld_mean: float | None, min_same_top: float | None) -> Gates:
    if max_kld_mean is not None:
        _number("--max-kld-mean", max_kld_mean, 0, math.inf)
    if min_same_top is not None:
        _number("--min-same-top", min_same_top, 0, 1)
    return Gates(max_kld_mean=max_kld_mean, min_same_top=min_same_top)


@app.command()
def merge(
    base: Path = typer.Argument(..., help="Base model GGUF (F32/F16/BF16), or a Hugging Face folder (converted to F16 first)."),
    lora: list[Path] = typer.Option([], "--lora", help="Adapter (GGUF LoRA or PEFT folder) with scale 1.0; repeatable."),
    lora_scaled: list[str] = typer.Option([], "--lora-scaled", help="PATH:SCALE; repeatable."),
    output: Path = typer.Option(..., "-o", "--output", help="Merged GGUF."),
    outtype: str = typer.Option("f16", "--outtype", help="f16, bf16 or f32."),
    allow_requantize: bool = typer.Option(
        False, "--allow-requantize", help="Accept a quantized base (dequantized; the result is quantized twice)."
    ),
    threads: int = typer.Option(0, "--threads", "-t", help="BLAS threads for the B·A products (0: the CPUs available)."),
    base_precision: str = typer.Option(
        "original",
        "--base-precision",
        help="original, or nf4_roundtrip (QLoRA: merge into the linear weights as bitsandbytes' NF4 gave them in training).",
    ),
) -> None:
    """W + scale·(alpha/r)·B·A into one GGUF (llama-export-lora, rounded once from float64)."""
    _number("--threads", threads, 0, MAX_THREADS)
    set_blas_threads(cpu_threads(threads))
    specs = [AdapterSpec(p, 1.0) for p in lora] + [AdapterSpec(p, s) for p, s in _parse_scaled(lora_scaled)]
    with _gguf_base(base, output) as gguf_base, _progress(len(open_gguf(gguf_base).tensors), "merge") as tick:
        res = merge_model(gguf_base, specs, output, outtype, allow_requantize, on_tensor=tick, base_precision=base_precision)
    for w in res.warnings:
        err.print(f"warning: {w}")
    nf4 = f", {len(res.nf4)} base tensors through the NF4 roundtrip" if res.nf4 else ""
    out.print(f"wrote {res.out}: {len(res.merged)} tensors merged{nf4}")


@app.command()
def quantize(
    args: list[str] = typer.Argument(..., help="IN [OUT] TYPE, as llama-quantize."),
    # a str, not a Path: quantize.imatrix.file records the argument as typed, as llama-quantize does
    imatrix: str | None = typer.Option(None, "--imatrix", help="Importance matrix (GGUF or legacy .dat)."),
    output_tensor_type: str | None = typer.Option(None, "--output-tensor-type"),
    token_embedding_type: str | None = typer.Option(None, "--token-embedding-type"),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="PATTERN=TYPE; first match wins; repeatable."),
    pure: bool = typer.Option(False, "--pure", help="No mixture rules: every quantizable tensor gets TYPE."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor"),
    allow_requantize: bool = typer.Option(False, "--allow-requantize"),
    include_weights: list[str] = typer.Option(
        [], "--include-weights", help="Use imatrix data only for tensors whose name contains this; repeatable."
    ),
    exclude_weights: list[str] = typer.Option(
        [], "--exclude-weights", help="Use no imatrix data for tensors whose name contains this; repeatable."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the size; write nothing."),
    threads: int = typer.Option(0, "--threads", "-t", help="Worker threads (0: all cores)."),
    tensor_type_file: Path | None = typer.Option(None, "--tensor-type-file", help="NAME=TYPE words, as llama-quantize reads them."),
    target_bpw: float | None = typer.Option(None, "--target-bpw", help="Choose each tensor's type for this size (bits per weight)."),
    size_of: str | None = typer.Option(None, "--size-of", help="Choose each tensor's type for the size this TYPE would have."),
    sensitivity: Path | None = typer.Option(
        None, "--sensitivity", help="With a target: price types by this file's measured KLD per tensor (loraq sensitivity)."
    ),
    base: Path | None = typer.Option(
        None, "--base", help="With a target: the model IN was merged from; types that erase the fine-tune's delta are not used."
    ),
) -> None:
    """Quantize a GGUF with llama-quantize's per-tensor type rules; byte-identical blocks.

    With --target-bpw or --size-of, each tensor's type is chosen to minimise the predicted loss
    (the imatrix-weighted quantization error, or with --sensitivity the measured KLD it causes)
    within that size; the choice is stored in the file (loraq.quantize.tensor_types) and can be
    replayed with --tensor-type-file."""
    if len(args) not in (2, 3):
        raise BadArguments("usage: loraq quantize IN [OUT] TYPE")
    _number("--threads", threads, 0, MAX_THREADS)
    inp, fobj = Path(args[0]), file_type(args[-1])
    dest = Path(args[1]) if len(args) == 3 else inp.parent / f"ggml-model-{fobj.name}.gguf"
    weights, kvs = for_quantize(imatrix, include_weights, exclude_weights)
    if imatrix and not dry_run:
        check_not_input(dest, {"imatrix": imatrix})
    tts = []
    for spec in tensor_type:
        pat, sep, t = spec.partition("=")
        if not sep or not pat or not t:
            raise BadArguments(f"--tensor-type expects PATTERN=TYPE, got '{spec}'")
        tts.append((pat, t))
    if tensor_type_file is not None:
        check_regular(tensor_type_file, "tensor type file")
        if tensor_type_file.stat().st_size > 16 << 20:
            raise BadInput(f"{tensor_type_file} is larger than 16 MiB; is this the right file?")
        try:
            tts += parse_tensor_type_file(tensor_type_file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadInput(f"{tensor_type_file} is not UTF-8 text ({exc.reason})") from None
    opts = QuantizeOptions(
        output_tensor_type, token_embedding_type, tts, pure, leave_output_tensor, allow_requantize, weights, cpu_threads(threads), kvs
    )
    if (sensitivity is not None or base is not None) and target_bpw is None and size_of is None:
        raise BadArguments("--sensitivity and --base choose a size-targeted mix: give --target-bpw or --size-of too")
    if target_bpw is not None or size_of is not None:
        from .imatrix.sensitivity import read_sensitivity

        per_unit = read_sensitivity(sensitivity).per_unit_all() if sensitivity is not None else None
        if base is not None:
            check_regular(base, "base model")
        with _progress_of("predict each type's loss") as update:
            pairs, budget = target_mix(
                inp,
                fobj.name,
                opts,
                bpw=target_bpw,
                size_of=size_of,
                progress=lambda _, k, n: update(k, n),
                base=base,
                sensitivity=per_unit,
            )
        opts = with_mix(opts, pairs)
        out.print(f"mix: {len(pairs)} tensors chosen for {_size(budget)} of tensors")
    if dry_run:
        _print_plan(quantize_model(inp, None, fobj.name, opts, dry_run=True))
        return
    with _progress(len(open_gguf(inp).tensors), f"quantize {fobj.name}") as tick:
        res = quantize_model(inp, dest, fobj.name, opts, on_tensor=tick)
    out.print(f"wrote {dest}: {_size(res.size_bytes)}, {res.bpw:.2f} bpw, {res.n_fallback} shape fallbacks")


def _print_plan(res: QuantizeResult) -> None:
    t = Table(title=f"plan for {res.ftype.name}", show_lines=False)
    for c in ("tensor", "shape (ne)", "from", "to", "why"):
        t.add_column(c)
    for e in res.plan:
        t.add_row(e.name, "×".join(map(str, e.ne)), e.src.name, e.dst.name, e.reason)
    out.print(t)
    out.print(f"size {_size(res.size_bytes)} ({res.size_bytes} bytes), {res.bpw:.3f} bpw, {res.n_fallback} shape fallbacks")


@app.command()
def compare(
    base: Path = typer.Argument(..., help="The F16/BF16/F32 base model GGUF (the reference is base + adapters)."),
    text: Path = typer.Option(..., "-f", "--text", help="Evaluation text (UTF-8), a chat .jsonl, or a .json list of token ids."),
    lora: list[Path] = typer.Option([], "--lora", help="Adapter (GGUF LoRA or PEFT folder), scale 1.0; repeatable."),
    lora_scaled: list[str] = typer.Option([], "--lora-scaled", help="PATH:SCALE; repeatable."),
    merged: list[Path] = typer.Option([], "--merged", help="A merged-then-quantized GGUF to score; repeatable."),
    runtime: list[Path] = typer.Option([], "--runtime", help="A quantized base to score with the adapters applied at runtime; repeatable."),
    workdir: Path = typer.Option(..., "-o", "--workdir", help="Where reference.kld and report.json/.md/.html go."),
    ctx: int = typer.Option(256, "-c", "--ctx", help="Tokens per chunk (as llama-perplexity -c)."),
    chunks: int = typer.Option(16, "--chunks", help="Number of chunks to score."),
    max_kld_mean: float | None = typer.Option(None, "--max-kld-mean", help="Gate: fail (exit 3) above this mean KLD."),
    min_same_top: float | None = typer.Option(None, "--min-same-top", help="Gate: fail below this same-top fraction."),
    threads: int = typer.Option(0, "--threads", "-t"),
    kv_cache: str = typer.Option("f32", "--kv-cache", help="KV cache the engine emulates: f32, or f16 (llama-perplexity's default)."),
    engine: str = typer.Option("numpy", "--engine", help="numpy, or llama.cpp (llama-cpp-python on any accelerator it was built for)."),
) -> None:
    """KL divergence of each file against base + adapter (llama-perplexity --kl-divergence, many at once)."""
    adapters = [(p, 1.0) for p in lora] + _parse_scaled(lora_scaled)
    if not adapters:
        raise BadArguments("give the adapter with --lora or --lora-scaled")
    gates = _gates(max_kld_mean, min_same_top)
    _number("--ctx", ctx, 1, MAX_CTX)
    _number("--chunks", chunks, 1, MAX_CHUNKS)
    _number("--threads", threads, 0, MAX_THREADS)
    threads = cpu_threads(threads)
    if kv_cache not in ("f32", "f16"):
        raise BadArguments(f"--kv-cache must be f32 or f16, got {kv_cache!r}")
    if engine not in ENGINES:
        raise BadArguments(f"--engine: unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "llama.cpp":
        load_llama_cpp()  # a missing llama-cpp-python: one line (exit 2) before anything is computed
    ref = workdir / "reference.kld"
    # Every output against every input before anything is written: the reference must not replace a candidate.
    inputs = [
        ("base model", base),
        ("evaluation text", text),
        *(("adapter", a) for a, _ in adapters),
        *(("model", p) for p in (*merged, *runtime)),
    ]
    for o in (ref, meta_path(ref), *(workdir / n for n in ("report.json", "report.md", "report.html"))):
        check_not_input(o, inputs)
    build_reference(base, adapters, text, ctx, chunks, ref, threads, kv_cache=kv_cache, engine=engine)
    cands = [Candidate("base", "base", "F16", base)]
    cands += [
        Candidate(p.stem if p.stem.startswith("merged") else f"merged-{p.stem}", "merged", p.stem.rsplit("-", 1)[-1], p) for p in merged
    ]
    cands += [
        Candidate(
            f"runtime-{p.stem.rsplit('-', 1)[-1]}",
            "runtime_lora",
            p.stem.rsplit("-", 1)[-1],
            p,
            adapters,
            [p, *(a for a, _ in adapters if a.is_file())],
        )
        for p in runtime
    ]
    report = compare_models(ref, cands, text, workdir, gates, threads, kv_cache=kv_cache, engine=engine)
    _print_report(workdir)
    enforce_gates(report, gates)


@contextmanager
def _progress_of(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr when it is a terminal (otherwise a no-op), for work whose total
    may be known only once it starts: update(done, total)."""
    if not err.is_terminal:
        yield lambda *_: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as p:
        task = p.add_task(label, total=None)
        yield lambda done, total: p.update(task, completed=done, total=total)


@app.command()
def imatrix(
    model: Path = typer.Argument(..., help="Model GGUF (e.g. the merged F16: the fine-tune's own activations)."),
    text: Path = typer.Option(..., "-f", "--file", help="Calibration text (UTF-8), or a .jsonl of chat conversations."),
    output: Path = typer.Option(Path("imatrix.gguf"), "-o", "--output", help="Output: GGUF imatrix, or legacy format if it ends in .dat."),
    lora: list[Path] = typer.Option([], "--lora", help="Adapter applied at runtime (GGUF LoRA or PEFT folder), scale 1.0; repeatable."),
    lora_scaled: list[str] = typer.Option([], "--lora-scaled", help="PATH:SCALE; repeatable."),
    ctx: int = typer.Option(512, "-c", "--ctx", help="Tokens per chunk (as llama-imatrix -c)."),
    chunks: int | None = typer.Option(None, "--chunks", help="Chunks to process (default: all the text gives)."),
    process_output: bool = typer.Option(False, "--process-output", help="Collect output.weight too (not with tied embeddings)."),
    threads: int = typer.Option(0, "--threads", "-t"),
) -> None:
    """Importance matrix (llama-imatrix's per-column Σx² and counts) from the engine over calibration text."""
    from .imatrix.collect import collect_imatrix
    from .quantize.imatrix_file import write_imatrix_dat, write_imatrix_gguf

    adapters = [(p, 1.0) for p in lora] + _parse_scaled(lora_scaled)
    _number("--ctx", ctx, 1, MAX_CTX)
    if chunks is not None:
        _number("--chunks", chunks, 1, MAX_CHUNKS)
    _number("--threads", threads, 0, MAX_THREADS)
    inputs = [("model", model), ("calibration text", text), *(("adapter", a) for a, _ in adapters)]
    check_not_input(output, inputs)
    with _progress_of("imatrix") as update:
        res = collect_imatrix(model, text, ctx, chunks, adapters, process_output, cpu_threads(threads), update)
    write = write_imatrix_dat if output.suffix.lower() == ".dat" else write_imatrix_gguf
    write(output, res.data)  # atomic: a temporary beside it, renamed
    d = res.data
    out.print(
        f"wrote {output}: {len(d.entries)} tensors, {d.chunk_count} chunks of {d.chunk_size} tokens ({res.kind}, {res.text_tokens} tokens in the text)"
    )


@app.command(name="sensitivity")
def sensitivity_cmd(
    model: Path = typer.Argument(..., help="The model to quantize (e.g. the merged F16)."),
    text: Path = typer.Option(..., "-f", "--file", help="Calibration text (UTF-8), or a .jsonl of chat conversations."),
    output: Path = typer.Option(Path("sensitivity.json"), "-o", "--output"),
    base: Path | None = typer.Option(None, "--base", help="The model MODEL was merged from: probes leave the fine-tune's delta alone."),
    ctx: int = typer.Option(256, "-c", "--ctx", help="Tokens per chunk."),
    chunks: int = typer.Option(2, "--chunks", help="Chunks to run per probe."),
    threads: int = typer.Option(0, "--threads", "-t"),
) -> None:
    """Each tensor's KLD per unit of quantization error, probed one tensor at a time with the engine
    (for quantize --target-bpw/--size-of --sensitivity)."""
    from .imatrix.sensitivity import measure_sensitivity, write_sensitivity

    _number("--ctx", ctx, 2, MAX_CTX)
    _number("--chunks", chunks, 1, MAX_CHUNKS)
    _number("--threads", threads, 0, MAX_THREADS)
    check_not_input(output, [("model", model), ("calibration text", text), *([("base", base)] if base is not None else [])])
    with _progress_of("probe each tensor") as update:
        res = measure_sensitivity(model, text, base=base, ctx=ctx, chunks=chunks, threads=cpu_threads(threads), progress=update)
    write_sensitivity(output, res)
    out.print(f"wrote {output}: {len(res.tensors)} tensors probed with {res.probe} on {res.chunks} chunks of {res.ctx} tokens")


@app.command()
def inspect(file: Path = typer.Argument(..., help="A GGUF file.")) -> None:
    """Metadata, tensor table, type histogram and bits per weight of a GGUF."""
    info = describe(file)
    kv = Table(title=str(file), show_header=True)
    kv.add_column("key")
    kv.add_column("value", overflow="fold")
    for k, v in info.kvs:
        kv.add_row(k, v)
    out.print(kv)
    tt = Table(show_header=True)
    for c in ("tensor", "ne", "type", "bytes"):
        tt.add_column(c)
    for name, ne, typ, nb in info.tensors:
        tt.add_row(name, "×".join(map(str, ne)), typ, str(nb))
    out.print(tt)
    hist = ", ".join(f"{k}: {v}" for k, v in info.histogram.items())
    out.print(f"{len(info.tensors)} tensors ({hist}); {info.n_weights:,} weights, {_size(info.data_bytes)}, {info.bpw:.3f} bpw")


# The version of the `run --json` event stream documented in docs/events.schema.json: bumped when
# an event loses or renames a field or changes a field's meaning (new optional fields keep it).
EVENT_SCHEMA_VERSION = 1


@app.command()
def run(
    config: Path = typer.Argument(..., help="The pipeline's YAML config."),
    force: str | None = typer.Option(None, "--force", is_flag=False, flag_value="all", help="Rerun every stage, or --force=STAGE."),
    until: str | None = typer.Option(None, "--until", help="Stop after this stage (name or kind)."),
    json_events: bool = typer.Option(False, "--json", help="One JSON object per event on stdout (docs/events.schema.json)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Another run holds the workdir: exit 2 instead of waiting."),
    threads: int | None = typer.Option(
        None, "--threads", "-t", help="Threads for every stage, over the config's threads and quantize.threads (0: the CPUs available)."
    ),
) -> None:
    """The whole chain, skipping stages that are up to date."""
    if threads is not None:
        _number("--threads", threads, 0, MAX_THREADS)
    finished: list[dict] = []  # stage entries for the summary, in the order stages finish

    def emit(e: Event) -> None:
        sys.stdout.write(json.dumps({"schema_version": EVENT_SCHEMA_VERSION, **e}) + "\n")
        sys.stdout.flush()

    started: dict[str, str] = {}
    outputs: dict[str, list[str]] = {}  # each stage's outputs, for skipped stages' summary entries

    def on_event(e: Event) -> None:
        if e["event"] == "stage_started":
            started[e["stage"]] = e["reason"]
        elif e["event"] in ("stage_skipped", "stage_done"):
            ran = e["event"] == "stage_done"
            finished.append(
                {
                    "stage": e["stage"],
                    "status": "ran" if ran else "skipped",
                    "reason": started.get(e["stage"], "") if ran else e["reason"],
                    "seconds": e["seconds"] if ran else 0.0,
                    "outputs": [o["path"] for o in e["outputs"]] if ran else outputs.get(e["stage"], []),
                }
            )
        # Always on stderr, even when it is not a terminal: a wait or a clean-up must not be silent.
        if e["event"] == "waiting":
            pid = f" (pid {e['pid']})" if e["pid"] else ""
            sys.stderr.write(f"waiting for the run in {e['workdir']}{pid} to finish…\n")
            sys.stderr.flush()
        elif e["event"] == "warning":
            sys.stderr.write(f"warning: {e['message']}\n")
        elif e["event"] == "leftovers":
            if e["removed"]:
                names = ", ".join(Path(p).name for p in e["removed"])
                sys.stderr.write(
                    f"removed {len(e['removed'])} leftover temporary file(s) of an interrupted run ({_size(e['size_bytes'])}): {names}\n"
                )
            for k in e["not_removed"]:
                sys.stderr.write(f"warning: cannot remove leftover {k['path']}: {k['error']}\n")
        if json_events:
            emit(e)
        elif not err.is_terminal:
            return  # the summary table on stdout says what ran and why; stderr stays for errors
        elif e["event"] == "stage_skipped":
            err.print(f"skip {e['stage']}: {e['reason']}", style="dim")
        elif e["event"] == "stage_started":
            err.print(f"run  {e['stage']} ({e['reason']})", style="bold")

    cfg = None
    try:
        cfg = load_config(config)
        if cfg.compare is not None and cfg.compare.engine == "llama.cpp":
            load_llama_cpp()  # a missing llama-cpp-python: one line (exit 2) now, not after merge and quantize
        if threads is not None:
            cfg = with_threads(cfg, threads)
        outputs.update({s.name: [str(o) for o in s.outputs] for s in build_stages(cfg)})
        reports = run_pipeline(cfg, force=force, until=until, on_event=on_event, wait=not no_wait)
        failures = check_run_gates(cfg)
    except LoraqError as exc:
        if json_events:  # the stream still ends with a summary, saying what stopped the run
            emit(_summary(cfg, finished, exc))
        raise
    delivered = cfg.deliver is not None and any(r.name == "deliver" for r in reports)
    if json_events:
        stages = [
            {
                "stage": r.name,
                "status": r.status,
                "reason": r.reason,
                "seconds": round(r.seconds, 3),
                "outputs": [str(o) for o in r.outputs],
            }
            for r in reports
        ]
        error = gate_failed(failures) if failures else None
        emit(_summary(cfg, stages, error, dist=cfg.workdir_path / "dist" if delivered else None))
        if error is not None:
            raise error
        return
    t = Table(title=f"{cfg.name}: {cfg.workdir_path}")
    for c in ("stage", "status", "reason", "seconds", "output", "size"):
        t.add_column(c)
    for r in reports:
        for i, o in enumerate(r.outputs):
            size = _size(o.stat().st_size) if o.is_file() else "-"
            first = i == 0
            t.add_row(
                r.name if first else "",
                r.status if first else "",
                r.reason if first else "",
                f"{r.seconds:.1f}" if first and r.status == "ran" else "",
                o.name + ("/" if o.is_dir() else ""),
                size,
            )
    out.print(t)
    if cfg.compare is not None:
        _print_report(cfg.workdir_path)
    if failures:
        raise gate_failed(failures)
    if delivered:
        out.print(f"dist: {cfg.workdir_path / 'dist'}")


def _summary(cfg: Config | None, stages: list[dict], error: LoraqError | None, dist: Path | None = None) -> Event:
    """The last event of `run --json`: what ran, the gates, where dist/ is, and the exit code."""
    gates: dict | None = None
    if cfg is not None:
        try:
            failures = check_run_gates(cfg)
            gates = {"passed": not failures, "failures": [str(f) for f in failures]}
        except LoraqError:
            gates = None  # the report cannot be read; the error says why
    return {
        "event": "summary",
        "stages": stages,
        "gates": gates,
        "dist": str(dist) if dist is not None else None,
        "exit_code": error.exit_code if error is not None else 0,
        "error": str(error) if error is not None else None,
    }


def _print_report(workdir: Path) -> None:
    report = workdir / "report.json"
    if not report.exists():
        return
    rep = json.loads(report.read_text())
    t = Table(
        title=f"what the fine-tune kept (reference {rep['reference']['name']}, PPL {rep['reference']['ppl']:.3f}; "
        f"adapter effect KLD {rep['adapter_effect']['kld_mean'] or 0:.4f})"
    )
    for c in ("variant", "size", "bpw", "PPL", "KLD mean", "KLD p99", "same top", "effect kept"):
        t.add_column(c)
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for v in rep["variants"]:
        t.add_row(
            v["name"],
            _size(v["size_bytes"]),
            num(v["bpw"], ".2f"),
            num(v["ppl"], ".3f"),
            num(v["kld_mean"], ".5f"),
            num(v["kld_p99"], ".4f"),
            pct(v["same_top"]),
            pct(v["effect_retention"]),
        )
    out.print(t)
    out.print(f"report: {workdir / 'report.html'}")


@app.command()
def check(
    config: Path = typer.Argument(..., help="The pipeline's YAML config."),
    json_out: bool = typer.Option(False, "--json", help="The whole result as one JSON object on stdout."),
    all_tensors: bool = typer.Option(False, "--all-tensors", help="List every adapted tensor, not only those below some type's noise."),
) -> None:
    """Preflight, writing nothing: deployment paths per adapter, architecture and tokenizer support,
    and whether each adapted tensor's delta is below each requested type's quantization noise.
    Exits 0 whatever the verdicts (it is a report)."""
    from .check import check_config

    res = check_config(load_config(config))
    if json_out:
        sys.stdout.write(json.dumps(res.to_json(), allow_nan=False, default=str) + "\n")
        return
    ok = lambda b: "ok" if b else "NO"  # noqa: E731
    out.print(f"base {res.base} ({res.base_kind}): architecture {res.arch or '-'} {ok(res.arch_ok)}{_why(res.arch_why)}")
    out.print(f"tokenizer {res.tokenizer or '-'} {ok(res.tokenizer_ok)}{_why(res.tokenizer_why)}")
    for a in res.adapters:
        out.print(f"adapter {a.path} (scale {a.scale:g}): {a.deployment}")
        out.print(f"  runtime GGUF adapter: {ok(a.runtime.ok)}{_why(a.runtime.why)}")
        out.print(f"  merged: {ok(a.merged.ok)}{_why(a.merged.why)}")
        for n in a.notes:
            out.print(f"  note: {n}")
    rows = [tc for tc in res.tensors if all_tensors or any(tn.below for tn in tc.types)]
    if rows:
        t = Table(title="quantization noise / adapter delta (‖UᵀEV‖² or ‖E‖², E = Q(W)−W, / ‖ΔW‖²; above 1: the delta is below the noise)")
        t.add_column("tensor")
        t.add_column("‖ΔW‖/‖W‖")
        for s in res.summaries:
            t.add_column(s.ftype)
        for tc in rows:
            by = {tn.ftype: tn for tn in tc.types}
            cells = [
                f"{by[s.ftype].ratio:.3g} {by[s.ftype].type}{' *' if by[s.ftype].below else ''}" if s.ftype in by else "-"
                for s in res.summaries
            ]
            t.add_row(tc.tensor, f"{math.sqrt(tc.delta_sq / tc.weight_sq) if tc.weight_sq else math.inf:.3%}", *cells)
        out.print(t)
        if not all_tensors and len(rows) < len(res.tensors):
            out.print(
                f"({len(res.tensors) - len(rows)} tensors whose delta is above every type's noise not listed; --all-tensors lists them)"
            )
    for s in res.summaries:
        out.print(f"{s.line} (effect kept, imatrix-free estimate: {s.kept_estimate:.0%})" if s.n_tensors else s.line)
    for why in res.skipped:
        err.print(f"note: not compared: {why}")
    out.print(f"checked in {res.seconds:.1f} s")


def _why(why: str | None) -> str:
    return f" — {why}" if why else ""


@app.command()
def status(config: Path = typer.Argument(..., help="The pipeline's YAML config.")) -> None:
    """Each stage: up to date or not, and why."""
    cfg = load_config(config)
    reports = stage_status(cfg)
    t = Table(title=f"{cfg.name}: {cfg.workdir_path}")
    for c in ("stage", "status", "reason"):
        t.add_column(c)
    for r in reports:
        t.add_row(r.name, r.status, r.reason)
    out.print(t)
    state = workdir_state(cfg)
    if state.running_pid is not None:
        pid = f" (pid {state.running_pid})" if state.running_pid else ""
        out.print(f"a run is in progress in {cfg.workdir_path}{pid}; this status may change when it finishes")
    if state.leftovers:
        size = sum(leftover_size(p) for p in state.leftovers)
        names = ", ".join(p.name for p in state.leftovers)
        out.print(
            f"{len(state.leftovers)} leftover temporary file(s) of an interrupted run ({_size(size)}), removed by the next run: {names}"
        )


def _fail(label: str, message: str, code: int) -> int:
    if _verbose:
        traceback.print_exc()
    # Plain write, not rich: a message is data and may hold "[", "]" or "[/x]".
    sys.stderr.write(f"{label}: {message}\n")
    return code


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so every cleanup (temporaries, worker pool)
    runs as it does for Ctrl-C."""


_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_received: int | None = None


def _on_signal(signum: int, frame: object) -> None:
    global _received
    if _received is not None:
        return  # already unwinding: a second signal must not interrupt the cleanup
    _received = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signal.Signals(signum).name)


def _install_signal_handlers() -> dict[int, object]:
    """SIGINT, SIGTERM and SIGHUP all raise KeyboardInterrupt (the first one only); the previous
    handlers are returned, to be restored. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old: dict[int, object] = {}
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        prev = signal.getsignal(sig)
        if sig != signal.SIGINT and prev == signal.SIG_IGN:
            continue  # nohup: SIGHUP stays ignored
        old[sig] = prev
        signal.signal(sig, _on_signal)
    return old


def _interrupted() -> int:
    sig = _received if _received is not None else int(signal.SIGINT)
    name = signal.Signals(sig).name
    sys.stderr.write(f"interrupted ({name}); finished outputs are kept, partial ones were removed\n")
    return 128 + sig


def run_cli(argv: list[str] | None = None) -> int:
    """The one error edge: every failure becomes one stderr line and the documented exit code."""
    global _received
    _received = None
    old = _install_signal_handlers()
    try:
        return _run(argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _run(argv: list[str] | None) -> int:
    try:
        try:
            app(args=argv, prog_name="loraq")  # typer prints usage errors itself and exits 2
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            if code == 130:  # typer turns KeyboardInterrupt (every handled signal) into exit 130
                return _interrupted()
            return code
        except KeyboardInterrupt:
            return _interrupted()
        except LoraqError as exc:
            return _fail("error", str(exc), exc.exit_code)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            cause = lines[0] if lines else type(exc).__name__
            return _fail("unexpected error", f"{type(exc).__name__}: {cause} (run with -v for the traceback)", 1)
    except KeyboardInterrupt:  # a signal while an error was being reported
        return _interrupted()
    return 0


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
