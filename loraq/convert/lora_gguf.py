"""PEFT LoRA adapter -> llama.cpp GGUF LoRA adapter (what convert_lora_to_gguf.py does, done right).

Layout (docs/llama-cpp.md §1.4-1.6): for each adapted base tensor `X.weight` the file holds
`X.weight.lora_a` (ne [in, r]) and `X.weight.lora_b` (ne [r, out]); token_embd's lora_a is stored
transposed (ne [r, n_vocab]). For archs whose converter permutes q/k rows for RoPE (llama and its
relatives), B's rows get the same permutation as the base weight (n_head for q, n_head_kv for k);
A is untouched. KVs: general.architecture, general.type="adapter", adapter.type="lora",
adapter.lora.alpha (FLOAT32), general.quantization_version=2. Tensors follow the adapter file's
key order (lexicographic HF names), lora_a then lora_b.

Scale: llama.cpp applies `alpha/r_m` to every module m, with one stored alpha and r_m read from
lora_b (§3.2). PEFT applies `alpha_m/r_m`, or `alpha_m/sqrt(r_m)` with rsLoRA, where alpha_m
comes from alpha_pattern when a pattern matches. convert_lora_to_gguf.py writes lora_alpha and
stops there, so rsLoRA adapters come out mis-scaled by sqrt(r) and alpha_pattern is dropped.
loraq instead writes

    alpha_stored = lora_alpha * sqrt(r)   if use_rslora and every module has the same rank r
                   lora_alpha             otherwise

and, for every module whose PEFT scale still differs from llama.cpp's alpha_stored/r_m (rsLoRA
with mixed ranks, alpha_pattern entries), multiplies B by factor = peft_scale_m / (alpha_stored/r_m)
in float64 before casting to the output type. llama.cpp's runtime LoRA and export-lora then apply
exactly PEFT's delta, scale_m · B_m · A_m. Each kind of fold is reported in ConvertResult.notes.

Everything else a llama.cpp adapter cannot express (DoRA, modules_to_save, trainable tokens, biases,
an lm_head LoRA on a base with tied embeddings, a module with no base tensor, a width mismatch) is
refused with a one-line LoraqError before anything is written; where loraq's merge can apply it, the
message names the merged path (MERGE_HINT), and `runtime_refusal` says so without raising."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..atomic import check_not_input, check_regular
from ..errors import BadArguments, BadInput
from ..ggml_types import GGMLType, ggml_type
from ..gguf_io import GGUFFile, GGUFStreamWriter, KVList, open_gguf
from ..gguf_io.writer import OutTensor
from ..kernels import quantize
from .hf_base import hf_head_facts
from .peft import MERGE_HINT, LoraModule, PeftAdapter, load_peft_adapter

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
F16_MAX = 65504.0

# Architectures whose convert_hf_to_gguf.py model class permutes q_proj/k_proj rows
# (LlamaModel.undo_permute = True and the classes that inherit or copy it).
PERMUTE_QK = frozenset(
    {"llama", "arcee", "smollm3", "llama-embed", "granite", "granitemoe", "granitehybrid", "deci", "minicpm", "nanbeige", "llada"}
)
# Architectures known to store q/k rows in HF order (no permutation).
NO_PERMUTE_QK = frozenset(
    {"qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "llama4", "apertus", "phi3", "starcoder2", "olmo2", "stablelm"}
)


@dataclass
class ConvertResult:
    out: Path
    n_tensors: int
    alpha: float  # adapter.lora.alpha as written
    outtype: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Planned:
    module: LoraModule
    target: str  # the base tensor, e.g. blk.0.attn_q.weight
    heads: int | None  # permute B's rows with this many heads (q/k of permuting archs)
    factor: float  # multiply B by this (1.0: no fold)
    reasons: tuple[str, ...]  # why B was scaled: "rslora", "alpha_pattern"
    a: OutTensor
    b: OutTensor


def convert_adapter(adapter: Path | str, base: Path | str, out: Path | str, outtype: str = "f16") -> ConvertResult:
    """Convert a PEFT LoRA adapter folder into a llama.cpp GGUF LoRA for the GGUF model `base`.

    Args:
        adapter: folder with adapter_config.json and adapter_model.safetensors.
        base: the GGUF model the adapter was trained on (metadata and tensor shapes only).
        out: output path; written to a temporary name and renamed into place when complete.
        outtype: f32, f16, bf16 or q8_0 for lora_a/lora_b (q8_0 falls back to f16 for
            tensors whose row length is not a multiple of 32, as convert_lora_to_gguf.py does).

    Returns:
        ConvertResult with the output path, tensor count, the alpha written and notes on every
        scale fold, permutation and type fallback.

    Raises:
        BadArguments, BadInput, IOFailure (LoraqError subclasses) with one-line messages."""
    otype = outtype.lower() if isinstance(outtype, str) else outtype
    if otype not in OUTTYPES:
        raise BadArguments(f"unknown outtype {outtype!r}; expected one of: {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise BadArguments(f"output {out} is a folder; give a file name such as {out / 'adapter.gguf'}")
    check_regular(adapter, "adapter")  # a FIFO in the folder would block its reader
    check_not_input(out, {"base model": Path(base), "adapter": Path(adapter)})
    if Path(base).is_dir():
        raise BadArguments(f"base {base} is a folder; convert needs the base model as a GGUF file")
    peft = load_peft_adapter(adapter)
    with open_gguf(base) as g:
        alpha, plan = plan_modules(peft, g, ggml_type(otype))
        arch = g.arch
    notes = _notes(peft, plan, alpha, arch, otype)

    kvs = KVList()
    kvs.set("general.architecture", GGUFValueType.STRING, arch)
    kvs.set("general.type", GGUFValueType.STRING, "adapter")
    kvs.set("adapter.type", GGUFValueType.STRING, "lora")
    kvs.set("adapter.lora.alpha", GGUFValueType.FLOAT32, alpha)
    kvs.set("general.quantization_version", GGUFValueType.UINT32, 2)
    tensors = [t for p in plan for t in (p.a, p.b)]
    with GGUFStreamWriter(out, kvs, tensors) as w:
        for p in plan:
            m = p.module
            a = peft.read(m.key_a)
            if m.embedding:  # token_embd: lora_a is stored transposed, ne [r, n_vocab]
                a = a.T
            w.write(p.a.name, _encode(a, p.a, m.key_a))
            b = peft.read(m.key_b)
            if p.factor != 1.0:
                b = b.astype(np.float64) * p.factor
            if p.heads is not None:
                b = permute_rows(b, p.heads)
            w.write(p.b.name, _encode(b, p.b, m.key_b))
    return ConvertResult(out, len(tensors), alpha, otype, notes)


class TargetMap:
    """HF module names -> base GGUF tensors: gguf-py's name map for the base's architecture and
    block count, and the q/k row permutation its converter applied."""

    def __init__(self, g: GGUFFile):
        import gguf

        if g.get("general.type") == "adapter":
            raise BadArguments(f"base {g.path} is a LoRA adapter, not a model; pass the model the adapter was trained on")
        self.g = g
        arch = self.arch = g.arch
        if not arch:
            raise BadInput(f"{g.path} has no general.architecture; it is not a llama.cpp model file")
        arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
        if arch_enum is None:
            raise BadInput(f"{g.path}: architecture '{arch}' is unknown to gguf-py {_gguf_version()}; upgrade the gguf package")
        n_blocks = self.n_blocks = g.arch_int("block_count")
        if n_blocks is None:
            raise BadInput(f"{g.path} has no {arch}.block_count; it is not a complete llama.cpp model file")
        self.tmap = gguf.get_tensor_name_map(arch_enum, n_blocks)
        self.n_head = g.arch_int("attention.head_count")
        self.n_head_kv = g.arch_int("attention.head_count_kv", self.n_head)
        self.tied = not g.has_tensor("output.weight") and g.has_tensor("token_embd.weight")

    def target(self, name: str, key: str, merge: bool = False) -> tuple[str, tuple[int, ...]]:
        """(base tensor name, its ne) for HF module `name` (adapter tensor `key`, for messages).
        With merge=True, lm_head on a tied base maps to an output.weight the merge will write."""
        g = self.g
        gname = self.tmap.get_name(name)
        if gname is None:
            raise BadInput(
                f"adapter tensor `{key}`: module `{name}` has no counterpart in a {self.arch} model with {self.n_blocks} "
                f"blocks; was the adapter trained on another model? (base: {g.path.name})"
            )
        target = f"{gname}.weight"
        if not g.has_tensor(target):
            if gname == "output" and self.tied:
                if merge:
                    return target, tuple(g.tensor("token_embd.weight").ne)
                raise BadInput(
                    f"adapter tensor `{key}` adapts lm_head, but base {g.path.name} ties it to the token embeddings "
                    f"(no output.weight), so llama.cpp would drop it: {MERGE_HINT}, or train without lm_head"
                )
            raise BadInput(
                f"adapter tensor `{key}` maps to `{target}`, which base {g.path.name} does not have; "
                "was the adapter trained on another model?"
            )
        return target, tuple(g.tensor(target).ne)

    def heads(self, target: str, rows: int, key: str) -> int | None:
        """The head count to permute `target`'s rows with (q/k of a permuting arch), else None."""
        if not target.endswith((".attn_q.weight", ".attn_k.weight")):
            return None
        h = self.n_head if target.endswith(".attn_q.weight") else self.n_head_kv
        if self.arch in PERMUTE_QK:
            if not h or rows % (2 * h):
                raise BadInput(f"{self.g.path.name}: cannot apply {self.arch}'s q/k row permutation to `{key}` ({rows} rows, {h} heads)")
            return h
        if self.arch not in NO_PERMUTE_QK:
            raise BadInput(
                f"adapter tensor `{key}` adapts q/k of a {self.arch} model, and loraq does not know whether {self.arch} "
                f"stores q/k rows permuted for RoPE; supported: {', '.join(sorted(PERMUTE_QK | NO_PERMUTE_QK))}"
            )
        return None


