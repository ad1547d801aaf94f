"""Write a PEFT-format LoRA adapter for a llama-arch GGUF base, for demos and tests.

    python -m scripts.make_demo_adapter BASE.gguf OUTDIR [--rank 16] [--seed 0] [--rslora]
        [--alpha 32] [--dtype float32|float16|bfloat16] [--targets q_proj,k_proj,...] [--layers 0,1]

The adapter looks exactly like PEFT's save_pretrained output: adapter_config.json with the keys
and value types a PEFT LoraConfig writes (sorted, indent 2) and adapter_model.safetensors with
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`-style names and metadata
{"format": "pt"}. A and B are random (B non-zero), scaled so that ‖scale·B@A‖_F is 2–4% of ‖W‖_F
for each module, W read from the base GGUF. The base stores q/k rows permuted for RoPE while the
adapter is in HF orientation; B@A is random, so for a demo that does not matter.

Importable (`from scripts import make_demo_adapter`): `make_adapter(base, outdir, ...)` builds
variants for tests (rsLoRA, alpha_pattern, rank_pattern, bf16, extra tensors such as DoRA
magnitude vectors, config overrides)."""

from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from loraq.gguf_io import open_gguf
from loraq.kernels import read_f32

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# HF module (per layer, or global) -> GGUF base tensor
_LAYER = {
    "q_proj": ("self_attn", "attn_q"),
    "k_proj": ("self_attn", "attn_k"),
    "v_proj": ("self_attn", "attn_v"),
    "o_proj": ("self_attn", "attn_output"),
    "gate_proj": ("mlp", "ffn_gate"),
    "up_proj": ("mlp", "ffn_up"),
    "down_proj": ("mlp", "ffn_down"),
}


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def peft_config(
    *,
    rank: int,
    alpha: float,
    targets: list[str],
    rslora: bool,
    base_name: str,
    alpha_pattern: dict[str, Any] | None = None,
    rank_pattern: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """adapter_config.json as PEFT (0.15) writes it for a LoraConfig after save_pretrained."""
    return {
        "alpha_pattern": dict(alpha_pattern or {}),
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "bias": "none",
        "corda_config": None,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": dict(rank_pattern or {}),
        "revision": None,
        "runtime_config": {"ephemeral_gpu_offload": False},
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": rslora,
    }


def make_adapter(
    base: Path | str,
    outdir: Path | str,
    rank: int = 16,
    seed: int = 0,
    rslora: bool = False,
    alpha: float = 32,
    alpha_pattern: dict[str, Any] | None = None,
    rank_pattern: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    dtype: str = "float32",
    layers: list[int] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `outdir`; return `outdir`.

    targets: projection names (default all seven), plus optionally "embed_tokens" (an Embedding
    LoRA, lora_embedding_A/B) and "lm_head" (against output.weight, or token_embd when tied).
    layers: which layers get LoRA (default all). dtype: float32, float16 or bfloat16.
    extra_tensors: full safetensors names -> arrays added as they are (e.g. DoRA vectors).
    config_overrides: keys replaced in adapter_config.json after it is built."""
    targets = list(targets or PROJECTIONS)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    with open_gguf(base) as g:
        n_layers = int(g.arch_int("block_count"))
        for hf, gname, emb in _modules(g, targets, layers if layers is not None else range(n_layers)):
            w = g.tensor(gname)
            ww = read_f32(g, w).astype(np.float64)
            w_norm = float(np.sqrt(np.sum(ww * ww)))
            del ww
            # W has ne [in, out]; an embedding has ne [n_embd, n_vocab] and delta (B@A)^T
            n_in, n_out = (w.ne[1], w.ne[0]) if emb else (w.ne[0], w.ne[1])
            r = int(rank_pattern[k]) if rank_pattern and (k := _pattern_key(rank_pattern, hf)) else rank
            a_m = float(alpha_pattern[k]) if alpha_pattern and (k := _pattern_key(alpha_pattern, hf)) else float(alpha)
            scale = a_m / np.sqrt(r) if rslora else a_m / r
            a = rng.standard_normal((r, n_in)) / np.sqrt(n_in)
            b = rng.standard_normal((n_out, r))
            # ‖B@A‖_F² = sum((BᵀB) ∘ (AAᵀ)): exact, without forming the out×in product
            ba_norm = float(np.sqrt(np.sum((b.T @ b) * (a @ a.T))))
            b *= rng.uniform(0.02, 0.04) * w_norm / (scale * ba_norm)
            suffix = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            tensors[f"base_model.model.{hf}.{suffix[0]}"] = a.astype(np.float32)
            tensors[f"base_model.model.{hf}.{suffix[1]}"] = b.astype(np.float32)
    for k, v in (extra_tensors or {}).items():
        tensors[k] = np.asarray(v, dtype=np.float32)
    config = peft_config(
        rank=rank,
        alpha=alpha,
        targets=targets,
        rslora=rslora,
        # The base's file name, not its path: the same inputs give the same bytes in any folder.
        base_name=Path(base).name,
        alpha_pattern=alpha_pattern,
        rank_pattern=rank_pattern,
    )
    config.update(config_overrides or {})
    (outdir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _save_safetensors(outdir / "adapter_model.safetensors", tensors, dtype)
    return outdir


def _modules(g, targets: list[str], layers) -> list[tuple[str, str, bool]]:
    """(HF module name, GGUF base tensor, is_embedding) in the order PEFT would visit them."""
    unknown = [t for t in targets if t not in _LAYER and t not in ("embed_tokens", "lm_head")]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; choose from {list(_LAYER)} + embed_tokens, lm_head")
    out: list[tuple[str, str, bool]] = []
    if "embed_tokens" in targets:
        out.append(("model.embed_tokens", "token_embd.weight", True))
    for i in layers:
        for t in targets:
            if t in _LAYER:
                block, gname = _LAYER[t]
                out.append((f"model.layers.{i}.{block}.{t}", f"blk.{i}.{gname}.weight", False))
    if "lm_head" in targets:
        out.append(("lm_head", "output.weight" if g.has_tensor("output.weight") else "token_embd.weight", False))
    return out


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    if dtype in ("float32", "float16"):
        from safetensors.numpy import save_file

        save_file({k: v.astype(dtype) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        return
    if dtype != "bfloat16":
        raise SystemExit(f"unknown dtype {dtype}; choose float32, float16 or bfloat16")
    # safetensors' numpy API cannot write BF16 without ml_dtypes: lay the file out by hand
    # (8-byte header length, JSON header padded with spaces to 8 bytes, then the data).
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for k in sorted(tensors):
        raw = _to_bf16_bits(tensors[k]).tobytes()
        header[k] = {"dtype": "BF16", "shape": list(tensors[k].shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="llama-arch GGUF base model")
    ap.add_argument("outdir", type=Path, help="folder to write the PEFT adapter into")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--rslora", action="store_true", help="use_rslora: PEFT scale alpha/sqrt(r)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--targets", default=",".join(PROJECTIONS), help="comma-separated module names")
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    args = ap.parse_args(argv)
    alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    out = make_adapter(
        args.base,
        args.outdir,
        rank=args.rank,
        seed=args.seed,
        rslora=args.rslora,
        alpha=alpha,
        targets=[t for t in args.targets.split(",") if t],
        dtype=args.dtype,
        layers=layers,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
