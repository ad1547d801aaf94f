"""Merge LoRA adapters into a base model, tensor by tensor.

The merged value is computed in float64 (W + Σ sᵢ·Bᵢ·Aᵢ, sᵢ = userᵢ·αᵢ/rᵢ applied after the
product, adapters in the given order) and rounded once to the output type with round-to-nearest-
even. llama-export-lora does the same sum in float32 with ggml's matmul order, so it differs from
the exactly rounded value by one F16 ulp on a few elements per million (docs/llama-cpp.md §2.3).

A PEFT folder is read directly (lora_file.read_peft_for_merge) with PEFT's exact per-module scale,
and with what a GGUF LoRA cannot hold: DoRA magnitudes, modules_to_save tensors, trainable token
rows, a vocabulary grown past the base's (vocab.py), and a head untied from tied embeddings (_Shape).

base_precision="nf4_roundtrip" (QLoRA): the linear weights the adapter was trained against were
bitsandbytes NF4 (blocksize 64, double-quantized absmax), so each is first replaced by its NF4
quantize -> dequantize (nf4.py), in bfloat16 as QLoRA loads the model, and the adapters are merged
into that. bitsandbytes' Linear4bit replaces every nn.Linear except the skipped modules (transformers
keeps lm_head, and the embeddings are not Linear): in GGUF terms every 2-D `blk.*.weight`, not
token_embd, output or the norms. The roundtrip runs in the HF layout (q/k rows of permuting
architectures un-permuted first), since the 256-block grouping of the absmax depends on row order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..atomic import check_not_input, check_regular
from ..errors import BadArguments, BadInput
from ..ggml_types import FTYPES, GGMLType, ggml_type
from ..gguf_io import GGUFFile, KVList, TensorInfo, open_gguf
from ..gguf_io.writer import GGUFStreamWriter, OutTensor
from ..kernels import read_f32
from ..kernels.fp import f64_to_bf16, f64_to_f16, f64_to_f32
from .lora_file import VOCAB_TENSORS, LoraAdapter, load_adapter
from .nf4 import nf4_roundtrip
from .vocab import grown_vocab_kvs

_OUT = {"f16": ("F16", f64_to_f16), "bf16": ("BF16", f64_to_bf16), "f32": ("F32", f64_to_f32)}
BASE_PRECISIONS = ("original", "nf4_roundtrip")
NF4_DTYPE = "bf16"  # the dtype QLoRA recipes load the base in (torch_dtype=torch.bfloat16) before quantizing


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    scale: float = 1.0


@dataclass
class MergeResult:
    out: Path
    merged: list[str] = field(default_factory=list)  # base tensors that received a delta
    warnings: list[str] = field(default_factory=list)
    nf4: list[str] = field(default_factory=list)  # base tensors passed through the NF4 roundtrip


def merge_model(
    base: Path | str,
    adapters: list[AdapterSpec],
    out: Path | str,
    outtype: str = "f16",
    allow_requantize: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    base_precision: str = "original",
) -> MergeResult:
    if base_precision not in BASE_PRECISIONS:
        raise BadArguments(f"base precision must be one of {', '.join(BASE_PRECISIONS)} (got '{base_precision}')")
    if outtype not in _OUT:
        raise BadArguments(f"--outtype must be one of f16, bf16, f32 (got '{outtype}')")
    if not adapters:
        raise BadArguments("give at least one adapter with --lora or --lora-scaled")
    ftype_name, round_to = _OUT[outtype]
    out_type = ggml_type(outtype)
    out = Path(out)
    inputs = [("base model", Path(base)), *(("adapter", Path(a.path)) for a in adapters)]
    for label, p in inputs:
        check_regular(p, label)  # a FIFO in a PEFT folder would block its reader
    check_not_input(out, inputs)
    result = MergeResult(out)
    with open_gguf(base) as src:
        if src.get("general.type") == "adapter":
            raise BadArguments(f"{src.path} is a LoRA adapter, not a base model")
        if src.get("split.count") is not None:
            raise BadArguments(f"{src.path} is a split model; merge the shards with llama-gguf-split first")
        quantized = [t.name for t in src.tensors if t.type.quantized and t.n_dims >= 2]
        if quantized and not allow_requantize:
            raise BadArguments(
                f"the base is quantized ({src.tensor(quantized[0]).type.name}); merge into an F16/BF16/F32 base, "
                "or pass --allow-requantize to dequantize it (the result will be quantized twice)"
            )
        if quantized:
            result.warnings.append(
                f"the base is quantized: {len(quantized)} tensors were dequantized, so quantizing the merge quantizes them twice"
            )
        loras: list[tuple[LoraAdapter, float]] = [(load_adapter(a.path, src, merge=True), a.scale) for a in adapters]
        for lora, _ in loras:
            for name in lora.pairs:
                if name in lora.magnitudes or not src.has_tensor(name):
                    continue  # DoRA and an untied head are checked against their target below
                if src.tensor(name).n_dims != 2:
                    raise BadInput(f"{lora.path}: LoRA on {name} is not supported (it is not a 2-D matrix)")
        shape = _Shape(src, loras)
        result.warnings += shape.notes

        def target(t: TensorInfo) -> GGMLType:
            # Matrices go to the output type; vectors (norms) keep theirs, as llama.cpp keeps F32 norms.
            return out_type if t.n_dims >= 2 else t.type

        sources = [(t, t.name) for t in src.tensors]
        if shape.untie:  # the head gets its own tensor, starting from the tied embeddings
            sources.append((src.tensor("token_embd.weight"), "output.weight"))
        tensors = [OutTensor(name, shape.ne(name, t.ne), target(t)) for t, name in sources]
        nf4 = {t.name for t in src.tensors if _qlora_quantized(t)} if base_precision == "nf4_roundtrip" else set()
        if base_precision == "nf4_roundtrip" and not nf4:
            raise BadArguments(f"{src.path} has no 2-D blk.* weights: there is nothing a QLoRA would have quantized to NF4")
        kvs = KVList((k, shape.kvs.get(k, kv.raw)) for k, kv in src.kvs.items())
        kvs.set("general.file_type", GGUFValueType.UINT32, FTYPES[ftype_name].id)
        with GGUFStreamWriter(out, kvs, tensors) as w:
            for (t, name), ot in zip(sources, tensors):
                hits = [(lora, s) for lora, s in loras if lora.touches(name, shape.untie)]
                if not hits and ot.type == t.type and ot.ne == t.ne and name not in nf4:
                    w.write(name, src.read_raw(t))
                else:
                    w0 = read_f32(src, t)
                    if name in nf4:
                        w0 = _nf4(src, name, w0)
                        result.nf4.append(name)
                    x = _apply(name, w0.astype(np.float64), hits, shape)
                    bits = round_to(x)
                    if not np.isfinite(_back(bits, out_type)).all():
                        raise BadInput(
                            f"merging {name} gives values outside the range of {outtype}; lower the adapter scale or use --outtype f32"
                        )
                    w.write(name, bits)
                    if hits:
                        result.merged.append(name)
                if on_tensor:
                    on_tensor(name)
    return result


def _qlora_quantized(t: TensorInfo) -> bool:
    """Whether a QLoRA base held this tensor as NF4: the transformer blocks' linear weights."""
    return t.name.startswith("blk.") and t.name.endswith(".weight") and t.n_dims == 2 and not t.name.endswith("_norm.weight")


