"""Oracle tests for `loraq convert` (PEFT adapter -> GGUF LoRA), docs/llama-cpp.md §1, §3.2, §10.9-10.12.

Outputs are read back with gguf-py's own GGUFReader (not loraq's reader); the expected layout,
permutation and scales are computed here, independently, from the PEFT tensors in float64."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from safetensors.numpy import load_file, save_file

from loraq.convert import ConvertResult, convert_adapter, load_peft_adapter
from loraq.errors import BadArguments, BadInput, LoraqError
from scripts import make_demo_adapter as demo

# HF projection -> GGUF tensor stem, written out here rather than taken from gguf-py's map
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# ---------------------------------------------------------------------------------------------
# Synthetic bases


def write_base(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 96,
    n_vocab: int = 128,
    tied: bool = False,
    seed: int = 1,
) -> Path:
    """A tiny f32 model GGUF written with gguf-py's writer."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)

    def t(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        t(f"blk.{i}.attn_q.weight", n_head * hd, n_embd)
        t(f"blk.{i}.attn_k.weight", n_head_kv * hd, n_embd)
        t(f"blk.{i}.attn_v.weight", n_head_kv * hd, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * hd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    if not tied:
        t("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bases")
    return {
        "llama": write_base(d / "llama.gguf"),
        "tied": write_base(d / "tied.gguf", tied=True),
        "wide": write_base(d / "wide.gguf", n_embd=96, n_head=6, n_head_kv=2),
        "deep": write_base(d / "deep.gguf", n_layers=4),
        "qwen2": write_base(d / "qwen2.gguf", arch="qwen2"),
        "olmo": write_base(d / "olmo.gguf", arch="olmo"),
    }


@pytest.fixture(scope="module")
def smollm2(smollm2_q4_1) -> Path:
    return smollm2_q4_1


# ---------------------------------------------------------------------------------------------
# Independent oracle helpers


def read_out(path: Path) -> tuple[list[tuple[str, int, object]], dict[str, tuple[list[int], int, np.ndarray]], list[str]]:
    """KVs (key, type, value) in file order, tensors name -> (ne, type, float64 numpy data), and
    the tensor names in file order."""
    r = GGUFReader(path)
    kvs = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        kvs.append((k, int(f.types[0]), f.contents()))
    ts = {}
    for t in r.tensors:
        ne = [int(x) for x in t.shape]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(ne[::-1])
        ts[t.name] = (ne, int(t.tensor_type), data)
    return kvs, ts, [t.name for t in r.tensors]


def unpermute(b: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on rows."""
    rows = b.shape[0]
    return b.reshape(n_head, rows // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def peft_modules(adapter: Path) -> dict[str, dict]:
    """module -> {A, B, scale, emb} computed from the PEFT files as PEFT would (float64)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    st = load_file(str(adapter / "adapter_model.safetensors"))
    mods: dict[str, dict] = {}
    for k, v in st.items():
        m = re.match(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$", k)
        assert m, k
        d = mods.setdefault(m[1], {"emb": "embedding" in m[2]})
        d["A" if m[2].endswith(("A.weight", "_A")) else "B"] = v.astype(np.float64)
    for name, d in mods.items():
        r = d["A"].shape[0]
        alpha = cfg["lora_alpha"]
        for key, val in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = val
                break
        d["scale"] = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    return mods


def gguf_stem(module: str) -> str:
    if module == "model.embed_tokens":
        return "token_embd"
    if module == "lm_head":
        return "output"
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", module)
    return f"blk.{m[1]}.{HF_TO_GGUF[m[2]]}"


def expected_order(adapter: Path) -> list[str]:
    keys = sorted(load_file(str(adapter / "adapter_model.safetensors")))
    names: list[str] = []
    for k in keys:
        mod = re.match(r"base_model\.model\.(.+)\.(lora_[AB]\.weight|lora_embedding_[AB])$", k)[1]
        stem = gguf_stem(mod) + ".weight"
        if stem + ".lora_a" not in names:
            names += [stem + ".lora_a", stem + ".lora_b"]
    return names


def assert_llama_cpp_delta_is_peft(adapter: Path, out: Path, n_head: int, n_head_kv: int, permute: bool = True, rtol: float = 2e-6) -> None:
    """llama.cpp's delta alpha/r · B·A (r = lora_b ne[0], §3.2) from the GGUF equals PEFT's."""
    kvs, ts, _ = read_out(out)
    alpha = dict((k, v) for k, _, v in kvs)["adapter.lora.alpha"]
    for name, d in peft_modules(adapter).items():
        stem = gguf_stem(name) + ".weight"
        _, _, a = ts[stem + ".lora_a"]
        b_ne, _, b = ts[stem + ".lora_b"]
        r = b_ne[0]
        if d["emb"]:
            a = a.T  # stored transposed
        if permute and stem.endswith(("attn_q.weight", "attn_k.weight")):
            b = unpermute(b, n_head if "attn_q" in stem else n_head_kv)
        got = (alpha / r if alpha else 1.0) * (b @ a)
        want = d["scale"] * (d["B"] @ d["A"])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < rtol, f"{stem}: relative error {err:.3g}"


def assert_refused(exc_type: type, fn, *needles: str) -> str:
    with pytest.raises(exc_type) as ei:
        fn()
    msg = str(ei.value)
    assert isinstance(ei.value, LoraqError)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Real model: SmolLM2-135M (llama, 9 heads / 3 kv heads, tied embeddings)


@pytest.fixture(scope="module")
def smol_adapter(smollm2, tmp_path_factory) -> Path:
    return demo.make_adapter(smollm2, tmp_path_factory.mktemp("smol") / "adapter")


@pytest.fixture(scope="module")
def smol_f16(smollm2, smol_adapter, tmp_path_factory) -> tuple[Path, ConvertResult]:
    out = tmp_path_factory.mktemp("smol_out") / "adapter-f16.gguf"
    return out, convert_adapter(smol_adapter, smollm2, out, "f16")


def test_demo_adapter_looks_like_peft(smollm2, smol_adapter):
    cfg = json.loads((smol_adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert cfg["target_modules"] == sorted(demo.PROJECTIONS)
    assert cfg["runtime_config"] == {"ephemeral_gpu_offload": False} and cfg["modules_to_save"] is None
    st = load_file(str(smol_adapter / "adapter_model.safetensors"))
    assert len(st) == 30 * 7 * 2
    a = st["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = st["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.dtype == np.float32 and a.shape == (16, 576) and b.shape == (576, 16) and np.abs(b).max() > 0
    from safetensors import safe_open

    with safe_open(str(smol_adapter / "adapter_model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
    # ‖scale·B@A‖ is 2-4% of ‖W‖ (W read independently with gguf-py)
    w = {t.name: t for t in GGUFReader(smollm2).tensors}["blk.0.ffn_down.weight"]
    wn = np.linalg.norm(gguf.quants.dequantize(w.data, w.tensor_type).astype(np.float64))
    mods = peft_modules(smol_adapter)
    d = mods["model.layers.0.mlp.down_proj"]
    assert 0.02 <= np.linalg.norm(d["scale"] * d["B"] @ d["A"]) / wn <= 0.04


def test_smollm2_f16_layout(smollm2, smol_adapter, smol_f16):
    out, res = smol_f16
    assert res.out == out and res.n_tensors == 420 and res.alpha == 32.0 and res.outtype == "f16"
    kvs, ts, order = read_out(out)
    assert [(k, t) for k, t, _ in kvs] == [
        ("general.architecture", GGUFValueType.STRING),
        ("general.type", GGUFValueType.STRING),
        ("adapter.type", GGUFValueType.STRING),
        ("adapter.lora.alpha", GGUFValueType.FLOAT32),
        ("general.quantization_version", GGUFValueType.UINT32),
    ]
    assert [v for _, _, v in kvs] == ["llama", "adapter", "lora", 32.0, 2]
    assert order == expected_order(smol_adapter)
    assert order[:4] == [
        "blk.0.ffn_down.weight.lora_a",
        "blk.0.ffn_down.weight.lora_b",
        "blk.0.ffn_gate.weight.lora_a",
        "blk.0.ffn_gate.weight.lora_b",
    ]
    assert order.index("blk.10.attn_q.weight.lora_a") < order.index("blk.2.attn_q.weight.lora_a")
    base = {t.name: [int(x) for x in t.shape] for t in GGUFReader(smollm2).tensors}
    for name, (ne, typ, _) in ts.items():
        stem = name[: -len(".lora_a")]
        assert typ == QT.F16
        if name.endswith(".lora_a"):
            assert ne == [base[stem][0], 16], name
        else:
            assert ne == [16, base[stem][1]], name
    assert ts["blk.0.ffn_down.weight.lora_a"][0] == [1536, 16]  # docs/llama-cpp.md §1.4 [verified]
    assert ts["blk.0.ffn_down.weight.lora_b"][0] == [16, 576]


def test_smollm2_qk_permutation_and_values(smol_adapter, smol_f16):
    _, ts, _ = read_out(smol_f16[0])
    mods = peft_modules(smol_adapter)
    for layer in (0, 17):
        for proj, stem, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3), ("v_proj", "attn_v", None)):
            d = mods[f"model.layers.{layer}.self_attn.{proj}"]
            a = ts[f"blk.{layer}.{stem}.weight.lora_a"][2]
            b = ts[f"blk.{layer}.{stem}.weight.lora_b"][2]
            want_b = d["B"].astype(np.float16).astype(np.float64)
            assert np.array_equal(a, d["A"].astype(np.float16)), stem  # A untouched
            if heads is None:
                assert np.array_equal(b, want_b)
            else:
                assert not np.array_equal(b, want_b)  # rows really moved
                assert np.array_equal(unpermute(b, heads), want_b), stem


def test_smollm2_delta_matches_peft(smollm2, smol_adapter, smol_f16):
    assert_llama_cpp_delta_is_peft(smol_adapter, smol_f16[0], 9, 3, rtol=2e-3)  # f16 storage


def test_smollm2_q8_0_falls_back_to_f16_for_lora_b(smollm2, smol_adapter, tmp_path):
    out = tmp_path / "adapter-q8_0.gguf"
    res = convert_adapter(smol_adapter, smollm2, out, "q8_0")
    assert any("q8_0" in n and "f16" in n and "210" in n for n in res.notes), res.notes
    r = GGUFReader(out)
    st = load_file(str(smol_adapter / "adapter_model.safetensors"))
    for t in r.tensors:
        if t.name.endswith(".lora_b"):
            assert t.tensor_type == QT.F16, t.name  # ne0 = r = 16, not a multiple of 32
        else:
            assert t.tensor_type == QT.Q8_0, t.name
    # lora_a bytes equal gguf-py's reference Q8_0 (what convert_lora_to_gguf.py writes)
    t = {t.name: t for t in r.tensors}["blk.3.ffn_up.weight.lora_a"]
    a = st["base_model.model.model.layers.3.mlp.up_proj.lora_A.weight"]
    assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(a, QT.Q8_0))


def test_smollm2_rslora_rank_pattern(smollm2, tmp_path):
    """rsLoRA with mixed ranks: PEFT's alpha/√r folded into B, so alpha/r at runtime is exact."""
    ad = demo.make_adapter(
        smollm2, tmp_path / "ad", rank=16, rslora=True, layers=[0, 1], rank_pattern={"down_proj": 8, "layers.1.self_attn.q_proj": 32}
    )
    out = tmp_path / "rs.gguf"
    res = convert_adapter(ad, smollm2, out, "f32")
    assert res.alpha == 32.0
    assert any("mixed ranks" in n for n in res.notes), res.notes
    _, ts, _ = read_out(out)
    assert ts["blk.0.ffn_down.weight.lora_b"][0] == [8, 576]
    assert ts["blk.1.attn_q.weight.lora_b"][0] == [32, 576]
    assert_llama_cpp_delta_is_peft(ad, out, 9, 3)


def test_smollm2_lm_head_on_tied_base_refused(smollm2, tmp_path):
    ad = demo.make_adapter(smollm2, tmp_path / "ad", layers=[0], targets=["q_proj", "lm_head"])
    out = tmp_path / "x.gguf"
    assert_refused(BadInput, lambda: convert_adapter(ad, smollm2, out), "lm_head", "tie", "merge_and_unload")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*")) == []


# ---------------------------------------------------------------------------------------------
# Tiny synthetic models


@pytest.mark.parametrize(
    "kind, kwargs, alpha, note",
    [
        ("plain", {}, 32.0, None),
        ("rslora", {"rslora": True, "rank": 4}, 64.0, "lora_alpha·√r"),  # 32·√4
        ("rslora-mixed", {"rslora": True, "rank": 4, "rank_pattern": {"k_proj": 8}}, 32.0, "mixed ranks"),
        ("alpha_pattern", {"alpha_pattern": {"layers.0.self_attn.q_proj": 8, "down_proj": 64}}, 32.0, "alpha_pattern"),
        ("rank_pattern", {"rank_pattern": {"v_proj": 2, "up_proj": 12}}, 32.0, None),
        (
            "everything",
            {
                "rslora": True,
                "rank": 6,
                "rank_pattern": {"gate_proj": 2},
                "alpha_pattern": {"o_proj": 3.5},
                "targets": [*demo.PROJECTIONS, "embed_tokens", "lm_head"],
            },
            32.0,
            "alpha_pattern",
        ),
    ],
)
def test_tiny_scale_folds_reproduce_peft(bases, tmp_path, kind, kwargs, alpha, note):
    kwargs = {"rank": 8, **kwargs}
    ad = demo.make_adapter(bases["llama"], tmp_path / "ad", seed=3, **kwargs)
    out = tmp_path / f"{kind}.gguf"
    res = convert_adapter(ad, bases["llama"], out, "f32")
    assert res.alpha == alpha
    if note:
        assert any(note in n for n in res.notes), res.notes
    kvs, _, order = read_out(out)
    assert dict((k, v) for k, _, v in kvs)["adapter.lora.alpha"] == alpha
    assert order == expected_order(ad)
    assert_llama_cpp_delta_is_peft(ad, out, 4, 2)
    # the naive reference rule (one lora_alpha, alpha/r) would be off for every folded case
    if kind in ("rslora", "rslora-mixed", "alpha_pattern", "everything"):
        naive = peft_modules(ad)
        assert any(abs(d["scale"] - 32.0 / d["A"].shape[0]) > 1e-9 for d in naive.values())


def test_tiny_token_embd_lora_a_transposed(bases, tmp_path):
    ad = demo.make_adapter(bases["llama"], tmp_path / "ad", rank=4, targets=["embed_tokens", "lm_head"])
    out = tmp_path / "e.gguf"
    convert_adapter(ad, bases["llama"], out, "f32")
    _, ts, order = read_out(out)
    st = load_file(str(ad / "adapter_model.safetensors"))
    a = st["base_model.model.model.embed_tokens.lora_embedding_A"]  # (r, n_vocab)
    b = st["base_model.model.model.embed_tokens.lora_embedding_B"]  # (n_embd, r)
    ne_a, _, ga = ts["token_embd.weight.lora_a"]
    ne_b, _, gb = ts["token_embd.weight.lora_b"]
    assert ne_a == [4, 128] and ne_b == [4, 64]
    assert np.array_equal(ga, a.T) and np.array_equal(gb, b)
    assert ts["output.weight.lora_a"][0] == [64, 4] and ts["output.weight.lora_b"][0] == [4, 128]
    assert order == ["output.weight.lora_a", "output.weight.lora_b", "token_embd.weight.lora_a", "token_embd.weight.lora_b"]


def test_tiny_qwen2_is_not_permuted(bases, tmp_path):
    ad = demo.make_adapter(bases["qwen2"], tmp_path / "ad", rank=4, targets=["q_proj", "k_proj"])
    out = tmp_path / "q.gguf"
    res = convert_adapter(ad, bases["qwen2"], out, "f32")
    assert not any("permuted" in n for n in res.notes)
    _, ts, _ = read_out(out)
    st = load_file(str(ad / "adapter_model.safetensors"))
    assert np.array_equal(ts["blk.1.attn_k.weight.lora_b"][2], st["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"])
    assert_llama_cpp_delta_is_peft(ad, out, 4, 2, permute=False)


def test_tiny_bf16_adapter_widened_exactly(bases, tmp_path):
    ad32 = demo.make_adapter(bases["llama"], tmp_path / "f32", rank=4, seed=5)
    ad16 = demo.make_adapter(bases["llama"], tmp_path / "bf16", rank=4, seed=5, dtype="bfloat16")
    out = tmp_path / "b.gguf"
    convert_adapter(ad16, bases["llama"], out, "bf16")
    r = GGUFReader(out)
    st = load_file(str(ad32 / "adapter_model.safetensors"))
    t = {t.name: t for t in r.tensors}["blk.0.ffn_gate.weight.lora_a"]
    assert t.tensor_type == QT.BF16
    want = gguf.quants.quantize(st["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"], QT.BF16)
    assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(want.shape), want)
    mods = load_peft_adapter(ad16)
    m = next(m for m in mods.modules if m.name == "model.layers.0.mlp.gate_proj")
    x = mods.read(m.key_a)
    assert x.dtype == np.float32 and np.array_equal(x, gguf.quants.dequantize(want, QT.BF16))


def test_load_peft_adapter_records(bases, tmp_path):
    ad = demo.make_adapter(
        bases["llama"], tmp_path / "ad", rank=8, rslora=True, alpha_pattern={"q_proj": 16}, rank_pattern={"layers.1.mlp.up_proj": 4}
    )
    p = load_peft_adapter(ad)
    by = {m.name: m for m in p.modules}
    q = by["model.layers.0.self_attn.q_proj"]
    assert q.key_a == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert q.rank == 8 and q.alpha == 16 and q.scale == pytest.approx(16 / 8**0.5)
    up = by["model.layers.1.mlp.up_proj"]
    assert up.rank == 4 and up.alpha == 32 and up.scale == pytest.approx(32 / 2)
    assert [m.name for m in p.modules][:2] == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"]


# ---------------------------------------------------------------------------------------------
# Refusals: the right LoraqError, one line, and no output file (a previous one left untouched)


def _rewrite(adapter: Path, fn) -> Path:
    f = adapter / "adapter_model.safetensors"
    st = load_file(str(f))
    fn(st)
    save_file(st, str(f), metadata={"format": "pt"})
    return adapter


def _set_config(adapter: Path, **kv) -> Path:
    f = adapter / "adapter_config.json"
    cfg = json.loads(f.read_text())
    for k, v in kv.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))
    return adapter


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _nan(st):
    st[f"{Q0}.lora_B.weight"][3, 1] = np.nan


REFUSALS = {
    # name: (how to spoil the adapter, error type, words the message must hold, base)
    "dora-config": (lambda ad: _set_config(ad, use_dora=True), BadInput, ["DoRA", "merge_and_unload"], "llama"),
    "dora-tensor": (
        lambda ad: _rewrite(ad, lambda st: st.__setitem__(f"{Q0}.lora_magnitude_vector", np.ones(64, np.float32))),
        BadInput,
        [f"{Q0}.lora_magnitude_vector", "DoRA", "merge_and_unload"],
        "llama",
    ),
    "modules_to_save": (
        lambda ad: _rewrite(
            _set_config(ad, modules_to_save=["lm_head"]),
            lambda st: st.__setitem__("base_model.model.lm_head.weight", np.ones((128, 64), np.float32)),
        ),
        BadInput,
        ["base_model.model.lm_head.weight", "modules_to_save", "merge_and_unload"],
        "llama",
    ),
    "lora-bias": (
        lambda ad: _rewrite(ad, lambda st: st.__setitem__(f"{Q0}.lora_B.bias", np.ones(64, np.float32))),
        BadInput,
        [f"{Q0}.lora_B.bias", "bias"],
        "llama",
    ),
    "unknown-tensor": (
        lambda ad: _rewrite(ad, lambda st: st.__setitem__(f"{Q0}.hada_w1_a", np.ones((4, 4), np.float32))),
        BadInput,
        [f"{Q0}.hada_w1_a"],
        "llama",
    ),
    "a-without-b": (
        lambda ad: _rewrite(ad, lambda st: st.pop(f"{Q0}.lora_B.weight")),
        BadInput,
        [f"{Q0}.lora_A.weight", "lora_B"],
        "llama",
    ),
    "pickle-bin": (
        lambda ad: ((ad / "adapter_model.safetensors").unlink(), (ad / "adapter_model.bin").write_bytes(b"\x80\x04not really")),
        BadInput,
        ["adapter_model.bin", "pickle", "safe_serialization"],
        "llama",
    ),
    "no-config": (lambda ad: (ad / "adapter_config.json").unlink(), BadArguments, ["adapter_config.json"], "llama"),
    "no-alpha": (lambda ad: _set_config(ad, lora_alpha=...), BadInput, ["lora_alpha"], "llama"),
    "nan": (lambda ad: _rewrite(ad, _nan), BadInput, [f"{Q0}.lora_B.weight", "NaN"], "llama"),
    "lm_head-tied": (None, BadInput, ["lm_head", "output.weight", "merge_and_unload"], "tied"),
    "wrong-width": (None, BadInput, ["layers.0.mlp.down_proj.lora_A.weight", "width"], "llama->wide"),
    "too-few-layers": (None, BadInput, ["model.layers.2", "llama model with 2 blocks"], "deep->llama"),
    "unmapped-module": (
        lambda ad: _rewrite(
            ad, lambda st: st.update({k.replace("q_proj", "foo_proj"): st.pop(k) for k in [f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight"]})
        ),
        BadInput,
        ["foo_proj", "no counterpart"],
        "llama",
    ),
    "unknown-permutation": (None, BadInput, ["olmo", "q/k"], "olmo"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(bases, tmp_path, case):
    spoil, exc, needles, base = REFUSALS[case]
    made_on, _, used = base.partition("->")
    used = used or made_on
    targets = ["q_proj", "k_proj", "lm_head"] if case == "lm_head-tied" else ["q_proj", "k_proj", "down_proj"]
    ad = demo.make_adapter(bases[made_on], tmp_path / "ad", rank=4, targets=targets)
    if spoil:
        spoil(ad)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "adapter.gguf"
    assert_refused(exc, lambda: convert_adapter(ad, bases[used], out, "f16"), *needles)
    assert list(outdir.iterdir()) == []


def test_failed_convert_keeps_previous_output(bases, tmp_path):
    ad = _rewrite(demo.make_adapter(bases["llama"], tmp_path / "ad", rank=4), _nan)
    out = tmp_path / "adapter.gguf"
    out.write_bytes(b"previous")
    assert_refused(BadInput, lambda: convert_adapter(ad, bases["llama"], out), "NaN")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["ad", "adapter.gguf"]


def test_bad_outtype_and_paths(bases, tmp_path):
    ad = demo.make_adapter(bases["llama"], tmp_path / "ad", rank=4, targets=["v_proj"])
    assert_refused(BadArguments, lambda: convert_adapter(ad, bases["llama"], tmp_path / "x.gguf", "q4_0"), "q4_0", "f16")
    assert_refused(BadArguments, lambda: convert_adapter(tmp_path / "nope", bases["llama"], tmp_path / "x.gguf"), "nope")
    assert_refused(BadArguments, lambda: convert_adapter(ad, tmp_path / "nope.gguf", tmp_path / "x.gguf"), "nope.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.interop
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_loads_converted_adapter(llama_cpp, smollm2, smol_adapter, tmp_path, outtype):
    """llama.cpp's loader accepts the file (it checks types, ne orientation and names, §3.1) and
    the adapter changes the logits."""
    out = tmp_path / f"adapter-{outtype}.gguf"
    convert_adapter(smol_adapter, smollm2, out, outtype)

    def logits(lora):
        m = llama_cpp.Llama(str(smollm2), lora_path=lora, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        toks = m.tokenize(b"The capital of France is")
        m.eval(toks)
        return np.array(m.scores[: len(toks)])

    assert np.abs(logits(str(out)) - logits(None)).max() > 0.1
