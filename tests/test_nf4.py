"""QLoRA's NF4 roundtrip (loraq/merge/nf4.py) against bitsandbytes itself, and merge.base_precision.

The oracle is bitsandbytes' own quantize_4bit(nf4, blocksize 64, compress_statistics=True) +
dequantize_4bit on its CPU backend (dev-only: `pip install bitsandbytes`; skipped without it). Its
CPU 8-bit quantizer looks absmax codes up in a table, so the bit-exact comparison uses
cpu_lut=True; the default (exact nearest code, as the CUDA kernels) is checked to differ only where
it picks a strictly nearer absmax code. Without bitsandbytes, a single-block tensor is checked
against the NF4 spec by hand (its double quantization is exact: absmax − mean = 0)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from loraq.cli import run_cli
from loraq.errors import BadArguments
from loraq.gguf_io import open_gguf
from loraq.kernels import read_f32
from loraq.merge import AdapterSpec, merge_model
from loraq.merge.nf4 import NF4, _blockwise, dynamic_map, nf4_roundtrip
from loraq.pipeline.config import load_config
from scripts.hf_folder import unpermute
from scripts.make_demo_adapter import make_adapter


def bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even) by integer arithmetic, independent of nf4.py."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


# -- the spec, without bitsandbytes -----------------------------------------------------------------


def test_single_block_by_hand():
    """One block of 64: absmax a, every value the nearest NF4 level times a (ties to the lower level).
    The absmax survives double quantization exactly (a − mean(a) = 0 → code 0 → a). With a = 1 and
    float32 the scaled values are the inputs themselves, so ties can be placed exactly."""
    lv = NF4.astype(np.float64)
    mids = ((NF4[:-1] + NF4[1:]) * np.float32(0.5)).astype(np.float32)  # the float32 midpoints
    x = np.zeros(64, np.float32)
    x[0] = -1.0
    x[1:17] = NF4  # every level exactly
    x[17:32] = mids  # exactly between two levels: the lower one
    x[32:47] = np.nextafter(mids, np.float32(2))  # one ulp above: the upper one
    got = nf4_roundtrip(x.reshape(1, 64), "f32").reshape(-1)
    assert np.array_equal(got[1:17], NF4)
    assert np.array_equal(got[17:32], NF4[:-1])
    assert np.array_equal(got[32:47], NF4[1:])
    # bf16, absmax 0.75: nearest level of x·(1/a) in float32, times a, rounded to bf16
    rng = np.random.default_rng(1)
    w = bf16(rng.uniform(-0.75, 0.75, 64).astype(np.float32))
    w[5] = -0.75
    s = (w * np.float32(1 / np.float32(0.75))).astype(np.float64)
    want = bf16((lv[np.abs(s[:, None] - lv[None, :]).argmin(axis=1)] * 0.75).astype(np.float32))
    assert np.array_equal(nf4_roundtrip(w.reshape(1, 64), "bf16").reshape(-1), want)


def test_zero_tensor_and_shapes():
    assert not nf4_roundtrip(np.zeros((3, 64), np.float32)).any()
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    y = nf4_roundtrip(x, "f32")
    assert y.shape == x.shape and np.all(np.abs(y - x) <= np.abs(x).max() * 0.2)
    with pytest.raises(BadArguments):
        nf4_roundtrip(x, "f8")


# -- bitsandbytes as the oracle ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb():
    pytest.importorskip("torch", reason="torch is a dev-only dependency")
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a dev-only oracle (pip install bitsandbytes)")
    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        q, st = F.quantize_4bit(torch.zeros(64), quant_type="nf4", compress_statistics=True, blocksize=64)
        F.dequantize_4bit(q, st)
    except Exception as exc:  # pragma: no cover - depends on the installed build
        pytest.skip(f"bitsandbytes cannot run NF4 on this CPU ({type(exc).__name__}: {exc}); the spec test above still runs")

    def roundtrip(w: np.ndarray, dtype: str) -> tuple[np.ndarray, float]:
        """(bitsandbytes' W', the float32 mean it took of the absmax vector)."""
        dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
        q, st = F.quantize_4bit(torch.from_numpy(w).to(dt), quant_type="nf4", compress_statistics=True, blocksize=64)
        assert st.nested and st.blocksize == 64 and st.state2.blocksize == 256
        return F.dequantize_4bit(q, st).float().numpy(), float(st.offset)

    return F, roundtrip


def test_tables_equal_bitsandbytes(bnb):
    F, _ = bnb
    assert np.array_equal(dynamic_map().view(np.uint32), F.create_dynamic_map().numpy().view(np.uint32))
    assert np.array_equal(NF4.view(np.uint32), F.get_4bit_type("nf4", device="cpu").numpy().view(np.uint32))


def _same_bits(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.ascontiguousarray(a, np.float32).view(np.uint32) != np.ascontiguousarray(b, np.float32).view(np.uint32)).sum())


EDGE = {
    "zero blocks": lambda r: np.concatenate([np.zeros((2, 128)), r.standard_normal((30, 128))]),
    "all zero": lambda r: np.zeros((4, 64)),
    "outliers": lambda r: r.standard_normal((64, 256)) * np.where(r.random((64, 256)) < 0.001, 1000, 1),
    "rows of 70 (blocks span rows, short last block)": lambda r: r.standard_normal((33, 70)),
    "7x9": lambda r: r.standard_normal((7, 9)),
    "tiny values": lambda r: r.standard_normal((16, 64)) * 1e-30,
    "300x1000 (many absmax blocks)": lambda r: r.standard_normal((300, 1000)) * 0.02,
}


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_cases_bit_exact(bnb, case, dtype):
    _, roundtrip = bnb
    w = EDGE[case](np.random.default_rng(0)).astype(np.float32)
    ref, offset = roundtrip(w, dtype)
    assert _same_bits(nf4_roundtrip(w, dtype, cpu_lut=True, offset=offset), ref) == 0
    _assert_offset_close(w, dtype, offset)


def _assert_offset_close(w: np.ndarray, dtype: str, offset: float) -> None:
    """loraq's mean (float64, rounded once) is within 2 float32 ulps of torch's float32 reduction."""
    x = {"bf16": bf16, "f16": lambda v: v.astype(np.float16).astype(np.float32), "f32": lambda v: v}[dtype](w)
    _, absmax = _blockwise(x.reshape(-1), 64, NF4)
    mine = np.float32(absmax.astype(np.float64).mean())
    assert abs(float(mine) - offset) <= 2 * float(np.spacing(np.float32(max(abs(offset), 1e-30))))


def _linear_tensors(g) -> list[str]:
    return [t.name for t in g.tensors if t.name.startswith("blk.") and t.n_dims == 2]


def test_smollm2_bit_exact_and_cuda_rounding(bnb, smollm2_f16):
    """Layers 0, 15 and 29 of SmolLM2 (21 tensors, 10.6M weights): bit-exact with bitsandbytes' CPU
    backend; the default mode differs only through absmax codes that are nearer."""
    _, roundtrip = bnb
    total = lut_diff = own_mean_diff = default_diff = absmax_n = absmax_diff = 0
    dmap = dynamic_map().astype(np.float64)
    with open_gguf(smollm2_f16) as g:
        for name in _linear_tensors(g):
            if name.split(".")[1] not in ("0", "15", "29"):
                continue
            t = g.tensor(name)
            w = read_f32(g, t).reshape(t.shape)
            ref, offset = roundtrip(w, "bf16")
            _assert_offset_close(w, "bf16", offset)
            total += w.size
            lut_diff += _same_bits(nf4_roundtrip(w, "bf16", cpu_lut=True, offset=offset), ref)
            own_mean_diff += _same_bits(nf4_roundtrip(w, "bf16", cpu_lut=True), ref)
            default_diff += _same_bits(nf4_roundtrip(w, "bf16", offset=offset), ref)
            # the absmax codes: exact nearest vs the table, and the exact one never farther
            x = bf16(w).reshape(-1)
            _, absmax = _blockwise(x, 64, NF4)
            c = (absmax - np.float32(absmax.astype(np.float64).mean())).astype(np.float32)
            q_near, a2 = _blockwise(c, 256, dynamic_map())
            q_lut, _ = _blockwise(c, 256, dynamic_map(), lut=True)
            s = c.astype(np.float64) / np.repeat(a2, 256)[: c.size].astype(np.float64)
            assert (np.abs(s - dmap[q_near]) <= np.abs(s - dmap[q_lut]) + 1e-7).all()
            absmax_n += c.size
            absmax_diff += int((q_near != q_lut).sum())
    print(
        f"NF4 roundtrip on {total} SmolLM2 weights: {lut_diff} differ from bitsandbytes' CPU backend (cpu_lut, its mean); "
        f"{own_mean_diff} with loraq's own mean; default (CUDA-nearest) mode {default_diff} "
        f"({absmax_diff} of {absmax_n} absmax codes nearer than the CPU table's)"
    )
    assert lut_diff == 0
    assert default_diff <= 64 * absmax_diff and absmax_diff < absmax_n * 0.01


# -- merge.base_precision ---------------------------------------------------------------------------


@pytest.mark.slow  # 10 s: all 210 SmolLM2 matrices through the roundtrip
def test_merge_nf4_roundtrip(smollm2_f16, tmp_path):
    """Every blk.* matrix becomes f16(nf4(W in HF row order) + s·B·A); embeddings and norms stay."""
    ad = make_adapter(smollm2_f16, tmp_path / "ad", targets=["q_proj", "v_proj"], layers=[0])
    out = tmp_path / "merged.gguf"
    res = merge_model(smollm2_f16, [AdapterSpec(ad, 1.0)], out, "f16", base_precision="nf4_roundtrip")
    assert len(res.nf4) == 30 * 7 and sorted(res.merged) == ["blk.0.attn_q.weight", "blk.0.attn_v.weight"]
    from safetensors.numpy import load_file

    st = load_file(str(ad / "adapter_model.safetensors"))
    with open_gguf(smollm2_f16) as g, open_gguf(out) as m:
        n_head = g.arch_int("attention.head_count")
        for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.3.attn_k.weight", "blk.7.ffn_down.weight"):
            t = g.tensor(name)
            w = read_f32(g, t).reshape(t.shape)
            heads = {"attn_q": n_head, "attn_k": g.arch_int("attention.head_count_kv")}.get(name.split(".")[2])
            hf = unpermute(w, heads) if heads else w
            base = nf4_roundtrip(hf, "bf16").astype(np.float64)
            proj = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj"}.get(name.split(".")[2])
            if name.startswith("blk.0.") and proj:
                k = f"base_model.model.model.layers.0.{proj}"
                base = base + 2.0 * st[f"{k}.lora_B.weight"].astype(np.float64) @ st[f"{k}.lora_A.weight"].astype(np.float64)
            want = base  # float64: the merge rounds once, to f16
            if heads:  # back to the GGUF's permuted rows (llama.cpp's converter's permutation)
                want = want.reshape(heads, 2, want.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(want.shape)
            got = read_f32(m, m.tensor(name)).reshape(t.shape)
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name  # numpy rounds f64 -> f16 once
        for name in ("token_embd.weight", "blk.0.attn_norm.weight"):
            assert np.array_equal(m.read_raw(m.tensor(name)), g.read_raw(g.tensor(name))), name


def test_merge_base_precision_cli_and_config(smollm2_f16, synth256, tmp_path, capsys):
    ad = make_adapter(synth256, tmp_path / "ad", targets=["q_proj"], layers=[0])
    out = tmp_path / "m.gguf"
    assert run_cli(["merge", str(synth256), "--lora", str(ad), "-o", str(out), "--base-precision", "nf4_roundtrip"]) == 0
    assert "28 base tensors through the NF4 roundtrip" in capsys.readouterr().out  # 4 layers x 7 matrices
    assert run_cli(["merge", str(synth256), "--lora", str(ad), "-o", str(out), "--base-precision", "nf8"]) == 2
    cfg = tmp_path / "c.yaml"
    body = {
        "name": "t",
        "workdir": "w",
        "base": str(smollm2_f16),
        "adapters": [{"path": str(ad)}],
        "merge": {"base_precision": "nf4_roundtrip"},
    }
    cfg.write_text(yaml.safe_dump(body))
    assert load_config(cfg).merge.base_precision == "nf4_roundtrip"
    body["merge"] = {"base_precision": "nf4"}
    cfg.write_text(yaml.safe_dump(body))
    with pytest.raises(BadArguments, match=r"merge\.base_precision"):
        load_config(cfg)


def test_original_precision_unchanged(smollm2_f16, tmp_path):
    ad = make_adapter(smollm2_f16, tmp_path / "ad", targets=["q_proj"], layers=[0])
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    merge_model(smollm2_f16, [AdapterSpec(ad, 1.0)], a, "f16")
    merge_model(smollm2_f16, [AdapterSpec(ad, 1.0)], b, "f16", base_precision="original")
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_merge_nf4_dora_equals_peft_on_nf4_weights(tmp_path):
    """A DoRA adapter merged with base_precision=nf4_roundtrip equals PEFT's merge_and_unload on a
    model whose linear weights were replaced by their NF4 roundtrip in HF order (the oracle never
    permutes; loraq un-permutes the GGUF's q/k rows, roundtrips, permutes back). A head of q is
    48 rows of 192 = 144 NF4 blocks, not a whole number of 256-block absmax groups (as SmolLM2's 576
    blocks are not), so a roundtrip in the GGUF's row order would group the absmax differently."""
    torch = pytest.importorskip("torch", reason="torch is a dev-only dependency")
    pytest.importorskip("peft", reason="peft is a dev-only dependency")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_models as pm

    tok = pm.make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                norm = name.endswith("norm.weight")
                p.copy_((torch.randn_like(p) * (0.1 if norm else 0.05) + (1.0 if norm else 0.0)).half().float())
        return m.eval()

    base = pm.write_gguf(model(), tok, tmp_path / "base.gguf")
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True, init_lora_weights=False)
    torch.manual_seed(1)
    p = get_peft_model(model(), lcfg)
    pm._perturb(p, 1)
    p.save_pretrained(tmp_path / "adapter")

    nf4_model = model()
    linear = {n for n, mod in nf4_model.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    with torch.no_grad():
        for n in linear:
            w = nf4_model.get_submodule(n).weight
            w.copy_(torch.from_numpy(nf4_roundtrip(w.numpy(), "bf16")))
    with torch.no_grad():
        merged = PeftModel.from_pretrained(nf4_model, tmp_path / "adapter").merge_and_unload()
    want = {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}

    out = tmp_path / "merged.gguf"
    res = merge_model(base, [AdapterSpec(tmp_path / "adapter", 1.0)], out, "f16", base_precision="nf4_roundtrip")
    assert len(res.nf4) == len(linear) == 14
    heads = {"q_proj": 4, "k_proj": 2}
    with open_gguf(out) as g:
        for t in g.tensors:
            hf = next(k for k in want if pm.gguf_name(k, 2) == t.name)
            x = want[hf]
            h = heads.get(hf.split(".")[-2])
            if h:
                x = pm.permute(x, h)
                # the test can fail: the roundtrip in GGUF row order differs
                assert not np.array_equal(
                    pm.permute(nf4_roundtrip(want[hf].astype(np.float32), "f32"), h), nf4_roundtrip(x.astype(np.float32), "f32")
                )
            got = read_f32(g, t).reshape(x.shape)
            if t.n_dims == 1:
                assert np.array_equal(got, x.astype(np.float32)), t.name
                continue
            ref = x.astype(np.float16).astype(np.float64)
            ulp = np.spacing(np.maximum(np.abs(got), np.abs(ref)).astype(np.float16)).astype(np.float64)
            assert (np.abs(got - ref) <= ulp).all(), (t.name, float(np.abs(got - ref).max()))
