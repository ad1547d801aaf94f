"""The deliver stage: workdir/dist/, the files a CI job ships (docs/design.md, Deliver).

dist/ holds the variants the config asks for (a fixed list and/or the best one within bounds, read
from report.json), each as hard links of the workdir's files (copies where linking fails), an
Ollama Modelfile per variant, a model card (README.md) and SHA256SUMS. It is built in a sibling
folder and renamed into place only when complete, so a failed or refused delivery leaves an earlier
dist/ as it was. A quality-gate failure refuses delivery (exit 3): CI must not ship a failing model.

Everything written is a function of the inputs' bytes and the settings: no times, no absolute
paths, no host names, so identical inputs give byte-identical dist/ folders on any machine."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .. import __version__
from ..atomic import io_error
from ..compare.gates import check_gates, gate_failed
from ..compare.render import COLUMNS
from ..compare.report import load_report, preferred
from ..compare.schema import Report, VariantRow
from ..errors import BadArguments, BadInput, GateFailed
from ..gguf_io import open_gguf
from .checkpoint import sha256_file
from .config import DeliverBest, DeliverConfig, Gates

DIST = "dist"
SUMS = "SHA256SUMS"
CARD = "README.md"


@dataclass(frozen=True)
class Deliverable:
    """A variant dist/ can ship: its model file and, for a runtime variant, the adapters applied at load time."""

    name: str  # "merged-Q4_K_M", "runtime-Q8_0"
    kind: str  # "merged" | "runtime_lora"
    type: str
    model: Path
    adapters: tuple[tuple[Path, float], ...] = ()

    @property
    def files(self) -> list[Path]:
        return [self.model, *(p for p, _ in self.adapters)]


@dataclass(frozen=True)
class DeliverSpec:
    """What the deliver stage needs; built by the runner from the config."""

    name: str  # the config's name: the card's title and the Ollama model names' prefix
    workdir: Path
    options: DeliverConfig
    variants: Sequence[Deliverable]  # every variant the config builds that dist/ may ship
    adapters: Sequence[tuple[Path, float]]  # the deployable GGUF adapters, with their scales
    base_name: str  # the base model's file name (never its path)
    adapter_names: Sequence[tuple[str, float]]  # the configured adapters' names and scales
    gates: Gates | None = None
    report: Path | None = None  # report.json, when the config has a compare section


@dataclass
class DeliverResult:
    dist: Path
    variants: list[str]
    files: dict[str, int] = field(default_factory=dict)  # name in dist/ -> size in bytes


# --------------------------------------------------------------------------------------------
# Choosing variants


_BOUNDS = (  # DeliverBest field, report key, fails when the value is … the bound
    ("max_kld_mean", "kld_mean", ">"),
    ("min_same_top", "same_top", "<"),
    ("min_effect_retention", "effect_retention", "<"),
)


def _misses(row: VariantRow, best: DeliverBest) -> list[str]:
    """Why a report row is outside best's bounds (empty: within all of them)."""
    why = []
    if best.max_size_mib is not None and row["size_bytes"] / 2**20 > best.max_size_mib:
        why.append(f"size {row['size_bytes'] / 2**20:.1f} MiB > max_size_mib {best.max_size_mib:g}")
    for key, metric, op in _BOUNDS:
        limit = getattr(best, key)
        if limit is None:
            continue
        value = row.get(metric)
        if value is None:
            why.append(f"{metric} undefined")
        elif (value > limit) if op == ">" else (value < limit):
            why.append(f"{metric} {value:.4g} {op} {key} {limit:g}")
    return why


def choose_best(report: Report, best: DeliverBest, allowed: Sequence[str]) -> tuple[str, str]:
    """(variant name, one-line reason) for deliver.best; GateFailed (exit 3) when none qualifies."""
    kinds = best.kinds or ["merged", "runtime_lora"]
    # the worse of a with/without-imatrix pair (quantize.imatrix: auto) is never a candidate
    rows = [r for r in report["variants"] if r["kind"] in kinds and r["name"] in allowed and preferred(r)]
    ok = [r for r in rows if not _misses(r, best)]
    set_bounds = [(k, getattr(best, k)) for k in ("max_size_mib", *(k for k, _, _ in _BOUNDS))]
    bounds = ", ".join(f"{k} {v:g}" for k, v in set_bounds if v is not None)
    if not ok:
        detail = "; ".join(f"{r['name']}: {', '.join(_misses(r, best))}" for r in rows) or "no candidates of the chosen kinds"
        raise GateFailed(f"deliver.best: no variant is within {bounds} ({detail}); dist/ was not written")

    def kld(r: VariantRow) -> float:
        return r["kld_mean"] if r["kld_mean"] is not None else float("inf")

    if best.prefer == "smallest":
        pick = min(ok, key=lambda r: (r["size_bytes"], kld(r), r["name"]))
        how = "the smallest file"
    else:
        pick = min(ok, key=lambda r: (kld(r), r["size_bytes"], r["name"]))
        how = "the lowest mean KLD"
    return pick["name"], f"{how} of {len(ok)} of {len(rows)} candidates within {bounds}"


