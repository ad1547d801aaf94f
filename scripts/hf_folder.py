"""Write Hugging Face model folders for tests and the demo: SmolLM2 from its GGUF, or small random
qwen2 / qwen3 / llama models.

`from_gguf` turns a llama-architecture GGUF (F16/F32/BF16, or quantized: dequantized by loraq)
back into what `save_pretrained` writes: safetensors (bf16, f16 or f32; one file, or shards with
model.safetensors.index.json), config.json, generation_config.json, and a tokenizer.json built
with the `tokenizers` library from the GGUF's vocabulary and merges, plus tokenizer_config.json
with the chat template and special tokens. Q and K are un-permuted back to the HF layout
(llama.cpp's converter permutes them for its rope; docs/llama-cpp.md §1.4).

`synthetic` writes a small random model of a given HF architecture with widths that are multiples
of 256 and the tokenizer files of an existing folder. Nothing here is committed: tests build the
folders in temporary folders, the demo in its cache."""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from loraq.gguf_io import open_gguf
from loraq.kernels import read_f32

# GGUF tensor name (after blk.N.) -> HF module name (after model.layers.N.)
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

SMOLLM_PRE = "smollm"  # llama.cpp's name for SmolLM2's pre-tokenizer: each digit alone, then GPT-2 byte-level


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    return f"{_TOP[base]}.{suffix}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: rows (head, dim/2, 2) -> (head, 2, dim/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_dtype(x: np.ndarray, dtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    u = x.view(np.uint32).astype(np.uint64)  # bf16: round to nearest even on the top half
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def write_safetensors(folder: Path, tensors: Iterable[tuple[str, np.ndarray]], dtype: str = "F16", shards: int = 1) -> None:
    """safetensors files as save_pretrained writes them (shards and an index when shards > 1)."""
    items = [(n, a.shape, _to_dtype(a, dtype)) for n, a in tensors]
    groups = [items[i::shards] for i in range(shards)] if shards > 1 else [items]
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n, shape, data in sorted(group, key=lambda t: t[0]):
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
            off += len(data)
            weight_map[n] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _, _, data in sorted(group, key=lambda t: t[0]):
                f.write(data)
        total += off
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(
    folder: Path, tokens: list[str], types: list[int], merges: list[str], pre: str, bos: int, eos: int, **kw: object
) -> None:
    """tokenizer.json (tokenizers library) and tokenizer_config.json for a GPT-2 byte-level BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    control = [i for i, t in enumerate(types) if t == 3]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == SMOLLM_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i in control
        },
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
        **kw,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def from_gguf(gguf_path: Path | str, folder: Path | str, dtype: str = "F16", shards: int = 1, jinja_file: bool = False) -> Path:
    """SmolLM2 (or any llama GGUF with a gpt2 tokenizer) as a Hugging Face folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open_gguf(gguf_path) as g:
        arch = g.arch
        n_head = int(g.get(f"{arch}.attention.head_count"))
        n_kv = int(g.get(f"{arch}.attention.head_count_kv", n_head))
        names = [t.name for t in g.tensors]

        def tensors() -> Iterable[tuple[str, np.ndarray]]:
            for t in g.tensors:
                x = read_f32(g, t)
                if t.name.endswith("attn_q.weight"):
                    x = unpermute(x, n_head)
                elif t.name.endswith("attn_k.weight"):
                    x = unpermute(x, n_kv)
                yield hf_name(t.name), x

        write_safetensors(folder, tensors(), dtype, shards)
        bos, eos = int(g.get("tokenizer.ggml.bos_token_id")), int(g.get("tokenizer.ggml.eos_token_id"))
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": int(g.get(f"{arch}.embedding_length")),
            "intermediate_size": int(g.get(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(g.get(f"{arch}.block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "max_position_embeddings": int(g.get(f"{arch}.context_length")),
            "rms_norm_eps": float(np.float32(g.get(f"{arch}.attention.layer_norm_rms_epsilon"))),
            "rope_theta": float(g.get(f"{arch}.rope.freq_base")),
            "vocab_size": len(g.get("tokenizer.ggml.tokens")),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[dtype],
        }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}, indent=2))
    tokenizer_from_gguf(gguf_path, folder, jinja_file)
    return folder


