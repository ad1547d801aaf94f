"""Merge against an independent float64 numpy computation of W + Σ s·(α/r)·B·A, rounded once.

Inputs are read back with gguf-py's own reader (not loraq's), so a bug in loraq's reader cannot
cancel out."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from loraq.convert import convert_adapter
from loraq.merge import AdapterSpec, merge_model
from scripts import make_demo_adapter as mk_adapter
from scripts import make_synthetic_model as mk_model


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """name -> float64 array in numpy orientation, via gguf-py."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            a = np.asarray(t.data, dtype=np.float32)
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            a = np.asarray(t.data).view(np.float16).astype(np.float32)
        else:
            a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = a.reshape(shape).astype(np.float64)
    return out


def _alpha(path: Path) -> float:
    r = gguf.GGUFReader(str(path))
    return float(r.fields["adapter.lora.alpha"].contents())


def _expected(base: Path, adapters: list[tuple[Path, float]]) -> dict[str, np.ndarray]:
    w = _tensors(base)
    for path, user in adapters:
        lt, alpha = _tensors(path), _alpha(path)
        for name in {n.rsplit(".", 1)[0] for n in lt}:
            a, b = lt[name + ".lora_a"], lt[name + ".lora_b"]
            r = b.shape[1]
            s = user * alpha / r if alpha else user
            delta = a @ b.T if name == "token_embd.weight" else b @ a
            w[name] = w[name] + s * delta
    return w


