"""Every PEFT LoRA variant through loraq's merge equals PEFT's own merge_and_unload within f16 rounding.

Each adapter is built by PEFT itself on a tiny random llama (tests/peft_models.py) with non-zero B
(init_lora_weights=False) and perturbed DoRA magnitudes / saved modules / token rows, saved with
save_pretrained, and merged twice: by PEFT (the oracle, in float32) and by `loraq merge` into the F16
GGUF of the same model. Every tensor of loraq's file, q/k rows un-permuted, must equal PEFT's merged
tensor rounded to f16 within one f16 ulp. The runtime GGUF adapter must keep refusing what
llama.cpp cannot run, naming the merged path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a dev-only dependency (pip install -e '.[peft-tests]')")
pytest.importorskip("transformers", reason="transformers is a dev-only dependency (pip install -e '.[peft-tests]')")
peft = pytest.importorskip("peft", reason="peft is a dev-only dependency (pip install -e '.[peft-tests]')")

from peft import LoraConfig, PeftModel  # noqa: E402

import peft_models as pm  # noqa: E402
from loraq.convert import convert_adapter  # noqa: E402
from loraq.errors import BadArguments, BadInput  # noqa: E402
from loraq.gguf_io import open_gguf  # noqa: E402
from loraq.kernels import read_f32  # noqa: E402
from loraq.merge import AdapterSpec, merge_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tok():
    return pm.make_tokenizer()


@pytest.fixture(scope="module")
def bases(tok, tmp_path_factory):
    """{tied: base GGUF} for a tied and an untied model."""
    d = tmp_path_factory.mktemp("peft-bases")
    return {
        tied: pm.write_gguf(pm.make_model(len(tok), tied), tok, d / f"base-{'tied' if tied else 'untied'}.gguf") for tied in (True, False)
    }


def oracle(p) -> dict[str, np.ndarray]:
    with torch.no_grad():
        merged = p.merge_and_unload()
    return {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}


def assert_matches(merged_gguf: Path, want: dict[str, np.ndarray], cfg, changed: list[str]) -> dict[str, float]:
    """Every tensor of `merged_gguf` equals `want` (HF names, float32) rounded to f16 within 1 ulp;
    `changed` GGUF tensors must differ from the base (the adapter had an effect). Returns stats."""
    n_layer = cfg.num_hidden_layers
    gnames = {pm.gguf_name(k, n_layer): k for k in want}
    exact = total = 0
    worst = 0.0
    with open_gguf(merged_gguf) as g:
        # tied in the oracle (same head and embeddings) <=> no output.weight in the merged file
        tied = np.array_equal(want["lm_head.weight"], want["model.embed_tokens.weight"])
        assert {t.name for t in g.tensors} == {n for n in gnames if n != "output.weight" or not tied}
        for t in g.tensors:
            hf = gnames[t.name]
            x = want[hf]
            if hf.endswith("q_proj.weight"):
                x = pm.permute(x, cfg.num_attention_heads)
            elif hf.endswith("k_proj.weight"):
                x = pm.permute(x, cfg.num_key_value_heads)
            got = read_f32(g, t).reshape(x.shape)
            if t.n_dims == 1:
                np.testing.assert_array_equal(got, x, err_msg=t.name)
                continue
            ref = x.astype(np.float16).astype(np.float32)
            ulp = np.spacing(np.maximum(np.abs(got), np.abs(ref)).astype(np.float16)).astype(np.float32)
            diff = np.abs(got - ref)
            assert (diff <= ulp).all(), f"{t.name}: {int((diff > ulp).sum())} values off by more than one f16 ulp (max {diff.max():g})"
            exact += int((diff == 0).sum())
            total += diff.size
            worst = max(worst, float((diff / ulp).max()))
    for name in changed:
        with open_gguf(merged_gguf) as g:
            assert g.has_tensor(name), name
    return {"exact": exact / total, "worst_ulp": worst}


def merge(base: Path, adapters, tmp_path: Path, name: str = "merged.gguf") -> Path:
    out = tmp_path / name
    merge_model(base, [AdapterSpec(a, s) for a, s in adapters], out, "f16")
    return out


def _base_tensor(base: Path, name: str) -> np.ndarray:
    with open_gguf(base) as g:
        return read_f32(g, g.tensor(name))


def _effect(merged: Path, base: Path, name: str, base_name: str | None = None) -> float:
    with open_gguf(merged) as g:
        x = read_f32(g, g.tensor(name))
    b = _base_tensor(base, base_name or name)
    return float(np.abs(x[: b.shape[0]] - b).max())


# -- plain LoRA, rsLoRA, patterns (also runtime adapters) -------------------------------------------

RUNTIME_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora-patterns": dict(
        r=4, lora_alpha=8, target_modules=ALL, use_rslora=True, rank_pattern={"v_proj": 8, "down_proj": 2}, alpha_pattern={"o_proj": 3}
    ),
}


@pytest.mark.parametrize("variant", sorted(RUNTIME_VARIANTS))
def test_runtime_variants_merge_as_peft(variant, tok, bases, tmp_path):
    p, ad = pm.build(tok, False, LoraConfig(init_lora_weights=False, **RUNTIME_VARIANTS[variant]), tmp_path / "adapter")
    want = oracle(p)
    out = merge(bases[False], [(ad, 1.0)], tmp_path)
    stats = assert_matches(out, want, p.config, [])
    print(variant, stats)
    assert stats["exact"] > 0.99, stats
    assert _effect(out, bases[False], "blk.1.attn_v.weight") > 1e-3
    convert_adapter(ad, bases[False], tmp_path / "runtime.gguf", outtype="f32")  # a runtime adapter is allowed


# -- DoRA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "down_proj"], ["q_proj", "embed_tokens"]], ids=["linear", "embedding"])
def test_dora_merges_as_peft(targets, tok, bases, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=True, init_lora_weights=False)
    p, ad = pm.build(tok, False, cfg, tmp_path / "adapter")
    want = oracle(p)
    out = merge(bases[False], [(ad, 1.0)], tmp_path)
    stats = assert_matches(out, want, p.config, [])
    print("dora", targets, stats)
    assert stats["exact"] > 0.99, stats
    # the magnitude normalisation acts: W+sBA alone (a plain LoRA merge) is off by far more than f16 rounding
    assert _effect(out, bases[False], "blk.0.attn_q.weight") > 1e-2
    with pytest.raises(BadInput, match=r"DoRA.*merged path"):
        convert_adapter(ad, bases[False], tmp_path / "runtime.gguf")


def test_dora_rslora_two_adapters_with_weights(tok, bases, tmp_path):
    """Two adapters, one DoRA with rsLoRA, scaled 0.7 and -0.4, merged in order as PEFT merges them
    (each DoRA norm over the base weight with that adapter's own scaled delta)."""
    c1 = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True, init_lora_weights=False)
    c2 = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    _, a1 = pm.build(tok, False, c1, tmp_path / "a1", seed=1)
    _, a2 = pm.build(tok, False, c2, tmp_path / "a2", seed=2)
    model = PeftModel.from_pretrained(pm.make_model(len(tok), False), a1, adapter_name="a1")
    model.load_adapter(a2, adapter_name="a2")
    for m in model.modules():
        if hasattr(m, "set_scale") and hasattr(m, "lora_A"):
            for name, w in (("a1", 0.7), ("a2", -0.4)):
                if name in m.lora_A:
                    m.set_scale(name, w)
    with torch.no_grad():
        merged = model.merge_and_unload(adapter_names=["a1", "a2"])
    want = {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}
    out = merge(bases[False], [(a1, 0.7), (a2, -0.4)], tmp_path)
    stats = assert_matches(out, want, merged.config, [])
    print("two adapters", stats)
    assert stats["exact"] > 0.99, stats
    assert _effect(out, bases[False], "blk.0.ffn_up.weight") > 1e-3