def tokenizer_from_gguf(gguf_path: Path | str, folder: Path | str, jinja_file: bool = False) -> Path:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) from a GGUF's gpt2 vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open_gguf(gguf_path) as g:
        tokens, types, merges = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type"), g.get("tokenizer.ggml.merges")
        bos, eos = int(g.get("tokenizer.ggml.bos_token_id")), int(g.get("tokenizer.ggml.eos_token_id"))
        template = g.get("tokenizer.chat_template")
        pre = g.get("tokenizer.ggml.pre") or "gpt-2"
    extra: dict[str, object] = {"pad_token": tokens[eos], "unk_token": tokens[0]}
    if template and not jinja_file:
        extra["chat_template"] = template
    write_tokenizer(folder, tokens, types, merges, pre, bos, eos, **extra)
    if template and jinja_file:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def synthetic(
    folder: Path | str,
    tokenizer_from: Path | str,
    arch: str = "qwen2",
    n_embd: int = 256,
    n_ff: int = 768,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    tied: bool = False,
    dtype: str = "BF16",
    shards: int = 1,
    seed: int = 0,
    model_type: bool = True,
    hf_arch: str | None = None,
    rope_scaling: dict[str, object] | None = None,
) -> Path:
    """A small random HF model: qwen2 (q/k/v biases), qwen3 (q_norm/k_norm, head_dim) or llama.

    model_type=False leaves `model_type` out of config.json: transformers then builds the tokenizer
    that tokenizer_config.json names, instead of substituting its own class for the model type
    (transformers 5 gives a qwen2 folder Qwen2Tokenizer, with Qwen's pre-tokenizer, whatever
    tokenizer.json says; convert_hf_to_gguf.py would then hash a tokenizer the folder does not hold)."""
    folder, src = Path(folder), Path(tokenizer_from)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    n_vocab = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_t(5, size=shape) * 0.02).astype(np.float32)

    ts: list[tuple[str, np.ndarray]] = [("model.embed_tokens.weight", w(n_vocab, n_embd)), ("model.norm.weight", 1 + w(n_embd))]
    if not tied:
        ts.append(("lm_head.weight", w(n_vocab, n_embd)))
    for i in range(n_layer):
        p = f"model.layers.{i}."
        ts += [
            (p + "input_layernorm.weight", 1 + w(n_embd)),
            (p + "post_attention_layernorm.weight", 1 + w(n_embd)),
            (p + "self_attn.q_proj.weight", w(n_head * hd, n_embd)),
            (p + "self_attn.k_proj.weight", w(n_head_kv * hd, n_embd)),
            (p + "self_attn.v_proj.weight", w(n_head_kv * hd, n_embd)),
            (p + "self_attn.o_proj.weight", w(n_embd, n_head * hd)),
            (p + "mlp.gate_proj.weight", w(n_ff, n_embd)),
            (p + "mlp.up_proj.weight", w(n_ff, n_embd)),
            (p + "mlp.down_proj.weight", w(n_embd, n_ff)),
        ]
        if arch == "qwen2":
            ts += [(p + f"self_attn.{x}_proj.bias", w(n * hd)) for x, n in (("q", n_head), ("k", n_head_kv), ("v", n_head_kv))]
        if arch == "qwen3":
            ts += [(p + "self_attn.q_norm.weight", 1 + w(hd)), (p + "self_attn.k_norm.weight", 1 + w(hd))]
    write_safetensors(folder, ts, dtype, shards)
    hf_arch = hf_arch or {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    config: dict[str, object] = {
        "architectures": [hf_arch],
        **({"model_type": arch} if model_type else {}),
        "hidden_size": n_embd,
        "intermediate_size": n_ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": n_vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[dtype],
    }
    if arch == "qwen3":
        config["head_dim"] = hd
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path, help="a llama GGUF with a gpt2 tokenizer (SmolLM2)")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--dtype", default="F16", choices=["F16", "BF16", "F32"])
    ap.add_argument("--shards", type=int, default=1)
    a = ap.parse_args()
    print(from_gguf(a.gguf, a.folder, a.dtype, a.shards))


if __name__ == "__main__":
    main()