@pytest.fixture(scope="module")
def small_base(smollm2_q4_1, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mbase")
    return mk_model.make_model(d / "base-f16.gguf", smollm2_q4_1, n_embd=128, n_ff=256, n_layer=2, n_head=4, n_head_kv=2)


def _gguf_adapter(base: Path, d: Path, seed: int, **kw) -> Path:
    peft = d / f"peft{seed}"
    mk_adapter.make_adapter(base, peft, seed=seed, **kw)
    out = d / f"adapter{seed}-f32.gguf"
    convert_adapter(peft, base, out, outtype="f32")
    return out


@pytest.mark.slow  # 13 s on 2 cores: in make test-slow, to keep make test under 5 minutes
def test_several_adapters_with_scales_equal_float64_reference(small_base, tmp_path):
    a1 = _gguf_adapter(small_base, tmp_path, 1, rank=8)
    a2 = _gguf_adapter(small_base, tmp_path, 2, rank=4, alpha=8, targets=["q_proj", "down_proj"])
    a3 = _gguf_adapter(small_base, tmp_path, 3, rank=16, alpha=16, targets=["v_proj", "up_proj"])
    adapters = [(a1, 1.0), (a2, 0.5), (a3, -1.25)]
    for outtype, dt in (("f16", np.float16), ("f32", np.float32)):
        out = tmp_path / f"merged-{outtype}.gguf"
        res = merge_model(small_base, [AdapterSpec(p, s) for p, s in adapters], out, outtype)
        want = _expected(small_base, adapters)
        got_r = gguf.GGUFReader(str(out))
        assert len(res.merged) == 2 * 7
        for t in got_r.tensors:
            ref = want[t.name]
            if ref.ndim == 1:  # norms keep their F32 type and bytes
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                continue
            got = np.asarray(t.data).view(dt).reshape(ref.shape)
            exp = ref.astype(dt)  # numpy rounds float64 -> f16/f32 once, to nearest even
            assert np.array_equal(
                got.view(np.uint16 if dt == np.float16 else np.uint32), exp.view(np.uint16 if dt == np.float16 else np.uint32)
            ), t.name


@pytest.mark.slow  # 9 s
def test_bf16_output_rounds_once(small_base, tmp_path):
    a1 = _gguf_adapter(small_base, tmp_path, 4, rank=8)
    out = tmp_path / "merged-bf16.gguf"
    merge_model(small_base, [AdapterSpec(a1, 1.0)], out, "bf16")
    want = _expected(small_base, [(a1, 1.0)])
    name = "blk.1.ffn_down.weight"
    x = want[name]
    got = (
        np.asarray(gguf.GGUFReader(str(out)).get_tensor([t.name for t in gguf.GGUFReader(str(out)).tensors].index(name)).data)
        .view(np.uint16)
        .reshape(x.shape)
    )
    # exact round-to-nearest-even of the float64 value to bf16, by integer arithmetic on f64 bits
    from fractions import Fraction

    flat, gflat = x.ravel()[:2000], got.ravel()[:2000]
    for v, g in zip(flat, gflat):
        cand = [(int(g) + d) & 0xFFFF for d in (-1, 0, 1)]
        vals = {c: float(np.array([c << 16], dtype=np.uint32).view(np.float32)[0]) for c in cand}
        errs = {c: abs(Fraction(vals[c]) - Fraction(float(v))) for c in cand}
        assert errs[int(g)] <= min(errs.values()), (v, g)


@pytest.mark.slow  # 26 s with two workers, the fast tier's longest case
def test_peft_folder_merge_gives_peft_delta_with_rslora_and_alpha_pattern(small_base, tmp_path):
    """Merging a PEFT folder applies exactly PEFT's scale (α/√r for rsLoRA, per-module α)."""
    peft = tmp_path / "rs"
    mk_adapter.make_adapter(
        small_base, peft, rank=8, seed=5, rslora=True, alpha=16, alpha_pattern={"v_proj": 4}, rank_pattern={"down_proj": 4}
    )
    out = tmp_path / "merged.gguf"
    merge_model(small_base, [AdapterSpec(peft, 1.0)], out, "f32")
    cfg = json.loads((peft / "adapter_config.json").read_text())
    st = load_file(str(peft / "adapter_model.safetensors"))
    base, got = _tensors(small_base), _tensors(out)
    n_head, n_kv = 4, 2
    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    checked = 0
    for key in st:
        if ".lora_A." not in key:
            continue
        mod = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        layer, proj = int(mod.split(".")[2]), mod.split(".")[-1]
        a = st[key].astype(np.float64)
        b = st[key.replace("lora_A", "lora_B")].astype(np.float64)
        r = a.shape[0]
        alpha = cfg["alpha_pattern"].get(proj, cfg["lora_alpha"])
        delta = (alpha / np.sqrt(r)) * (b @ a)
        if proj in ("q_proj", "k_proj"):  # llama's RoPE row permutation, as the base stores it
            h = n_head if proj == "q_proj" else n_kv
            delta = delta.reshape(h, 2, delta.shape[0] // h // 2, -1).swapaxes(1, 2).reshape(delta.shape)
        name = f"blk.{layer}.{names[proj]}.weight"
        np.testing.assert_allclose(got[name], base[name] + delta, rtol=0, atol=2e-6 * np.abs(base[name]).max())
        # and the delta is big enough that a wrong scale (α/r vs α/√r is 2.8× here) would fail
        assert np.abs(delta).max() > 1e-3
        checked += 1
    assert checked == 2 * 7


@pytest.mark.slow  # a whole SmolLM2 merge
def test_real_smollm2_merge_keeps_metadata_and_untouched_tensors(smollm2_f16, tmp_path):
    peft = tmp_path / "demo"
    mk_adapter.make_adapter(smollm2_f16, peft, rank=16, seed=0)
    out = tmp_path / "merged.gguf"
    res = merge_model(smollm2_f16, [AdapterSpec(peft, 1.0)], out)
    assert len(res.merged) == 30 * 7
    rb, rm = gguf.GGUFReader(str(smollm2_f16)), gguf.GGUFReader(str(out))
    kb = [k for k in rb.fields if not k.startswith("GGUF.")]
    km = [k for k in rm.fields if not k.startswith("GGUF.")]
    assert km[-1] == "general.file_type" and set(km) == set(kb)
    for k in kb:
        if k != "general.file_type":
            assert rb.fields[k].contents() == rm.fields[k].contents(), k
    tb = {t.name: t for t in rb.tensors}
    for t in rm.tensors:
        if t.name in ("token_embd.weight",) or t.name.endswith("_norm.weight"):
            assert np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data)), t.name
    # one merged tensor against the float64 reference of the converted (f32) adapter
    lora = tmp_path / "a32.gguf"
    convert_adapter(peft, smollm2_f16, lora, outtype="f32")
    want = _expected(smollm2_f16, [(lora, 1.0)])
    got = _tensors(out)
    for name in ("blk.0.attn_q.weight", "blk.17.attn_k.weight", "blk.29.ffn_down.weight"):
        assert np.array_equal(got[name].astype(np.float16), want[name].astype(np.float16)), name