# -- modules_to_save, trainable tokens, tied heads ---------------------------------------------------


def test_modules_to_save_embed_on_tied_model_unties(tok, bases, tmp_path):
    """modules_to_save=[embed_tokens] on a tied model: PEFT's merged model has the new embeddings and
    the old head, so loraq writes output.weight (the base's embeddings) and the new token_embd."""
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False)
    p, ad = pm.build(tok, True, cfg, tmp_path / "adapter")
    want = oracle(p)
    out = merge(bases[True], [(ad, 1.0)], tmp_path)
    assert_matches(out, want, p.config, ["output.weight"])
    assert _effect(out, bases[True], "token_embd.weight") > 1e-2
    assert _effect(out, bases[True], "output.weight", "token_embd.weight") == 0.0
    with pytest.raises(BadInput, match=r"modules_to_save.*merged path"):
        convert_adapter(ad, bases[True], tmp_path / "runtime.gguf")


def test_modules_to_save_lm_head_on_untied_model(tok, bases, tmp_path):
    cfg = LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    p, ad = pm.build(tok, False, cfg, tmp_path / "adapter")
    out = merge(bases[False], [(ad, 1.0)], tmp_path)
    assert_matches(out, oracle(p), p.config, [])
    assert _effect(out, bases[False], "output.weight") > 1e-2


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trainable_tokens_patch_rows(tied, tok, bases, tmp_path):
    """trainable_token_indices: the listed rows are replaced; a tied model stays tied (PEFT ties them)."""
    cfg = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 17, 250]}, init_lora_weights=False)
    p, ad = pm.build(tok, tied, cfg, tmp_path / "adapter")
    out = merge(bases[tied], [(ad, 1.0)], tmp_path)
    assert_matches(out, oracle(p), p.config, [])
    with open_gguf(out) as g:
        assert g.has_tensor("output.weight") == (not tied)
        x = read_f32(g, g.tensor("token_embd.weight"))
    changed = np.flatnonzero((x != _base_tensor(bases[tied], "token_embd.weight")).any(axis=1))
    assert changed.tolist() == [3, 17, 250]
    with pytest.raises(BadInput, match=r"trainable token.*merged path"):
        convert_adapter(ad, bases[tied], tmp_path / "runtime.gguf")


