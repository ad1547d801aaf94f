"""Interop: where a runtime GGUF adapter is allowed (plain LoRA, rsLoRA, rank/alpha patterns), llama.cpp
running the F16 base with loraq's converted adapter gives the logits of loraq's merged model.

The adapters are built by PEFT (tests/peft_models.py). Base and merge are F32 (the base's values are
f16-exact: the same model as the F16 base), so the two paths differ only in float32 arithmetic order:
with an F16 base, ggml rounds the activations to f16 for the base matmul but not for the LoRA
branch, and an F16 merge rounds the merged weights, each worth a few 1e-3 of a logit here. F32 KV cache
(type_k/type_v 0), llama.cpp's plain CPU path (use_extra_bufts=False, as test_interop_compare)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch", reason="torch is a dev-only dependency (pip install -e '.[peft-tests]')")
pytest.importorskip("transformers", reason="transformers is a dev-only dependency (pip install -e '.[peft-tests]')")
pytest.importorskip("peft", reason="peft is a dev-only dependency (pip install -e '.[peft-tests]')")

from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_models as pm  # noqa: E402
from loraq.convert import convert_adapter  # noqa: E402
from loraq.merge import AdapterSpec, merge_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora": dict(r=8, lora_alpha=4, target_modules=ALL, use_rslora=True),
    "rslora-patterns": dict(
        r=4, lora_alpha=8, target_modules=ALL, use_rslora=True, rank_pattern={"v_proj": 8, "down_proj": 2}, alpha_pattern={"o_proj": 3}
    ),
}


@pytest.fixture(autouse=True)
def _no_repack(monkeypatch):
    default = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repack)


def _logits(model: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    kw = {"lora_path": str(lora), "lora_scale": 1.0} if lora else {}
    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0, **kw
    )
    llm.reset()
    llm.eval(tokens)
    out = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    del llm
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_runtime_adapter_logits_equal_merge(variant, tmp_path):
    tok = pm.make_tokenizer()
    base = pm.write_gguf(pm.make_model(len(tok), tied=False), tok, tmp_path / "base-f32.gguf", f32=True)
    torch.manual_seed(1)
    p = get_peft_model(pm.make_model(len(tok), tied=False), LoraConfig(init_lora_weights=False, **VARIANTS[variant]))
    p.save_pretrained(tmp_path / "adapter")
    lora = tmp_path / "adapter-f32.gguf"
    convert_adapter(tmp_path / "adapter", base, lora, outtype="f32")
    merged = tmp_path / "merged-f32.gguf"
    merge_model(base, [AdapterSpec(tmp_path / "adapter")], merged, "f32")
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, len(tok), 48)]
    runtime, full = _logits(base, tokens, lora), _logits(merged, tokens)
    plain = _logits(base, tokens)
    assert np.abs(plain - full).max() > 0.05  # the adapter changes the logits
    delta = float(np.abs(runtime - full).max())
    print(variant, "max |Δlogit| runtime vs merged:", delta, "adapter effect:", float(np.abs(plain - full).max()))
    assert delta < 1e-3, delta


NEW = ["<tool>", "</tool>", "<|reserved_x|>"]
MERGE_ONLY = {
    "dora": (False, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), None),
    "modules_to_save-tied-embed": (True, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), None),
    "lm_head-lora-tied": (True, dict(target_modules=["q_proj", "lm_head"]), None),
    "resized-vocab": (False, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), NEW),
    "trainable-tokens-tied": (True, dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [5, 299, 300, 301]}), NEW),
}


@pytest.mark.parametrize("variant", sorted(MERGE_ONLY))
def test_merged_variant_runs_in_llama_cpp_as_peft_forward(variant, tmp_path):
    """What only a merge can apply: llama.cpp on loraq's merged GGUF (F32, so only arithmetic order
    differs) gives the logits of PEFT's own forward pass with the adapter unmerged, new token ids
    of a grown vocabulary included."""
    tied, kw, grow = MERGE_ONLY[variant]
    tok = pm.make_tokenizer()
    base = pm.write_gguf(pm.make_model(len(tok), tied), tok, tmp_path / "base.gguf")
    p, ad = pm.build(tok, tied, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw), tmp_path / "adapter", grow=grow)
    n_vocab = p.base_model.model.get_input_embeddings().weight.shape[0]
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, n_vocab, 40)] + ([len(tok), len(tok) + 2] if grow else [])
    with torch.no_grad():
        want = p(torch.tensor([tokens])).logits[0].numpy()
    merged = tmp_path / "merged-f32.gguf"
    merge_model(base, [AdapterSpec(ad)], merged, "f32")
    got = _logits(merged, tokens)
    if variant == "trainable-tokens-tied":  # rows past the trained ids are padding PEFT's folder does not hold
        assert got.shape[1] == len(tok) + len(NEW) < want.shape[1]
        want = want[:, : got.shape[1]]
    delta = float(np.abs(got - want).max())
    print(variant, "max |Δlogit| llama.cpp(merged) vs PEFT forward:", delta)
    assert delta < 1e-3, delta