def plan_modules(peft: PeftAdapter, g: GGUFFile, otype: GGMLType, merge: bool = False) -> tuple[float, list[Planned]]:
    """Map, check and scale every module against the base, before anything is written."""
    tm = TargetMap(g)
    ranks = {m.rank for m in peft.modules}
    if peft.use_rslora and len(ranks) == 1:
        alpha = peft.lora_alpha * math.sqrt(next(iter(ranks)))
    else:
        alpha = peft.lora_alpha
    alpha = float(np.float32(alpha))  # what llama.cpp reads back (FLOAT32)

    plan: list[Planned] = []
    for m in peft.modules:
        key = m.key_a
        target, ne = tm.target(m.name, key, merge)
        if len(ne) != 2:
            raise BadInput(f"adapter tensor `{key}` targets `{target}` with ne {list(ne)}; loraq converts LoRA on 2-D weights only")
        is_embd = target == "token_embd.weight"
        if m.embedding != is_embd:
            kind = "an Embedding LoRA (lora_embedding_A/B)" if m.embedding else "a Linear LoRA"
            raise BadInput(f"adapter tensor `{key}` is {kind} but maps to `{target}`; llama.cpp cannot apply it there")
        r, (ra, wa), (wb, _rb) = m.rank, m.shape_a, m.shape_b
        # expected (in, out) of A/B against the base ne: linear W has ne [in, out];
        # token_embd has ne [n_embd, n_vocab], with A (r, n_vocab) and B (n_embd, r)
        want_a, want_b = (ne[1], ne[0]) if is_embd else (ne[0], ne[1])
        if wa != want_a or wb != want_b:
            raise BadInput(
                f"adapter tensor `{key}` {list(m.shape_a)} / `{m.key_b}` {list(m.shape_b)} do not fit base tensor "
                f"`{target}` (ne {list(ne)}, needs A (r, {want_a}) and B ({want_b}, r)); "
                f"the adapter was trained on a model of another width, check --base"
            )
        heads = tm.heads(target, wb, m.key_b)
        llama_scale = alpha / r if alpha != 0 else 1.0  # docs/llama-cpp.md §3.2, alpha 0 means no 1/r
        factor = m.scale / llama_scale
        reasons: list[str] = []
        if abs(factor - 1.0) <= 1e-6:  # float32 rounding of alpha only, below B's own precision
            factor = 1.0
        else:
            if peft.use_rslora:
                reasons.append("rslora")
            if m.alpha != peft.lora_alpha:
                reasons.append("alpha_pattern")
            if not reasons:
                reasons.append("alpha")
        ta = otype if _fits(otype, ra if is_embd else wa) else ggml_type("f16")
        tb = otype if _fits(otype, r) else ggml_type("f16")
        a_ne = (r, wa) if is_embd else (wa, r)  # token_embd lora_a is transposed: ne [r, n_vocab]
        plan.append(
            Planned(
                m,
                target,
                heads,
                factor,
                tuple(reasons),
                OutTensor(f"{target}.lora_a", a_ne, ta, 2),
                OutTensor(f"{target}.lora_b", (r, wb), tb, 2),
            )
        )
    return alpha, plan


