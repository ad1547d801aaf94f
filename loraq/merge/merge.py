"""Merge LoRA adapters into a base model, tensor by tensor.

The merged value is computed in float64 (W + Σ sᵢ·Bᵢ·Aᵢ, sᵢ = userᵢ·αᵢ/rᵢ applied after the
product, adapters in the given order) and rounded once to the output type with round-to-nearest-
even. llama-export-lora does the same sum in float32 with ggml's matmul order, so it differs from
the exactly rounded value by one F16 ulp on a few elements per million (docs/llama-cpp.md §2.3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..atomic import check_not_input, check_regular
from ..errors import BadArguments, BadInput
from ..ggml_types import FTYPES, GGMLType, ggml_type
from ..gguf_io import KVList, TensorInfo, open_gguf
from ..gguf_io.writer import GGUFStreamWriter, OutTensor
from ..kernels import read_f32
from ..kernels.fp import f64_to_bf16, f64_to_f16, f64_to_f32
from .lora_file import LoraAdapter, load_adapter

_OUT = {"f16": ("F16", f64_to_f16), "bf16": ("BF16", f64_to_bf16), "f32": ("F32", f64_to_f32)}


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    scale: float = 1.0


@dataclass
class MergeResult:
    out: Path
    merged: list[str] = field(default_factory=list)  # base tensors that received a delta
    warnings: list[str] = field(default_factory=list)


def merge_model(
    base: Path | str,
    adapters: list[AdapterSpec],
    out: Path | str,
    outtype: str = "f16",
    allow_requantize: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeResult:
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
        loras: list[tuple[LoraAdapter, float]] = [(load_adapter(a.path, src), a.scale) for a in adapters]
        for lora, _ in loras:
            for name in lora.pairs:
                if src.tensor(name).n_dims != 2:
                    raise BadInput(f"{lora.path}: LoRA on {name} is not supported (it is not a 2-D matrix)")

        def target(t: TensorInfo) -> GGMLType:
            # Matrices go to the output type; vectors (norms) keep theirs, as llama.cpp keeps F32 norms.
            return out_type if t.n_dims >= 2 else t.type

        tensors = [OutTensor(t.name, t.ne, target(t)) for t in src.tensors]
        kvs = KVList((k, kv.raw) for k, kv in src.kvs.items())
        kvs.set("general.file_type", GGUFValueType.UINT32, FTYPES[ftype_name].id)
        with GGUFStreamWriter(out, kvs, tensors) as w:
            for t, ot in zip(src.tensors, tensors):
                hits = [(lora, s) for lora, s in loras if t.name in lora.pairs]
                if not hits and ot.type == t.type:
                    w.write(t.name, src.read_raw(t))
                else:
                    x = read_f32(src, t).astype(np.float64)
                    for lora, s in hits:
                        x += lora.scale(t.name, s) * lora.delta(t.name)
                    bits = round_to(x)
                    if not np.isfinite(_back(bits, out_type)).all():
                        raise BadInput(
                            f"merging {t.name} gives values outside the range of {outtype}; lower the adapter scale or use --outtype f32"
                        )
                    w.write(t.name, bits)
                    if hits:
                        result.merged.append(t.name)
                if on_tensor:
                    on_tensor(t.name)
    return result


def _back(bits: np.ndarray, t: GGMLType) -> np.ndarray:
    if t.name == "f16":
        return bits.view(np.float16)
    if t.name == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float32)