# --------------------------------------------------------------------------------------------
# Ollama chat template

CHATML_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
_MAX_TEMPLATE = 100_000  # characters; longer templates are not probed


@dataclass(frozen=True)
class OllamaChat:
    """A chat template as Ollama's Go TEMPLATE, its default system prompt, and its stop strings."""

    template: str
    system: str | None
    stops: tuple[str, ...]


def _chatml(messages: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox (no attribute tricks, no mutation), plus bounds on what a hostile template
    can make it compute: repetition (`'x' * n`), powers and ranges are capped. (Deeply nested
    loops can still take long; a chat template is the model author's code, run once per file.)"""

    intercepted_binops = frozenset(["*", "**"])
    _MAX_ITEMS = 10_000

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.sandbox.SecurityError("exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self._MAX_ITEMS:
                    raise jinja2.sandbox.SecurityError("repetition too long")
        return super().call_binop(context, operator, left, right)


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > 1_000:
        raise jinja2.sandbox.SecurityError("range too long")
    return r


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _render(tmpl: jinja2.Template, messages: Sequence[tuple[str, str]], bos: str, eos: str) -> str:
    return tmpl.render(messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, bos_token=bos, eos_token=eos)


def ollama_chat(chat_template: Any, bos: str = "", eos: str = "", extra_stops: Sequence[str] = ()) -> tuple[OllamaChat | None, str]:
    """Map a GGUF's tokenizer.chat_template (Jinja, as Hugging Face writes it) to Ollama's TEMPLATE.

    The template is not parsed but run, in Jinja's sandbox, on probe conversations: it maps when
    its output is exactly ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message, then the
    assistant header) for a conversation with a system message, and ChatML after at most a fixed
    system message for one without (that message becomes the Modelfile's SYSTEM). Returns the
    mapping, or None and the reason it does not map."""
    if not isinstance(chat_template, str) or not chat_template.strip():
        return None, "the GGUF has no tokenizer.chat_template"
    if len(chat_template) > _MAX_TEMPLATE:
        return None, f"its chat template is longer than {_MAX_TEMPLATE} characters"
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: "", range=_range)
    with_system = [("system", "Sys 1f3a."), ("user", "User 9c2e?"), ("assistant", "Assistant 4b7d."), ("user", "User 0a5f!")]
    without = with_system[1:]
    try:
        tmpl = env.from_string(chat_template)
        a = _render(tmpl, with_system, bos, eos)
        b = _render(tmpl, without, bos, eos)
    except Exception as exc:  # a template is the model author's code: any failure means "does not map"
        return None, f"rendering its chat template failed ({type(exc).__name__})"
    not_chatml = "its chat template does not render ChatML (`<|im_start|>role … <|im_end|>`), the form loraq maps to Ollama's"
    if a != _chatml(with_system, True):
        return None, not_chatml
    rest = _chatml(without, True)
    system: str | None = None
    if b != rest:
        head = b[: len(b) - len(rest)] if b.endswith(rest) else ""
        m = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.DOTALL)
        if m is None or "<|im_" in m.group(1):
            return None, not_chatml
        system = m.group(1)
    if system is not None and ('"""' in system or not system.strip()):
        return None, "its default system prompt cannot be written as a Modelfile SYSTEM string"
    stops = list(_CHATML_STOPS)
    for s in extra_stops:
        if s and s not in stops and '"' not in s and "\n" not in s and "\\" not in s:
            stops.append(s)
    return OllamaChat(CHATML_TEMPLATE, system, tuple(stops)), ""


def _token_text(tokens: Any, tid: Any) -> str:
    if isinstance(tokens, list) and isinstance(tid, int) and 0 <= tid < len(tokens) and isinstance(tokens[tid], str):
        return tokens[tid]
    return ""


@dataclass(frozen=True)
class _ModelInfo:
    arch: str
    model_name: str
    chat: OllamaChat | None
    chat_reason: str
    n_weights: int


def _model_info(path: Path) -> _ModelInfo:
    with open_gguf(path) as g:
        tokens = g.get("tokenizer.ggml.tokens")
        bos = _token_text(tokens, g.get("tokenizer.ggml.bos_token_id"))
        ends = [_token_text(tokens, g.get(f"tokenizer.ggml.{k}_token_id")) for k in ("eos", "eot")]
        chat, reason = ollama_chat(g.get("tokenizer.chat_template"), bos, ends[0], ends)
        name = g.get("general.name")
        return _ModelInfo(g.arch, name if isinstance(name, str) else "", chat, reason, sum(t.n_elements for t in g.tensors))


# --------------------------------------------------------------------------------------------
# Rendering


def _md_text(s: str) -> str:
    """Plain text inside Markdown: its markup characters escaped."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", str(s))


def _md_code(s: str, cell: bool = False) -> str:
    """A Markdown code span holding `s` verbatim (longer fences when it holds backticks); in a
    table cell (`cell`), pipes escaped as GFM tables need."""
    s = str(s).replace("|", "\\|") if cell else str(s)
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("loraq.pipeline", "templates"),
    autoescape=False,  # Markdown and Modelfiles, not HTML: values go through md_text / md_code
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_env.filters.update(
    md_text=_md_text, md_code=_md_code, md_cell=lambda s: _md_code(s, cell=True), oneline=lambda s: " ".join(str(s).split())
)

# The card's numbers, formatted exactly as report.md formats them.
_FORMAT = {key: fmt for _, key, fmt in COLUMNS}
CARD_COLUMNS = ("size_bytes", "bpw", "ppl", "kld_mean", "same_top", "effect_retention")


def cell(key: str, value: Any) -> str:
    return "–" if value is None else _FORMAT[key](value)


def _chat_note(chat: OllamaChat | None, reason: str) -> str:
    if chat is None:
        return (
            f"The Modelfiles have no `TEMPLATE`: {_md_text(reason)}. Ollama then sends prompts to the model as they are; "
            "write a `TEMPLATE` by hand to chat with it."
        )
    system = ", its default system prompt as `SYSTEM`" if chat.system is not None else ""
    stops = ", ".join(_md_code(s) for s in chat.stops)
    return f"The Modelfiles carry the GGUF's chat template as Ollama's `TEMPLATE` (ChatML){system}, and stop at {stops}."


def ollama_name(project: str, variant: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", f"{project}-{variant}".lower()).strip("-.") or "model"


# --------------------------------------------------------------------------------------------
# Writing dist/


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no extra space, no absolute path); a plain copy where the file system refuses."""
    try:
        os.link(src, dst)
        return
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise io_error(exc, src, "link") from exc
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise io_error(exc, dst, "copy into") from exc


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_bytes(text.encode("utf-8"))
    except OSError as exc:
        raise io_error(exc, path, "write") from exc


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; the previous dist/ is removed only after that."""
    old = final.with_name(f".{final.name}.old.tmp-{os.getpid()}")
    try:
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    except OSError as exc:
        raise io_error(exc, final, "replace") from exc
    shutil.rmtree(old, ignore_errors=True)


def deliver(spec: DeliverSpec) -> DeliverResult:
    """Build workdir/dist/ as the spec's options ask; GateFailed (exit 3) when a quality gate fails."""
    opts, wd = spec.options, spec.workdir
    report: Report | None = None
    if spec.report is not None:
        if not spec.report.is_file():
            raise BadInput(f"{spec.report} is missing; run the compare stage (loraq run without --until)")
        report = load_report(spec.report)
        if failures := check_gates(report, spec.gates):
            err = gate_failed(failures)
            raise GateFailed(f"{err}; dist/ was not written", err.failures)
    by_name = {v.name: v for v in spec.variants}
    chosen = list(opts.files)
    why: dict[str, str] = {n: "listed in deliver.files" for n in chosen}
    if opts.best is not None:
        if report is None:
            raise BadArguments("deliver.best needs a compare section (report.json)")
        pick, reason = choose_best(report, opts.best, list(by_name))
        why[pick] = f"deliver.best: {reason}" + ("; also listed in deliver.files" if pick in chosen else "")
        if pick not in chosen:
            chosen.append(pick)
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        raise BadArguments(f"deliver: unknown variant(s) {', '.join(unknown)}; this config builds: {', '.join(by_name)}")
    variants = [by_name[n] for n in chosen]

    # Every file by its name in dist/; two different files with one name cannot both ship.
    files: dict[str, Path] = {}
    for p in [f for v in variants for f in v.files] + ([p for p, _ in spec.adapters] if opts.adapter else []):
        if not re.fullmatch(r'[^\x00-\x1f\x7f"\\]+', p.name):
            raise BadArguments(
                f"deliver: cannot ship {p.name!r}: quotes, backslashes and control characters do not fit a Modelfile; rename it"
            )
        if files.setdefault(p.name, p) != p:
            raise BadArguments(f"deliver: two files named {p.name} ({files[p.name]} and {p}); rename one of them")
    rows = {r["name"]: r for r in report["variants"]} if report is not None else {}
    infos = {v.name: _model_info(v.model) for v in variants}

    cards: list[dict[str, Any]] = []
    modelfiles: dict[str, str] = {}
    for v in variants:
        info = infos[v.name]
        size = sum(p.stat().st_size for p in v.files)
        row: dict[str, Any] = dict(rows.get(v.name, {}))
        row.setdefault("size_bytes", size)
        row.setdefault("bpw", 8.0 * size / max(1, info.n_weights))
        scales_ok = len(v.adapters) <= 1 and all(s == 1.0 for _, s in v.adapters)
        mf_reason = (
            ""
            if scales_ok
            else "Ollama applies one adapter at scale 1.0; this variant needs " + ", ".join(f"{p.name} at {s:g}" for p, s in v.adapters)
        )
        name = ollama_name(spec.name, v.name)
        if scales_ok:
            modelfiles[f"Modelfile.{v.name}"] = _env.get_template("Modelfile.j2").render(
                variant=v.name,
                project=spec.name,
                ollama_name=name,
                version=__version__,
                model=v.model.name,
                adapters=[p.name for p, _ in v.adapters],
                chat=info.chat,
                chat_reason=info.chat_reason,
            )
        cards.append(
            {
                "name": v.name,
                "kind": v.kind,
                "files": [p.name for p in v.files],
                "model": v.model.name,
                "adapters": [(p.name, s) for p, s in v.adapters],
                "cells": [cell(k, row.get(k)) for k in CARD_COLUMNS],
                "why": why.get(v.name, ""),
                "ollama_name": name,
                "modelfile": f"Modelfile.{v.name}" if scales_ok else None,
                "modelfile_reason": mf_reason,
                "chat": info.chat,
                "chat_reason": info.chat_reason,
                "arch": info.arch,
                "model_name": info.model_name,
            }
        )
    notes: dict[str, list[str]] = {}
    for c in cards:
        if c["modelfile"]:
            notes.setdefault(_chat_note(c["chat"], c["chat_reason"]), []).append(c["name"])
    limits = {k: v for k, v in (spec.gates.model_dump() if spec.gates is not None else {}).items() if v is not None}
    card = _env.get_template("README.md.j2").render(
        name=spec.name,
        version=__version__,
        base_name=spec.base_name,
        adapter_names=list(spec.adapter_names),
        shipped_adapters=[p.name for p, _ in spec.adapters] if opts.adapter else [],
        variants=cards,
        chat_notes=list(notes.items()),
        report=report,
        adapter_effect=cell("kld_mean", report["adapter_effect"]["kld_mean"]) if report else "–",
        ref_ppl=cell("ppl", report["reference"]["ppl"]) if report else "–",
        gates=limits,
        model_name=next((c["model_name"] for c in cards if c["model_name"]), ""),
        arch=next((c["arch"] for c in cards if c["arch"]), ""),
    )

    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, wd, "create workdir") from exc
    # Named as atomic_output names its temporaries: if this process is killed, `status` reports the
    # folder and the next run removes it, like any other leftover (atomic.stale_temps).
    tmp = wd / f".{DIST}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        for n, src in sorted(files.items()):
            _link_or_copy(src, tmp / n)
        for n, text in sorted(modelfiles.items()):
            _write_text(tmp / n, text)
        _write_text(tmp / CARD, card)
        names = sorted(p.name for p in tmp.iterdir())
        _write_text(tmp / SUMS, "".join(f"{sha256_file(tmp / n)}  {n}\n" for n in names))
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _swap_in(tmp, wd / DIST)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise io_error(exc, tmp, "write") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DeliverResult(wd / DIST, [v.name for v in variants], sizes)


def read_sums(dist: Path) -> dict[str, str]:
    """SHA256SUMS as {name: sha256} (for tests and checks)."""
    out = {}
    for line in (dist / SUMS).read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        out[name] = digest
    return out