def _fits(t: GGMLType, row_len: int) -> bool:
    return row_len % t.block == 0


def permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute on B's rows: (n_head, 2, rows/(2·n_head), r) with
    axes 1 and 2 swapped. Permuting B's rows permutes the rows of B·A, matching the base weight."""
    rows = b.shape[0]
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _encode(x: np.ndarray, t: OutTensor, key: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below, without a warning line
        rows = np.ascontiguousarray(x.reshape(-1, t.ne[0]), dtype=np.float32)
    if not np.isfinite(rows).all():
        raise BadInput(f"adapter tensor `{key}` has values beyond float32's range (after PEFT's scale); the adapter is corrupt or diverged")
    if t.type.name == "f16":
        peak = float(np.abs(rows).max(initial=0.0))
        if peak > F16_MAX:
            raise BadInput(f"adapter tensor `{key}` reaches {peak:.4g}, beyond f16's range; use --outtype f32 or bf16")
    return quantize(rows, t.type)


def _notes(peft: PeftAdapter, plan: list[Planned], alpha: float, arch: str, otype: str) -> list[str]:
    notes: list[str] = []
    ranks = sorted({p.module.rank for p in plan})
    if peft.use_rslora and len(ranks) == 1:
        notes.append(
            f"rsLoRA scale folded into adapter.lora.alpha = lora_alpha·√r = {alpha:g}, so llama.cpp's alpha/r "
            f"equals PEFT's alpha/√r (convert_lora_to_gguf.py would write {peft.lora_alpha:g} and mis-scale by √{ranks[0]})"
        )
    n_rs = sum("rslora" in p.reasons for p in plan)
    if n_rs:
        notes.append(f"rsLoRA with mixed ranks ({', '.join(map(str, ranks))}): PEFT's alpha/√r folded into lora_b of {n_rs} modules")
    n_ap = sum("alpha_pattern" in p.reasons for p in plan)
    if n_ap:
        notes.append(f"alpha_pattern: per-module alpha folded into lora_b of {n_ap} modules (a GGUF LoRA stores one alpha)")
    n_other = sum(p.reasons == ("alpha",) for p in plan)
    if n_other:
        notes.append(f"PEFT's scale folded into lora_b of {n_other} modules (llama.cpp ignores 1/r when alpha is 0)")
    n_perm = sum(p.heads is not None for p in plan)
    if n_perm:
        notes.append(f"q/k lora_b rows permuted for {arch}'s RoPE layout in {n_perm} modules")
    fell = [t for p in plan for t in (p.a, p.b) if t.type.name != otype]
    if fell:
        notes.append(
            f"{otype}: {len(fell)} tensors whose row length is not a multiple of 32 written as f16 "
            f"(e.g. {fell[0].name}, row length {fell[0].ne[0]})"
        )
    if peft.skipped:
        notes.append(f"{len(peft.skipped)} base_layer weights in the adapter ignored (e.g. {peft.skipped[0]})")
    return notes


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "(unknown version)"


def runtime_refusal(adapter: Path | str, base: Path | str) -> str | None:
    """Why llama.cpp cannot run PEFT folder `adapter` as a runtime LoRA although loraq's merge can
    apply it (DoRA, modules_to_save, trainable tokens, an lm_head LoRA on a tied base), or None.
    A folder or base that cannot be read at all gives None: the stage that reads it reports that."""
    from ..errors import LoraqError

    try:
        peft = load_peft_adapter(adapter, merge=True)
        why = peft.merge_only
        tied_head = "an lm_head LoRA on a base whose output is tied to its embeddings"
        if Path(base).is_file():
            with open_gguf(base) as g:
                tm = TargetMap(g)
                if tm.tied and any(tm.tmap.get_name(m.name) == "output" for m in peft.modules):
                    why.append(tied_head)
        elif Path(base).is_dir():  # an HF folder not converted yet: tied when it has no lm_head tensor (nor will its GGUF)
            tied, _ = hf_head_facts(Path(base))
            if tied and any(m.name.split(".")[-1] == "lm_head" for m in peft.modules):
                why.append(tied_head)
    except LoraqError:
        return None
    return "; ".join(why) or None


def vocab_grows(adapter: Path | str, base: Path | str) -> bool:
    """Whether PEFT folder `adapter` gives embed_tokens/lm_head more rows than GGUF `base` has tokens
    (a resized vocabulary): the merged model's logits then have more entries than the base's.
    Unreadable inputs give False: the stage that reads them reports that."""
    from ..errors import LoraqError

    try:
        peft = load_peft_adapter(adapter, merge=True)
        if Path(base).is_dir():  # an HF folder not converted yet: its embed_tokens rows, from the headers
            _, n_vocab = hf_head_facts(Path(base))
            if n_vocab is None:
                return False
            n_base = n_vocab
        else:
            with open_gguf(base) as g:
                if not g.has_tensor("token_embd.weight"):
                    return False
                n_base = g.tensor("token_embd.weight").ne[1]
        parts = peft.parts
        rows = [peft._file.shape(k)[0] for k in parts.full.values()] if peft._file else []
        rows += [max(ids, default=-1) + 1 for ids, _ in parts.tokens.values()]
        return max(rows, default=0) > n_base
    except (LoraqError, OSError):
        return False
