"""Tiny Hugging Face llama models and their F16 GGUF, for testing loraq's merge against PEFT itself.

A byte-level BPE tokenizer of ~300 tokens (built with `tokenizers`), a 2-layer 64-wide
LlamaForCausalLM (tied or untied embeddings) whose weights are rounded to f16 so the F16 GGUF holds
exactly the model PEFT sees, and a small HF→GGUF writer: gguf-py's tensor name map, the llama q/k
row permutation convert_hf_to_gguf.py applies for RoPE, and the tokenizer KVs llama.cpp needs to
load the file. Test-only; loraq's real HF→GGUF converter is loraq/convert/hf_base.py.

torch, transformers and peft are dev-only (pyproject extra `peft-tests`); importing this module
without them raises ImportError, so test modules importorskip them first."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = "the quick brown fox jumps over the lazy dog; a lora adapter merged into the model. " * 4
N_HEAD, N_HEAD_KV = 4, 2
ROPE_THETA = 10000.0


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of a byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def make_tokenizer(n_merges: int = 40) -> PreTrainedTokenizerFast:
    """3 special tokens, the 256 byte symbols and `n_merges` merges learnt from a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIALS) + 256 + n_merges, special_tokens=SPECIALS, initial_alphabet=byte_chars(), show_progress=False
    )
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0])


def make_model(n_vocab: int, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer llama whose weights are exactly f16 values (the GGUF base holds them as F16)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_HEAD_KV,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith("norm.weight") else 0.08
            noise = torch.randn_like(p) * (0.1 if name.endswith("norm.weight") else scale)
            p.copy_((noise + (1.0 if name.endswith("norm.weight") else 0.0)).half().float())
    return model.eval()


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from (2, d/2) to (d/2, 2) order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, n_layer: int) -> str:
    """The GGUF tensor name of HF tensor `hf` (e.g. blk.0.attn_q.weight)."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    name = tmap.get_name(hf, try_suffixes=(".weight",))
    assert name is not None, hf
    return name


def tokenizer_vocab(tok_json: dict) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) from a tokenizer.json, as convert_hf_to_gguf writes them."""
    vocab = dict(tok_json["model"]["vocab"])
    special = set()
    for a in tok_json.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    types = [3 if i in special else 1 for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path, f32: bool = False) -> Path:
    """The model as an F16 (or, with f32, F32) llama GGUF: matrices F16 (q/k rows permuted), norms F32,
    tied models without output.weight, tokenizer KVs of a gpt2-style BPE vocabulary."""
    cfg = model.config
    n_layer = cfg.num_hidden_layers
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("loraq peft test model")
    w.add_block_count(n_layer)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)  # LlamaConfig's default
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0 if f32 else 1)
    tokens, types, merges = tokenizer_vocab(json.loads(tok.backend_tokenizer.to_str()))
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            x = permute(x, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = permute(x, cfg.num_key_value_heads)
        x = x.astype(np.float32 if x.ndim == 1 or f32 else np.float16)
        w.add_tensor(gguf_name(name, n_layer), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _perturb(model, seed: int) -> None:
    """Move what PEFT initialises to the base's values (DoRA m = ‖W+sBA‖, saved module copies, token
    rows) away from them, as training would: otherwise those parts would be untested no-ops."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build(tok: PreTrainedTokenizerFast, tied: bool, cfg, out: Path, seed: int = 1, grow: list[str] | None = None):
    """(PEFT model, saved adapter folder): a fresh copy of the base, `grow` tokens added (resized
    vocabulary, tokenizer saved with the adapter), the LoRA config applied and perturbed."""
    model = make_model(len(tok), tied)
    t = tok
    if grow:
        import copy

        t = copy.deepcopy(tok)
        t.add_tokens(grow[:-1])
        t.add_special_tokens({"additional_special_tokens": grow[-1:]})
        model.resize_token_embeddings(len(t) + 2)  # +2: padded rows with no token, as pad_to_multiple_of leaves
    torch.manual_seed(seed)
    from peft import get_peft_model

    p = get_peft_model(model, cfg)
    _perturb(p, seed)
    p.save_pretrained(out)
    if grow:
        t.save_pretrained(out)
    return p, out