def _nf4(src: GGUFFile, name: str, w: np.ndarray) -> np.ndarray:
    """The NF4 roundtrip of base tensor `name` in its HF row order (q/k of permuting archs un-permuted)."""
    from ..convert.lora_gguf import PERMUTE_QK

    heads = None
    if src.arch in PERMUTE_QK and name.endswith((".attn_q.weight", ".attn_k.weight")):
        n_head = src.arch_int("attention.head_count")
        heads = n_head if name.endswith(".attn_q.weight") else src.arch_int("attention.head_count_kv", n_head)
        if not heads or w.shape[0] % (2 * heads):
            raise BadInput(f"{src.path.name}: cannot undo {src.arch}'s q/k row permutation of {name} ({w.shape[0]} rows, {heads} heads)")
    if heads is None:
        return nf4_roundtrip(w, NF4_DTYPE)
    rows = w.shape[0]
    hf = w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    back = nf4_roundtrip(hf, NF4_DTYPE)
    return back.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Shape:
    """What the adapters do to the file's layout: a vocabulary grown past the base's (token_embd,
    output and the token list), and an output.weight written for a base that ties it to token_embd
    when an adapter changes the head but not the embeddings, or the embeddings but not the head
    (PEFT's forward keeps them apart; its merge_and_unload writes through the shared tensor)."""

    def __init__(self, src: GGUFFile, loras: list[tuple[LoraAdapter, float]]):
        self.notes: list[str] = []
        self.n_base = src.tensor("token_embd.weight").ne[1] if src.has_tensor("token_embd.weight") else 0
        self.n_vocab = self.n_base
        for lora, _ in loras:
            for name in VOCAB_TENSORS:
                if name in lora.full:
                    self.n_vocab = max(self.n_vocab, lora.full[name].shape[0])
                if name in lora.rows:
                    self.n_vocab = max(self.n_vocab, int(lora.rows[name][0].max(initial=-1)) + 1)
        if self.n_vocab > self.n_base:  # before allocating the grown tensors: every new row must come from the files
            supplied = max(_new_rows(lora, self.n_base) for lora, _ in loras)
            if self.n_vocab - self.n_base > supplied:
                raise BadInput(
                    f"an adapter uses token id {self.n_vocab - 1}, but the adapters give values for only {supplied} of the "
                    f"{self.n_vocab - self.n_base} rows past the base's {self.n_base} tokens; is the adapter for this model?"
                )
        for lora, s in loras:
            if s != 1.0 and (lora.full or lora.rows):
                self.notes.append(
                    f"{lora.path}: scale {s:g} applies to its LoRA only; modules_to_save and trainable token rows replace whole"
                )
        self.tied = not src.has_tensor("output.weight") and src.has_tensor("token_embd.weight")
        self.untie = self.tied and any(lora.tied_output for lora, _ in loras)
        for lora, _ in loras:
            if "output.weight" in lora.pairs | lora.full | lora.rows and not (self.untie or src.has_tensor("output.weight")):
                raise BadInput(f"{lora.path} changes output.weight, which the base does not have")  # TargetMap prevents it
        if self.untie:
            self.notes.append(
                "the base ties output to token_embd; an adapter changes one of them only, so output.weight is written (untied)"
            )
        self.kvs: dict[str, bytes] = {}
        if self.n_vocab > self.n_base:
            folder = next((lo.tokenizer_dir for lo, _ in loras if _rows(lo) == self.n_vocab), None)
            self.kvs = grown_vocab_kvs(src, self.n_vocab, folder)
            self.notes.append(f"vocabulary grown from {self.n_base} to {self.n_vocab} tokens (token list from {folder})")

    def ne(self, name: str, ne: tuple[int, ...]) -> tuple[int, ...]:
        return (ne[0], self.n_vocab, *ne[2:]) if name in VOCAB_TENSORS and self.n_vocab != self.n_base else ne