def test_lm_head_lora_on_tied_model_unties(tok, bases, tmp_path):
    """An lm_head LoRA on a tied model changes the head only (PEFT's forward). PEFT's merge_and_unload
    adds it through the shared tensor, changing the embeddings too (it warns); the oracle is its
    merged head and the untouched embeddings, which is what the unmerged PEFT model computes."""
    cfg = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    p, ad = pm.build(tok, True, cfg, tmp_path / "adapter")
    ids = torch.tensor([[5, 9, 40, 120, 7]])
    with torch.no_grad():
        unmerged_logits = p(ids).logits[0].numpy()
    embed = p.base_model.model.model.embed_tokens.weight.detach().float().numpy().copy()
    want = oracle(p)
    want["model.embed_tokens.weight"] = embed
    out = merge(bases[True], [(ad, 1.0)], tmp_path)
    assert_matches(out, want, p.config, ["output.weight"])
    assert _effect(out, bases[True], "output.weight", "token_embd.weight") > 1e-2
    assert _effect(out, bases[True], "token_embd.weight") == 0.0
    # the untied merge computes what PEFT's forward does (float32 model vs the f16-rounded merge)
    untied = pm.make_model(len(tok), False)
    with torch.no_grad():
        untied.model.embed_tokens.weight.copy_(torch.from_numpy(embed))
        untied.lm_head.weight.copy_(torch.from_numpy(want["lm_head.weight"]))
        for k, v in want.items():
            if k not in ("lm_head.weight", "model.embed_tokens.weight"):
                untied.state_dict()[k].copy_(torch.from_numpy(v))
        assert np.abs(untied(ids).logits[0].numpy() - unmerged_logits).max() < 1e-4
    with pytest.raises(BadInput, match=r"lm_head.*merged path"):
        convert_adapter(ad, bases[True], tmp_path / "runtime.gguf")


# -- resized vocabulary ----------------------------------------------------------------------------

NEW = ["<tool>", "</tool>", "<|reserved_x|>"]


def test_resized_vocab_modules_to_save_grows_tokens(tok, bases, tmp_path):
    """resize_token_embeddings + new tokens, embed_tokens and lm_head in modules_to_save: the merged
    GGUF's token_embd, output and token list grow together from the adapter folder's tokenizer.json."""
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False)
    p, ad = pm.build(tok, False, cfg, tmp_path / "adapter", grow=NEW)
    n_base = len(tok)
    out = merge(bases[False], [(ad, 1.0)], tmp_path)
    assert_matches(out, oracle(p), p.config, [])
    with open_gguf(out) as g:
        tokens, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type")
        assert g.tensor("token_embd.weight").ne[1] == g.tensor("output.weight").ne[1] == len(tokens) == n_base + 5
        assert g.get("llama.vocab_size") == n_base + 5
    with open_gguf(bases[False]) as b:
        assert tokens[:n_base] == b.get("tokenizer.ggml.tokens") and types[:n_base] == b.get("tokenizer.ggml.token_type")
        assert g.get("tokenizer.ggml.merges") == b.get("tokenizer.ggml.merges")
    assert tokens[n_base:] == [*NEW, f"[PAD{n_base + 3}]", f"[PAD{n_base + 4}]"]
    assert types[n_base:] == [4, 4, 3, 5, 5]  # USER_DEFINED, CONTROL (special), UNUSED (padding)


def test_resized_vocab_trainable_tokens_on_tied_model(tok, bases, tmp_path):
    """The new ids trained as trainable tokens on a tied model: token_embd grows, the model stays tied."""
    n = len(tok)
    ids = [5, n, n + 1, n + 2, n + 3, n + 4]
    cfg = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": ids}, init_lora_weights=False)
    p, ad = pm.build(tok, True, cfg, tmp_path / "adapter", grow=NEW)
    out = merge(bases[True], [(ad, 1.0)], tmp_path)
    assert_matches(out, oracle(p), p.config, [])
    with open_gguf(out) as g:
        assert not g.has_tensor("output.weight") and len(g.get("tokenizer.ggml.tokens")) == n + 5


