"""The YAML config (docs/design.md, Config), validated strictly: unknown keys, wrong types and missing
files are all reported at once, each with its dotted location and, for a misspelled key, the
nearest valid name."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from ..atomic import io_error
from ..errors import BadArguments, shown
from ..ggml_types import FileType, GGMLType, file_type, ggml_type
from ..quantize.rules import NEEDS_IMATRIX_FTYPES


class _Strict(BaseModel):
    # allow_inf_nan=False: `.nan` or `.inf` would disable a gate or poison a merge (Untrusted input)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Bounds on numbers: far beyond any real use, close enough to catch a typo or a hostile file.
MAX_SCALE = 1000.0  # an adapter scale (llama.cpp's --lora-scaled); 1.0 is the trained strength
MAX_THREADS = 4096
MAX_CTX = 1 << 20
MAX_CHUNKS = 1 << 20


class AdapterConfig(_Strict):
    path: str
    scale: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE)


class ConvertConfig(_Strict):
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"


class MergeConfig(_Strict):
    outtype: Literal["f16", "bf16", "f32"] = "f16"
    # QLoRA: nf4_roundtrip merges into the base's linear weights passed through bitsandbytes' NF4
    # quantize -> dequantize, the weights the adapter was trained against (loraq/merge/nf4.py)
    base_precision: Literal["original", "nf4_roundtrip"] = "original"


class TargetConfig(_Strict):
    """A size-targeted mix (quantize/mix.py): per-tensor types chosen for a byte budget, the
    budget given as bits per weight or as the size another ftype would have. `type` supplies the
    rules for what the search leaves alone (default: the size_of type, else Q4_K_M)."""

    bpw: float | None = Field(None, gt=0, le=32)
    size_of: str | None = None
    type: str | None = None
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # the file is merged-<name>.gguf

    @field_validator("size_of", "type")
    @classmethod
    def _ft(cls, v: str | None) -> str | None:
        return None if v is None else _type_name(file_type, v)

    @model_validator(mode="after")
    def _one(self) -> TargetConfig:
        if (self.bpw is None) == (self.size_of is None):
            raise ValueError("give exactly one of bpw and size_of")
        return self

    @property
    def ftype(self) -> str:
        return self.type or self.size_of or "Q4_K_M"

    def variant_name(self) -> str:
        if self.name is not None:
            return f"merged-{self.name}"
        return f"merged-mix-{self.size_of}" if self.size_of is not None else f"merged-mix-{self.bpw:g}bpw"


class ImatrixConfig(_Strict):
    """The imatrix stage: llama-imatrix's statistics collected on the merged F16 (the fine-tune's
    own activations) over a calibration text, plain or chat JSONL."""

    text: str
    ctx: int = Field(512, gt=0, le=MAX_CTX)
    chunks: int | None = Field(None, gt=0, le=MAX_CHUNKS)  # None: the whole text
    process_output: bool = False


class QuantizeConfig(_Strict):
    types: list[str] = Field(default_factory=lambda: ["Q4_K_M", "Q5_K_M", "Q8_0"], min_length=1)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: dict[str, str] = Field(default_factory=dict)
    pure: bool = False
    leave_output_tensor: bool = False
    threads: int = Field(0, ge=0, le=MAX_THREADS)
    # With an `imatrix:` section: auto scores each type with and without it and prefers the better
    # (the default), always/never build one way only. Without the section only never is valid.
    imatrix: Literal["auto", "always", "never"] | None = None
    targets: list[TargetConfig] = Field(default_factory=list)
    # Chunks of the imatrix text (its ctx) on which each tensor's sensitivity is probed for the
    # targets (imatrix/sensitivity.py); 0: price the targets' types by the weighted error alone.
    sensitivity_chunks: int = Field(2, ge=0, le=MAX_CHUNKS)

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[TargetConfig]) -> list[TargetConfig]:
        names = [t.variant_name() for t in v]
        if len(set(names)) != len(names):
            raise ValueError("two targets would write the same variant; give them distinct names")
        return v

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        names = []
        for t in v:
            names.append(_type_name(file_type, t))
        if len(set(names)) != len(names):
            raise ValueError("a type is listed twice")
        return names

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _tt(cls, v: str | None) -> str | None:
        return None if v is None else _type_name(ggml_type, v)

    @field_validator("tensor_types")
    @classmethod
    def _tts(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: _type_name(ggml_type, t) for k, t in v.items()}


class Gates(_Strict):
    max_kld_mean: float | None = Field(None, ge=0)
    min_same_top: float | None = Field(None, ge=0, le=1)
    min_effect_retention: float | None = Field(None, ge=-1e6, le=1e6)


class CompareConfig(_Strict):
    text: str
    ctx: int = Field(256, gt=0, le=MAX_CTX)
    chunks: int = Field(16, gt=0, le=MAX_CHUNKS)
    runtime_lora: bool = True
    gates: Gates = Field(default_factory=Gates)
    kv_cache: Literal["f32", "f16"] = "f32"  # the engine's KV cache; f16 is llama-perplexity's default
    # numpy: loraq's own float32 pass (no dependency); llama.cpp: llama-cpp-python's kernels on any
    # accelerator it was built for (the extra loraq[llama-cpp]), for big models
    engine: Literal["numpy", "llama.cpp"] = "numpy"
    # More evaluation texts, name -> path (e.g. {generic: wiki.txt} beside a domain text): each is
    # scored like `text` and gets its own table; gates, deliver and the plot use `text`.
    also: dict[str, str] = Field(default_factory=dict, max_length=16)

    @field_validator("also")
    @classmethod
    def _also(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", name):
                raise ValueError(f"'{shown(name, 40)}': a text's name is 1-32 letters, digits, _ or - (it names a folder)")
        return v


class DeliverBest(_Strict):
    """Pick one variant from report.json: among the candidates within every bound set here, the
    smallest file (prefer: smallest) or the lowest mean KLD (prefer: lowest_kld)."""

    max_size_mib: float | None = Field(None, gt=0)  # report size_bytes / 2**20 (base + adapter for runtime)
    max_kld_mean: float | None = Field(None, ge=0)
    min_same_top: float | None = Field(None, ge=0, le=1)
    min_effect_retention: float | None = None
    kinds: list[Literal["merged", "runtime_lora"]] | None = None  # None: both (runtime only with compare.runtime_lora)
    prefer: Literal["smallest", "lowest_kld"] = "smallest"

    @model_validator(mode="after")
    def _bounded(self) -> DeliverBest:
        if all(x is None for x in (self.max_size_mib, self.max_kld_mean, self.min_same_top, self.min_effect_retention)):
            raise ValueError("set at least one bound (max_size_mib, max_kld_mean, min_same_top, min_effect_retention)")
        if self.kinds is not None and (not self.kinds or len(set(self.kinds)) != len(self.kinds)):
            raise ValueError("kinds: list merged and/or runtime_lora, each once")
        return self


class DeliverConfig(_Strict):
    """workdir/dist/ (docs/design.md, Deliver): the variants to ship, by name and/or by bounds."""

    files: list[str] = Field(default_factory=list)  # variant names: merged-<TYPE>, runtime-<TYPE>
    best: DeliverBest | None = None
    adapter: bool = False  # also ship the GGUF LoRA adapter(s) on their own

    @model_validator(mode="after")
    def _something(self) -> DeliverConfig:
        if not self.files and self.best is None and not self.adapter:
            raise ValueError("nothing to deliver: set files, best and/or adapter")
        if len(set(self.files)) != len(self.files):
            raise ValueError("files: a variant is listed twice")
        return self


@dataclass(frozen=True)
class MergedVariant:
    """One merged-then-quantized file the config builds: merged-<TYPE>[-imatrix] or merged-<target name>."""

    name: str
    type: str  # the ftype whose rules (and, for a fixed type, whose mix) apply
    imatrix: bool  # quantized with the run's importance matrix
    target: TargetConfig | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.gguf"


# ftypes whose quantizers ignore an importance matrix (ggml's quantize_q8_0 takes no weights): the
# imatrix variant would be the same bytes, so it is not built
IMATRIX_UNUSED = frozenset({"Q8_0", "F16", "BF16", "F32"})


def merged_variants(quantize: QuantizeConfig, mode: str) -> list[MergedVariant]:
    """Every merged variant, in build order. mode (Config.imatrix_mode): never: each type without
    the imatrix; always: with it; auto: both (a type that cannot go without one: with it only; a
    type that ignores it: without only).
    Targets follow the same mode: with auto, merged-mix-<T> and merged-mix-<T>-imatrix."""
    out = []
    for t in quantize.types:
        needs = t in NEEDS_IMATRIX_FTYPES
        if (mode != "always" or t in IMATRIX_UNUSED) and not needs:
            out.append(MergedVariant(f"merged-{t}", t, False))
        if mode != "never" and t not in IMATRIX_UNUSED:
            out.append(MergedVariant(f"merged-{t}-imatrix", t, True))
    for x in quantize.targets:
        if mode != "always":
            out.append(MergedVariant(x.variant_name(), x.ftype, False, x))
        if mode != "never":
            out.append(MergedVariant(x.variant_name() + "-imatrix", x.ftype, True, x))
    return out


def deliverable_variants(quantize: QuantizeConfig, compare: CompareConfig | None, mode: str = "never") -> list[str]:
    """The variant names a config builds that dist/ can ship (the base without adapter is not one)."""
    names = [v.name for v in merged_variants(quantize, mode)]
    if compare is not None and compare.runtime_lora:
        names += [f"runtime-{t}" for t in quantize.types]
    return names


class Config(_Strict):
    name: str
    workdir: str
    base: str  # a GGUF, or a Hugging Face model folder (converted by the `base` stage)
    base_outtype: Literal["f16", "bf16", "f32"] = "f16"  # the GGUF an HF folder base becomes
    # Every heavy stage's threads (merge's BLAS, quantize's workers, compare's BLAS); 0: the CPUs this
    # process may use (loraq.cpus). quantize.threads, when non-zero, wins for quantize.
    threads: int = Field(0, ge=0, le=MAX_THREADS)
    allow_requantized_base: bool = False
    adapters: list[AdapterConfig] = Field(min_length=1)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    imatrix: ImatrixConfig | None = None
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    compare: CompareConfig | None = None
    deliver: DeliverConfig | None = None  # optional; omit for no dist/

    @model_validator(mode="after")
    def _imatrix_mode(self) -> Config:
        q = self.quantize
        if self.imatrix is None and q.imatrix in ("auto", "always"):
            raise ValueError(f"quantize.imatrix: {q.imatrix} needs an imatrix section (imatrix: {{text: calibration.txt}})")
        needs = [t for t in q.types if t in NEEDS_IMATRIX_FTYPES]
        if needs and (self.imatrix is None or q.imatrix == "never"):
            raise ValueError(f"quantize.types: {', '.join(needs)} need an importance matrix; add an imatrix section")
        return self

    @property
    def imatrix_mode(self) -> str:
        """never | always | auto, the default resolved (auto with an imatrix section)."""
        return self.quantize.imatrix or ("auto" if self.imatrix is not None else "never")

    @field_validator("deliver")
    @classmethod
    def _deliver(cls, v: DeliverConfig | None, info: ValidationInfo) -> DeliverConfig | None:
        """Variant names and `best` checked against what this config builds (quantize and compare
        are validated before deliver; when either failed, its own error is reported instead)."""
        if v is None or "quantize" not in info.data or "compare" not in info.data:
            return v
        compare: CompareConfig | None = info.data["compare"]
        q: QuantizeConfig = info.data["quantize"]
        valid = deliverable_variants(q, compare, q.imatrix or ("auto" if info.data.get("imatrix") is not None else "never"))
        problems = []
        for name in v.files:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append(f"files: unknown variant '{name}'; {hint}this config builds: {', '.join(valid)}")
        if v.best is not None:
            if compare is None:
                problems.append("best: choosing by quality needs a compare section; add one, or list the variants in files")
            elif v.best.kinds is not None and "runtime_lora" in v.best.kinds and not compare.runtime_lora:
                problems.append("best.kinds: runtime_lora needs compare.runtime_lora: true")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    # Filled in by load_config: the folder relative paths resolve against.
    root: Path = Field(default=Path("."), exclude=True)

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return Path(os.path.normpath(q if q.is_absolute() else self.root / q))

    @property
    def workdir_path(self) -> Path:
        return self.resolve(self.workdir)


def _type_name(parse: Callable[[str], FileType | GGMLType], name: str) -> str:
    """The canonical type name; pydantic reports a ValueError at the key's location."""
    try:
        return parse(name).name
    except BadArguments as exc:
        raise ValueError(str(exc)) from None


