"""Write a synthetic llama-architecture GGUF model with chosen widths (default: multiples of 256).

SmolLM2's width (576) makes llama-quantize fall back from K types on most tensors, so tests also
need a model whose every matrix row length is a multiple of 256. The tokenizer KVs are copied from
SmolLM2's GGUF so llama.cpp loads the result as a real model. Weights are heavy-tailed random
numbers (Student-t, like trained weights' outliers), deterministic for a seed.

`--preset tinyllama` is TinyLlama-1.1B's shape (22 layers, 2048 wide, 32 heads / 4 KV heads, FFN
5632, untied output, 32000-token vocabulary: SmolLM2's first 32000 tokens and the merges among
them): 1.1 billion parameters, 2.2 GB in F16, for the big-model check (scripts/big_model_check.py).
It is generated into the cache, never committed."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V

from loraq.ggml_types import ggml_type
from loraq.gguf_io import KVList, open_gguf
from loraq.gguf_io.writer import GGUFStreamWriter, OutTensor, encode_kv


def make_model(
    out: Path,
    tokenizer_from: Path,
    n_embd: int = 256,
    n_ff: int = 768,
    n_layer: int = 4,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_expert: int = 0,
    tied: bool = True,
    dtype: str = "f16",
    seed: int = 0,
    n_vocab: int | None = None,
    heavy_tails: bool = True,
) -> Path:
    """n_vocab: keep only the tokenizer's first n_vocab tokens (None: all of them). heavy_tails:
    Student-t weights (realistic outliers for quantization error); False draws float32 normals,
    5x cheaper, for a model that only measures memory and time (the 1.1B preset)."""
    rng = np.random.default_rng(seed)
    with open_gguf(tokenizer_from) as tok:
        tok_kvs = [(k, kv.raw) for k, kv in tok.kvs.items() if k.startswith("tokenizer.")]
        full = len(tok.get("tokenizer.ggml.tokens"))
        if n_vocab is not None and n_vocab < full:
            tok_kvs = _truncated_vocab(tok, tok_kvs, n_vocab)
        else:
            n_vocab = full
    head_dim = n_embd // n_head
    kvs = KVList()
    kvs.set("general.architecture", V.STRING, "llama")
    kvs.set("general.type", V.STRING, "model")
    kvs.set("general.name", V.STRING, f"loraq synthetic {n_embd}x{n_layer}")
    for key, vt, val in (
        ("block_count", V.UINT32, n_layer),
        ("context_length", V.UINT32, 2048),
        ("embedding_length", V.UINT32, n_embd),
        ("feed_forward_length", V.UINT32, n_ff),
        ("attention.head_count", V.UINT32, n_head),
        ("attention.head_count_kv", V.UINT32, n_head_kv),
        ("rope.freq_base", V.FLOAT32, 10000.0),
        ("attention.layer_norm_rms_epsilon", V.FLOAT32, 1e-5),
        ("vocab_size", V.UINT32, n_vocab),
        ("rope.dimension_count", V.UINT32, head_dim),
    ):
        kvs.set(f"llama.{key}", vt, val)
    if n_expert:
        kvs.set("llama.expert_count", V.UINT32, n_expert)
        kvs.set("llama.expert_used_count", V.UINT32, 2)
    kvs.set("general.file_type", V.UINT32, {"f16": 1, "f32": 0, "bf16": 32}[dtype])
    for k, raw in tok_kvs:
        kvs.set_raw(k, raw)
    kvs.set("general.quantization_version", V.UINT32, 2)

    wt = ggml_type(dtype)
    f32 = ggml_type("f32")
    specs: list[tuple[str, tuple[int, ...], float]] = [("token_embd.weight", (n_embd, n_vocab), 0.05)]
    for i in range(n_layer):
        b = f"blk.{i}."
        specs += [
            (b + "attn_norm.weight", (n_embd,), 1.0),
            (b + "attn_q.weight", (n_embd, n_head * head_dim), 0.04),
            (b + "attn_k.weight", (n_embd, n_head_kv * head_dim), 0.04),
            (b + "attn_v.weight", (n_embd, n_head_kv * head_dim), 0.03),
            (b + "attn_output.weight", (n_head * head_dim, n_embd), 0.03),
            (b + "ffn_norm.weight", (n_embd,), 1.0),
        ]
        if n_expert:
            specs += [
                (b + "ffn_gate_inp.weight", (n_embd, n_expert), 0.05),
                (b + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert), 0.03),
                (b + "ffn_up_exps.weight", (n_embd, n_ff, n_expert), 0.03),
                (b + "ffn_down_exps.weight", (n_ff, n_embd, n_expert), 0.03),
            ]
        else:
            specs += [
                (b + "ffn_gate.weight", (n_embd, n_ff), 0.03),
                (b + "ffn_up.weight", (n_embd, n_ff), 0.03),
                (b + "ffn_down.weight", (n_ff, n_embd), 0.03),
            ]
    specs.append(("output_norm.weight", (n_embd,), 1.0))
    if not tied:
        specs.append(("output.weight", (n_embd, n_vocab), 0.04))

    def kind(name: str, ne: tuple[int, ...]):
        # norms and the MoE router stay F32, as convert_hf_to_gguf writes them
        return f32 if len(ne) == 1 or "ffn_gate_inp" in name else wt

    tensors = [OutTensor(n, ne, kind(n, ne)) for n, ne, _ in specs]
    with GGUFStreamWriter(out, kvs, tensors) as w:
        for (name, ne, std), t in zip(specs, tensors):
            shape = tuple(reversed(ne))
            if len(ne) == 1:
                x = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                x = (
                    (std * rng.standard_t(5, size=shape)).astype(np.float32)
                    if heavy_tails
                    else rng.standard_normal(shape, np.float32) * np.float32(std)
                )
            if t.type.name == "f16":
                data = x.astype(np.float16)
            elif t.type.name == "bf16":
                data = ((x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) >> 16).astype(np.uint16)
            else:
                data = x
            w.write(name, data)
    return out


def _truncated_vocab(tok, tok_kvs: list[tuple[str, bytes]], n: int) -> list[tuple[str, bytes]]:
    """The tokenizer KVs cut to the first n tokens; a merge is kept when both its halves and their
    concatenation are still tokens, so text still tokenizes (into ids below n)."""
    tokens = list(tok.get("tokenizer.ggml.tokens"))[:n]
    keep = set(tokens)
    cut: dict[str, tuple[V, object, V]] = {"tokenizer.ggml.tokens": (V.ARRAY, tokens, V.STRING)}
    types = tok.get("tokenizer.ggml.token_type")
    if types is not None:
        cut["tokenizer.ggml.token_type"] = (V.ARRAY, [int(x) for x in list(types)[:n]], V.INT32)
    scores = tok.get("tokenizer.ggml.scores")
    if scores is not None:
        cut["tokenizer.ggml.scores"] = (V.ARRAY, [float(x) for x in list(scores)[:n]], V.FLOAT32)
    merges = tok.get("tokenizer.ggml.merges")
    if merges is not None:
        kept = [m for m in merges if (p := m.split(" ", 1)) and len(p) == 2 and p[0] in keep and p[1] in keep and p[0] + p[1] in keep]
        cut["tokenizer.ggml.merges"] = (V.ARRAY, kept, V.STRING)
    out = []
    for k, raw in tok_kvs:
        if k in cut:
            vt, val, sub = cut[k]
            raw = encode_kv(k, vt, val, sub)
        elif k.endswith("_token_id") and tok.get(k) is not None and int(tok.get(k)) >= n:
            continue  # a special token cut off with the vocabulary
        out.append((k, raw))
    return out


# TinyLlama-1.1B's shape: what "a 1B+ model on a small machine" means in scripts/big_model_check.py.
TINYLLAMA = dict(n_embd=2048, n_ff=5632, n_layer=22, n_head=32, n_head_kv=4, tied=False, n_vocab=32000, heavy_tails=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="a GGUF whose tokenizer KVs to copy (SmolLM2)")
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-ff", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-expert", type=int, default=0)
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--dtype", default="f16", choices=["f16", "f32", "bf16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-vocab", type=int, default=None, help="keep the tokenizer's first N tokens")
    ap.add_argument("--preset", choices=["tinyllama"], help="TinyLlama-1.1B's shape (overrides the sizes above)")
    a = ap.parse_args()
    if a.preset == "tinyllama":
        make_model(a.out, a.tokenizer_from, dtype=a.dtype, seed=a.seed, **TINYLLAMA)
    else:
        make_model(
            a.out,
            a.tokenizer_from,
            a.n_embd,
            a.n_ff,
            a.n_layer,
            a.n_head,
            a.n_head_kv,
            a.n_expert,
            not a.untied,
            a.dtype,
            a.seed,
            a.n_vocab,
        )
    print(a.out)


if __name__ == "__main__":
    main()