def _new_rows(lora: LoraAdapter, n_base: int) -> int:
    """How many rows past the base's vocabulary this adapter supplies for one vocabulary tensor (the most)."""
    ns = [lora.full[n].shape[0] - n_base for n in VOCAB_TENSORS if n in lora.full]
    ns += [int((lora.rows[n][0] >= n_base).sum()) for n in VOCAB_TENSORS if n in lora.rows]
    return max(ns, default=0)


def _rows(lora: LoraAdapter) -> int:
    ns = [lora.full[n].shape[0] for n in VOCAB_TENSORS if n in lora.full]
    ns += [int(lora.rows[n][0].max(initial=-1)) + 1 for n in VOCAB_TENSORS if n in lora.rows]
    return max(ns, default=0)


def _apply(name: str, w0: np.ndarray, hits: list[tuple[LoraAdapter, float]], shape: _Shape) -> np.ndarray:
    """The merged tensor in float64: each adapter in order replaces it (modules_to_save), patches
    rows (trainable tokens), and adds s·B·A, DoRA-normalised where it has magnitudes.

    DoRA as PEFT's merge computes it: W' = m / ‖W₀ + s·B·A‖ · (W + s·B·A), the norm over each
    output feature (a Linear weight's row; an Embedding's column, over the vocabulary) of the
    base weight W₀ with this adapter's delta alone, while W holds the adapters merged before it.
    PEFT's fan_in_fan_out (Conv1D weights stored (in, out)) changes only its own storage: its norm is
    still per output feature, which is a row of the GGUF weight (numpy (out, in)) either way. PEFT
    adds no epsilon to the norm and computes in the model's dtype; here it is float64."""
    x = w0
    if x.shape[0] < shape.n_vocab and name in VOCAB_TENSORS:  # rows the adapters must supply
        x = np.concatenate([x, np.full((shape.n_vocab - x.shape[0], x.shape[1]), np.nan)])
    for lora, s in hits:
        rows = lora.rows.get(name)
        if name == "output.weight" and shape.untie and rows is None:
            rows = lora.rows.get("token_embd.weight")  # trainable tokens of a tied model patch the head too
        if name in lora.full:
            full = lora.full[name].astype(np.float64)
            x = np.concatenate([full, x[full.shape[0] :]]) if full.shape[0] < x.shape[0] else full
        if rows is not None:
            x = x.copy()
            x[rows[0]] = rows[1]
        if name in lora.pairs:
            d = lora.scale(name, s) * lora.delta(name)
            if d.shape != w0.shape:
                raise BadInput(f"{lora.path}: LoRA on {name} has shape {list(d.shape)}, the base tensor {list(w0.shape)}")
            mag = lora.magnitudes.get(name)
            if mag is None:
                x = x + d
            else:
                axis = 0 if name == "token_embd.weight" else 1
                norm = np.linalg.norm(w0 + d, axis=axis, keepdims=True)
                x = (mag.reshape(norm.shape) / norm) * (x + d)
    missing = ~np.isfinite(x).all(axis=1)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise BadInput(
            f"the vocabulary grows to {shape.n_vocab} tokens, but no adapter gives {name} row {first} "
            f"({int(missing.sum())} rows missing); save {'lm_head' if name == 'output.weight' else 'embed_tokens'} "
            "with the adapter (modules_to_save) or train the new tokens (trainable_token_indices)"
        )
    return x


def _back(bits: np.ndarray, t: GGMLType) -> np.ndarray:
    if t.name == "f16":
        return bits.view(np.float16)
    if t.name == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float32)