def _fields(model: type[BaseModel]) -> list[str]:
    return [n for n in model.model_fields if n != "root"]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (for near-miss suggestions)."""
    m: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if m is None or isinstance(part, int):
            continue
        f = m.model_fields.get(part)
        if f is None:
            return None
        ann = f.annotation
        args = getattr(ann, "__args__", ()) or ()
        cands = [ann, *args, *(x for a in args for x in (getattr(a, "__args__", ()) or ()))]
        m = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return m


def _format(err: ErrorDetails) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(x) for x in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), _fields(owner), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(_fields(owner))}"
        return f"{where}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB
MAX_NODES = 100_000  # values in the loaded YAML, aliases counted each time they are used
MAX_DEPTH = 32
MAX_SHOWN = 10  # problems listed in the one-line message


def _read_yaml(path: Path) -> object:
    """The YAML document, refusing what could hang or exhaust loraq: a huge file, non-UTF-8 text,
    nesting too deep for the parser, and alias bombs (a few lines that expand to billions of values)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BadArguments(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; is this the right file?")
        raw = path.read_bytes()
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadArguments(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise BadArguments(f"{path}: not valid YAML{where}: {shown(why, 200)}") from None
    except RecursionError:
        raise BadArguments(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with thousands of digits
        raise BadArguments(f"{path}: not valid YAML: {str(exc).splitlines()[0][:120]}") from None
    _check_size(data, path)
    return data


def _check_size(data: object, path: Path) -> None:
    """At most MAX_NODES values (shared ones counted at each use) and MAX_DEPTH levels."""
    stack: list[tuple[object, int]] = [(data, 0)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise BadArguments(f"{path}: more than {MAX_NODES} values (an alias bomb?); a config is a few dozen settings")
        if depth > MAX_DEPTH:
            raise BadArguments(f"{path}: nested more than {MAX_DEPTH} levels deep; a config is a few levels deep")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for kv in v.items() for x in kv)
        elif isinstance(v, (list, tuple, set)):
            stack.extend((x, depth + 1) for x in v)


def load_config(path: Path | str) -> Config:
    """Parse and validate a config file; raise BadArguments listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise BadArguments(f"config not found: {path}")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise BadArguments(f"{path}: expected a mapping of settings at the top level")
    problems: list[str] = []
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = [shown(_format(e), 300) for e in exc.errors()]
        more = f" | … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise BadArguments(f"{path}: {len(problems)} problem(s): " + " | ".join(problems[:MAX_SHOWN]) + more) from None
    cfg.root = path.resolve().parent
    missing = []
    if not cfg.resolve(cfg.base).exists():
        missing.append(f"base: file not found: {cfg.base}")
    for i, a in enumerate(cfg.adapters):
        if not cfg.resolve(a.path).exists():
            missing.append(f"adapters.{i}.path: not found: {a.path}")
    if cfg.compare and not cfg.resolve(cfg.compare.text).exists():
        missing.append(f"compare.text: file not found: {cfg.compare.text}")
    for name, t in cfg.compare.also.items() if cfg.compare else ():
        if not cfg.resolve(t).exists():
            missing.append(f"compare.also.{name}: file not found: {t}")
    if cfg.imatrix and not cfg.resolve(cfg.imatrix.text).exists():
        missing.append(f"imatrix.text: file not found: {cfg.imatrix.text}")
    if missing:
        raise BadArguments(f"{path}: {len(missing)} problem(s): " + " | ".join(missing))
    return cfg