def test_resized_vocab_without_head_rows_is_refused(tok, bases, tmp_path):
    """Grown embeddings but an untied head with no rows for the new tokens: refused, naming the fix."""
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False)
    _, ad = pm.build(tok, False, cfg, tmp_path / "adapter", grow=NEW)
    with pytest.raises(BadInput, match=r"output.weight row \d+ .*lm_head"):
        merge(bases[False], [(ad, 1.0)], tmp_path)
    (ad / "tokenizer.json").unlink()
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False)
    _, ad2 = pm.build(tok, False, cfg, tmp_path / "adapter2", grow=NEW)
    (ad2 / "tokenizer.json").unlink()
    with pytest.raises(BadInput, match="tokenizer"):
        merge(bases[False], [(ad2, 1.0)], tmp_path, "m2.gguf")


# -- the pipeline ------------------------------------------------------------------------------------


PIPELINE = {
    "dora": (dict(target_modules=["q_proj", "v_proj"], use_dora=True), None, "DoRA", {"merged", "base"}),
    "resized-vocab": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), NEW, "vocabulary grows", {"merged"}),
}


@pytest.mark.parametrize("variant", sorted(PIPELINE))
def test_run_with_merge_only_adapter_scores_merged_only(variant, tok, bases, tmp_path):
    """`loraq run` on a DoRA / resized-vocabulary adapter: no convert stage and no runtime variants;
    the reference is the merged F16 (its settings say why), and the merged variants are scored
    against it (a grown vocabulary: without the base, whose logits cover fewer tokens)."""
    import json

    import yaml

    from loraq.pipeline.config import load_config
    from loraq.pipeline.runner import build_stages, run_pipeline

    kw, grow, why, kinds_want = PIPELINE[variant]
    pm.build(tok, False, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw), tmp_path / "adapter", grow=grow)
    (tmp_path / "eval.json").write_text(json.dumps([int(i) for i in np.random.default_rng(0).integers(3, len(tok), 256)]))
    doc = {
        "name": "t",
        "workdir": "work",
        "base": str(bases[False]),
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": ["Q8_0"]},
        "compare": {"text": "eval.json", "ctx": 64, "chunks": 2},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    c = load_config(tmp_path / "cfg.yaml")
    stages = build_stages(c)
    names = [s.name for s in stages]
    assert "convert" not in names and not any(n.startswith(("quantize-base", "score:runtime")) for n in names), names
    ref = next(s for s in stages if s.name == "reference")
    assert "runtime LoRA off" in ref.settings["reference_model"] and why in ref.settings["reference_model"]
    # dist/ can ship the merged files, but not the adapter: llama.cpp cannot run it as a LoRA file
    for deliver, ok in (({"files": ["merged-Q8_0"]}, True), ({"adapter": True}, False)):
        (tmp_path / "cfg2.yaml").write_text(yaml.safe_dump(doc | {"deliver": deliver}))
        if ok:
            assert build_stages(load_config(tmp_path / "cfg2.yaml"))[-1].name == "deliver"
        else:
            with pytest.raises(BadArguments, match="can only be merged"):
                build_stages(load_config(tmp_path / "cfg2.yaml"))
    run_pipeline(c, force="all")
    report = json.loads((c.workdir_path / "report.json").read_text())
    kinds = {v["kind"] for v in report["variants"]}
    assert kinds == kinds_want, kinds


def test_token_id_far_past_the_vocabulary_is_refused_before_allocating(tok, bases, tmp_path):
    """A trainable token id of 5 million with one row of values: refused up front, not a 5M-row tensor."""
    import json

    cfg = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 17, 250]}, init_lora_weights=False)
    _, ad = pm.build(tok, False, cfg, tmp_path / "adapter")
    doc = json.loads((ad / "adapter_config.json").read_text())
    doc["trainable_token_indices"] = {"embed_tokens": [3, 17, 5_000_000]}
    (ad / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(BadInput, match="token id 5000000"):
        merge(bases[False], [(ad, 1.0)], tmp_path)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_folder_base_sees_a_tied_head_before_converting(tied, tok, tmp_path):
    """With an HF folder as base the GGUF does not exist when the stages are planned: the lm_head
    LoRA on a tied model must still be found merge-only (no convert stage, no runtime variants)
    from the folder's safetensors headers, and an untied one must not."""
    import yaml

    from loraq.pipeline.config import load_config
    from loraq.pipeline.runner import build_stages

    cfg = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    pm.build(tok, tied, cfg, tmp_path / "adapter")
    hf = tmp_path / "hf"
    pm.make_model(len(tok), tied).save_pretrained(hf, safe_serialization=True)
    doc = {"name": "t", "workdir": "work", "base": "hf", "adapters": [{"path": "adapter"}], "quantize": {"types": ["Q8_0"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc | {"compare": {"text": "cfg.yaml"}}))
    names = [s.name for s in build_stages(load_config(tmp_path / "cfg.yaml"))]
    assert ("convert" in names) is not tied and any(n.startswith("quantize-base") for n in names) is not tied, names
