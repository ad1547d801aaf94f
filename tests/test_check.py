"""`loraq check`: deployment verdicts, and the delta-vs-noise prediction against measurement.

Oracles: the adapter's delta is recomputed here from the safetensors factors with the scale the
adapter_config implies (PEFT's alpha/r or alpha/√r) or from PEFT's own merge_and_unload; the noise
prediction (128 sampled rows) is checked against quantizing the whole tensor; the verdicts of the
real SmolLM2 demo are recomputed from those exact figures; the matched-filter noise ‖UᵀEV‖² is
checked against projecting the whole tensor's error, and on a constructed base whose Q8_0 error is
known in closed form; a structured and an unstructured delta of the same energy get opposite
verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from loraq.check import check
from loraq.check.noise import DeltaBasis, delta_basis, exact_noise, exact_subspace_noise, predict_noise
from loraq.check.verdicts import _summary, _tensor_checks
from loraq.cli import run_cli
from loraq.ggml_types import ggml_type
from loraq.gguf_io import open_gguf
from loraq.kernels import read_f32
from loraq.merge.lora_file import LoraAdapter, LoraPair
from scripts.make_demo_adapter import make_adapter

TYPES = ["Q4_0", "Q4_K_M", "Q8_0"]
GGUF_OF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _gguf_name(key: str) -> str:
    parts = key.split(".")  # base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight
    return f"blk.{parts[4]}.{GGUF_OF[parts[6]]}.weight"


def exact_deltas(adapter: Path) -> dict[str, float]:
    """‖s·B·A‖²_F per base tensor, from the files: s from adapter_config.json as PEFT computes it."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    st = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, a in st.items():
        if ".lora_A." not in k:
            continue
        b = st[k.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        r = a.shape[0]
        s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        d = s * (b @ a.astype(np.float64))
        out[_gguf_name(k)] = float(np.sum(d * d))
    return out


@pytest.fixture(scope="module")
def demo(smollm2_f16, tmp_path_factory) -> Path:
    return make_adapter(smollm2_f16, tmp_path_factory.mktemp("demo") / "adapter")


@pytest.fixture(scope="module")
def demo_result(smollm2_f16, demo):
    return check(smollm2_f16, [(demo, 1.0)], TYPES)


@pytest.mark.slow  # with its module fixture, 21 s: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_demo_deployment_and_summary(demo_result):
    r = demo_result
    assert (r.arch, r.arch_ok, r.tokenizer_ok) == ("llama", True, True)
    (a,) = r.adapters
    assert a.deployment == "runtime adapter and merged" and a.runtime.ok and a.merged.ok
    assert len(r.tensors) == 30 * 7 and not r.skipped
    by = {s.ftype: s for s in r.summaries}
    # the random demo delta is 2-4% of ‖W‖: far above Q8_0's noise, far below Q4_0's
    assert by["Q8_0"].n_below == 0 and "survive Q8_0" in by["Q8_0"].line
    assert by["Q4_0"].n_below == 210 and by["Q4_0"].line.startswith("the delta on 210 of 210 tensors is below Q4_0's noise:")
    # random factors spread their energy like iid matrices: the whole noise counts
    assert all(t.measure == "full" for t in r.tensors) and by["Q4_0"].n_subspace == 0
    assert r.seconds < 60


@pytest.mark.slow  # the same fixture: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_demo_deltas_match_the_factors(demo_result, demo):
    want = exact_deltas(demo)
    got = {t.tensor: t.delta_sq for t in demo_result.tensors}
    assert set(got) == set(want)
    for name, v in want.items():
        assert got[name] == pytest.approx(v, rel=1e-9), name


@pytest.mark.slow  # the same fixture: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_demo_verdicts_agree_with_exact_noise(demo_result, smollm2_f16, demo):
    """Every verdict recomputed from the exact noise (whole tensor quantized) and exact delta, except
    where the two are within 20% of each other (sampling may fall either side)."""
    want = exact_deltas(demo)
    checked = 0
    with open_gguf(smollm2_f16) as g:
        for tc in demo_result.tensors[::9]:  # 24 tensors, every kind and depth
            w = read_f32(g, g.tensor(tc.tensor)).reshape(-1, g.tensor(tc.tensor).ne[0])
            for tn in tc.types:
                exact = exact_noise(w, ggml_type(tn.type))
                ratio = exact / want[tc.tensor]
                if abs(math.log(ratio)) > math.log(1.2):
                    assert tn.below == (ratio > 1), (tc.tensor, tn.ftype, ratio, tn.ratio)
                    checked += 1
    assert checked > 50


NOISE_CASES = [
    ("blk.0.attn_q.weight", "q4_0"),
    ("blk.3.ffn_down.weight", "q6_K"),
    ("blk.7.attn_v.weight", "q8_0"),
    ("blk.12.ffn_up.weight", "q5_0"),
    ("blk.20.attn_output.weight", "q4_1"),
    ("token_embd.weight", "q8_0"),
]


@pytest.mark.parametrize("name,qtype", NOISE_CASES)
def test_noise_prediction_matches_whole_tensor(smollm2_f16, name, qtype):
    """The 128-row prediction of ‖Q(W)−W‖²_F is within 15% of quantizing every row."""
    with open_gguf(smollm2_f16) as g:
        t = g.tensor(name)
        w = read_f32(g, t).reshape(-1, t.ne[0])
    pred = predict_noise(w, ggml_type(qtype)).predicted
    exact = exact_noise(w, ggml_type(qtype))
    print(f"{name} {qtype}: predicted {pred:.4g}, exact {exact:.4g}, {100 * (pred / exact - 1):+.1f}%")
    assert pred == pytest.approx(exact, rel=0.15)


@pytest.mark.parametrize(
    "name,qtype", [("blk.0.attn_q.weight", "q4_K"), ("blk.1.ffn_down.weight", "q2_K"), ("blk.2.ffn_gate.weight", "q5_K")]
)
def test_noise_prediction_k_types_on_synthetic(synth256, name, qtype):
    with open_gguf(synth256) as g:
        t = g.tensor(name)
        w = read_f32(g, t).reshape(-1, t.ne[0])
    pred = predict_noise(w, ggml_type(qtype)).predicted
    exact = exact_noise(w, ggml_type(qtype))
    print(f"synthetic {name} {qtype}: predicted {pred:.4g}, exact {exact:.4g}, {100 * (pred / exact - 1):+.1f}%")
    assert pred == pytest.approx(exact, rel=0.15)


def test_synthetic_k_types(synth256, tmp_path):
    """On widths that are multiples of 256 the K types apply: Q4_K_M gives q4_K and q6_K only."""
    ad = make_adapter(synth256, tmp_path / "ad", rank=8)
    r = check(synth256, [(ad, 1.0)], ["Q4_K_M", "Q8_0"])
    types = {tn.type for tc in r.tensors for tn in tc.types if tn.ftype == "Q4_K_M"}
    assert types <= {"q4_K", "q6_K"} and "q4_K" in types
    want = exact_deltas(ad)
    for tc in r.tensors:
        assert tc.delta_sq == pytest.approx(want[tc.tensor], rel=1e-9)


def test_rslora_scale(smollm2_f16, tmp_path):
    """rsLoRA: the delta carries alpha/√r (not alpha/r): 4× the plain delta's energy at r=16."""
    ad = make_adapter(smollm2_f16, tmp_path / "rs", rank=16, rslora=True, targets=["q_proj", "v_proj"], layers=[0, 1])
    r = check(smollm2_f16, [(ad, 1.0)], ["Q8_0"])
    assert r.adapters[0].deployment == "runtime adapter and merged"
    want = exact_deltas(ad)
    assert {t.tensor: t.delta_sq for t in r.tensors} == pytest.approx(want, rel=1e-9)
    # the same factors read as plain LoRA would be 16x smaller in energy: the check used alpha/√r
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    plain = check(smollm2_f16, [(ad, 1.0)], ["Q8_0"])
    for a, b in zip(r.tensors, plain.tensors):
        assert a.delta_sq == pytest.approx(16 * b.delta_sq, rel=1e-9)


def test_user_scale_and_two_adapters(smollm2_f16, tmp_path):
    a1 = make_adapter(smollm2_f16, tmp_path / "a1", targets=["q_proj"], layers=[0], seed=1)
    a2 = make_adapter(smollm2_f16, tmp_path / "a2", targets=["q_proj"], layers=[0], seed=2)
    r = check(smollm2_f16, [(a1, 0.5), (a2, -1.0)], ["Q8_0"])
    (tc,) = r.tensors
    st1, st2 = (load_file(str(a / "adapter_model.safetensors")) for a in (a1, a2))
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    d = sum(
        s * 2.0 * st[f"{k}.lora_B.weight"].astype(np.float64) @ st[f"{k}.lora_A.weight"].astype(np.float64)
        for s, st in ((0.5, st1), (-1.0, st2))
    )  # alpha 32 / r 16 = 2
    assert tc.how == "explicit"
    # the q rows of the base are permuted; the Frobenius norm is not
    assert tc.delta_sq == pytest.approx(float(np.sum(d * d)), rel=1e-9)


def test_adapter_for_another_model_is_a_verdict(smollm2_f16, synth256, tmp_path):
    ad = make_adapter(synth256, tmp_path / "ad", targets=["q_proj"], layers=[0])
    r = check(smollm2_f16, [(ad, 1.0)], ["Q8_0"])
    (a,) = r.adapters
    assert a.deployment == "neither"
    assert "another width" in (a.merged.why or "") and "another width" in (a.runtime.why or "")
    assert r.tensors == []


# -- the matched filter: noise inside the delta's own subspaces -------------------------------------


def _orth(rng, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


@pytest.mark.parametrize("name,qtype", NOISE_CASES[:5])
def test_subspace_noise_matches_whole_tensor(smollm2_f16, name, qtype):
    """‖UᵀEV‖²_F from 128 rows against projecting every row's error (random rank-16 bases)."""
    rng = np.random.default_rng(7)
    with open_gguf(smollm2_f16) as g:
        t = g.tensor(name)
        w = read_f32(g, t).reshape(-1, t.ne[0])
    u, v = _orth(rng, w.shape[0], 16), _orth(rng, w.shape[1], 16)
    basis = DeltaBasis(u, v, 1.0, 10.0)
    pred = predict_noise(w, ggml_type(qtype), basis=basis).subspace
    exact = exact_subspace_noise(w, ggml_type(qtype), u, v)
    full = exact_noise(w, ggml_type(qtype))
    print(f"{name} {qtype}: predicted {pred:.4g}, exact {exact:.4g}, full {full:.4g}")
    assert pred == pytest.approx(exact, rel=0.3)
    # and it is the small share isotropic noise puts there: (r/n_out)(r/n_in) of the whole
    assert exact == pytest.approx(full * 16 / w.shape[0] * 16 / w.shape[1], rel=0.3)


def test_stable_rank_separates_random_from_concentrated():
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((576, 16)), rng.standard_normal((16, 1536))
    flat = delta_basis(b, a)
    assert not flat.structured and 0.9 < flat.stable_rank / flat.iid_stable_rank < 1.6
    steep = delta_basis(b * 0.5 ** np.arange(16), a)  # energy halves per direction: stable rank ~1.3
    assert steep.structured and steep.stable_rank == pytest.approx(4 / 3, rel=0.25)
    # the bases span B's columns and A's rows
    assert np.allclose(steep.u @ (steep.u.T @ b), b) and np.allclose(a @ steep.v @ steep.v.T, a)
    assert delta_basis(np.zeros((8, 2)), np.ones((2, 8))).stable_rank == 0.0


class _Base:
    """One tensor, as the check's BaseView shows it."""

    def __init__(self, name: str, w: np.ndarray):
        self.name, self.w = name, w
        self.g = self
        self.tensors = [type("T", (), {"name": name})()]

    def has_tensor(self, name: str) -> bool:
        return name == self.name

    def read(self, name: str) -> np.ndarray:
        return self.w


def _q8_exact_base(rng, n: int = 64, noisy_col: int = 5, off: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(W, E): W on Q8_0's grid (each 32-block's max is 127·d, d = 1/64, so d is exact in f16) except
    column `noisy_col`, which sits `off`·d above a grid point with a random sign per row; so
    E = Q8_0(W) − W is −(±off·d) in that column and 0 elsewhere, in closed form."""
    d = 1 / 64
    q = rng.integers(-100, 100, size=(n, n)).astype(np.float64)
    q[:, 0] = q[:, 32] = 127
    sign = rng.choice([-1.0, 1.0], size=n)
    w = q * d
    w[:, noisy_col] += sign * off * d
    e = np.zeros((n, n))
    e[:, noisy_col] = -sign * off * d
    return w.astype(np.float32), e


def _verdict(w: np.ndarray, b: np.ndarray, a: np.ndarray):
    name = "blk.0.attn_q.weight"
    lora = LoraAdapter(Path("x"), 0.0, {name: LoraPair(a.astype(np.float32), b.astype(np.float32), peft_scale=1.0)})
    (tc,), skipped = _tensor_checks(_Base(name, w), [(lora, 1.0)], {"Q8_0": {name: ggml_type("q8_0")}})  # type: ignore[arg-type]
    assert not skipped
    return tc, _summary("Q8_0", [tc])


def test_verdict_flips_when_the_delta_moves_onto_the_noise():
    """ΔW = B·A with B on output rows 0-3 (energy 1, 0.05², ...: structured) and A on input columns
    either away from the only noisy column or through it. The noise inside the subspace is then
    exactly 0, or the 4 noisy entries of rows 0-3 (4 · (0.4 d)²); the delta's energy sits between
    that and the whole noise (64 · (0.4 d)²), so the verdict flips with the subspace while the
    full-energy comparison would call it below the noise both times."""
    rng = np.random.default_rng(3)
    w, e = _q8_exact_base(rng)
    cell = (0.4 / 64) ** 2
    c = np.sqrt(2 * cell)  # ‖ΔW‖² ≈ 2 cells: above 0, below 4 cells and far below 64
    b = np.zeros((64, 4))
    b[[0, 1, 2, 3], [0, 1, 2, 3]] = c * np.array([1, 0.05, 0.05, 0.05])
    for cols, below, sub_want in (([10, 11, 12, 13], False, 0.0), ([5, 11, 12, 13], True, float(np.sum(e[:4] ** 2)))):
        a = np.zeros((4, 64))
        a[[0, 1, 2, 3], cols] = 1.0
        tc, summ = _verdict(w, b, a)
        (tn,) = tc.types
        assert tc.measure == "subspace", tc.stable_rank
        assert tn.noise_sq == pytest.approx(float(np.sum(e**2)), rel=1e-3)  # every row sampled: exact
        assert tn.subspace_noise_sq == pytest.approx(sub_want, rel=1e-3, abs=1e-12)
        assert tn.below is below and summ.n_below == int(below), (cols, tn.ratio)
        assert tn.noise_sq > 10 * tc.delta_sq  # the whole noise would have said "below" both times
        # (this base lies on q8_0's grid by construction, so the line also names it after the verdict)
        assert ("survive Q8_0 (" if not below else "lost at Q8_0 (") in summ.line and "the base lies on that grid" in summ.line
    # the same energy in an unstructured (iid) delta: the whole noise counts, and it is below it
    b = rng.standard_normal((64, 4))
    a = rng.standard_normal((4, 64))
    s = np.sqrt(2 * cell / np.sum((b @ a) ** 2))
    tc, summ = _verdict(w, b * s, a)
    assert tc.measure == "full" and tc.types[0].below and " in its own subspaces" not in summ.line


def test_strong_low_rank_delta_is_kept_where_random_is_lost(smollm2_f16, tmp_path):
    """One adapter, two versions with the same ‖ΔW‖²_F per tensor, 1/10 of Q4_0's whole noise:
    iid factors (make_demo_adapter) are predicted lost; the same A with B's columns reweighted so
    its energy falls off geometrically (a trained LoRA's shape) is predicted kept, and the
    predicted noise in its subspaces agrees with projecting the whole tensor's error."""
    ad = make_adapter(smollm2_f16, tmp_path / "ad", targets=["q_proj", "down_proj"], layers=[0, 5])
    st = load_file(str(ad / "adapter_model.safetensors"))
    with open_gguf(smollm2_f16) as g:
        full = {}
        for k in st:
            if ".lora_A." in k:
                name = _gguf_name(k)
                w = read_f32(g, g.tensor(name)).reshape(-1, g.tensor(name).ne[0])
                full[k] = (w, exact_noise(w, ggml_type("q4_0")))
    from safetensors.numpy import save_file

    def write(shape: np.ndarray, out: Path) -> None:
        new = {}
        for k, (_, noise) in full.items():
            a, b = st[k].astype(np.float64), st[k.replace(".lora_A.", ".lora_B.")].astype(np.float64) * shape
            s = np.sqrt(noise / 10 / np.sum((2.0 * b @ a) ** 2))  # alpha 32 / r 16 = 2
            new[k], new[k.replace(".lora_A.", ".lora_B.")] = a.astype(np.float32), (s * b).astype(np.float32)
        out.mkdir()
        (out / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
        save_file(new, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})

    write(np.ones(16), tmp_path / "flat")
    write(0.5 ** np.arange(16), tmp_path / "steep")
    flat = check(smollm2_f16, [(tmp_path / "flat", 1.0)], ["Q4_0"])
    steep = check(smollm2_f16, [(tmp_path / "steep", 1.0)], ["Q4_0"])
    (fs,), (ss,) = flat.summaries, steep.summaries
    assert fs.n_below == 4 and "lost at Q4_0" in fs.line and fs.kept_estimate < -5
    assert ss.n_below == 0 and ss.line.endswith("in its own subspaces: expect the fine-tune to survive Q4_0"), ss.line
    assert ss.kept_estimate > 0.9
    with open_gguf(smollm2_f16) as g:
        for tc in steep.tensors:
            w = read_f32(g, g.tensor(tc.tensor)).reshape(-1, g.tensor(tc.tensor).ne[0])
            k = next(k for k in full if _gguf_name(k) == tc.tensor)
            a, b = st[k].astype(np.float64), st[k.replace(".lora_A.", ".lora_B.")].astype(np.float64)
            u, v = np.linalg.qr(b)[0], np.linalg.qr(a.T)[0]
            exact = exact_subspace_noise(w, ggml_type(tc.types[0].type), u, v)
            assert tc.types[0].subspace_noise_sq == pytest.approx(exact, rel=0.5), tc.tensor
            assert exact < tc.delta_sq  # the verdict holds on the exact figure too


# -- the CLI ---------------------------------------------------------------------------------------


def _config(tmp_path: Path, base: Path, adapter: Path, types: list[str]) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(
        yaml.safe_dump(
            {"name": "t", "workdir": "work", "base": str(base), "adapters": [{"path": str(adapter)}], "quantize": {"types": types}}
        )
    )
    return p


@pytest.mark.slow  # two checks of SmolLM2, 15 s: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_cli_check_prints_and_writes_nothing(smollm2_f16, demo, tmp_path, capsys):
    cfg = _config(tmp_path, smollm2_f16, demo, TYPES)
    assert run_cli(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "runtime adapter and merged" in out
    assert "the delta on 210 of 210 tensors is below Q4_0's noise: expect most of the fine-tune to be lost at Q4_0" in out
    assert not (tmp_path / "work").exists()
    assert run_cli(["check", str(cfg), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["ftype"] for s in data["summaries"]] == TYPES
    assert data["adapters"][0]["deployment"] == "runtime adapter and merged"


def test_cli_check_user_errors(tmp_path, smollm2_f16, demo, capsys):
    assert run_cli(["check", str(tmp_path / "missing.yaml")]) == 2
    cfg = _config(tmp_path, smollm2_f16, demo, ["Q4_0"])
    bad = yaml.safe_load(cfg.read_text())
    bad["quantize"]["types"] = ["Q4_Z"]
    cfg.write_text(yaml.safe_dump(bad))
    assert run_cli(["check", str(cfg)]) == 2
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    cfg = _config(tmp_path, tmp_path / "junk.gguf", demo, ["Q4_0"])
    assert run_cli(["check", str(cfg)]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err


# -- PEFT-built variants: DoRA, modules_to_save (merge only), and an HF folder base -------------------


@pytest.fixture(scope="module")
def pm():
    """tests/peft_models.py, whose models and adapters PEFT itself builds (dev-only torch + peft)."""
    pytest.importorskip("torch", reason="torch is a dev-only dependency (pip install -e '.[peft-tests]')")
    pytest.importorskip("peft", reason="peft is a dev-only dependency (pip install -e '.[peft-tests]')")
    import peft_models

    return peft_models


def LoraConfig(**kw):
    from peft import LoraConfig as cfg

    return cfg(**kw)


@pytest.fixture(scope="module")
def tok(pm):
    return pm.make_tokenizer()


@pytest.fixture(scope="module")
def tiny(pm, tok, tmp_path_factory):
    """{tied: (GGUF base, HF folder)} of the tiny PEFT test model."""
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for tied in (True, False):
        m = pm.make_model(len(tok), tied)
        folder = d / f"hf-{tied}"
        m.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        out[tied] = (pm.write_gguf(m, tok, d / f"base-{tied}.gguf"), folder)
    return out


def _peft_deltas(pm, p, base_model) -> dict[str, float]:
    """‖merged − base‖²_F per GGUF tensor from PEFT's own merge_and_unload."""
    import torch

    base = {k: v.detach().double().numpy() for k, v in base_model.state_dict().items()}
    with torch.no_grad():
        merged = p.merge_and_unload()
    out = {}
    for k, v in merged.state_dict().items():
        d = v.detach().double().numpy() - base[k]
        if np.any(d):
            out[pm.gguf_name(k, merged.config.num_hidden_layers)] = float(np.sum(d * d))
    return out


def test_dora_is_merged_only_with_its_delta(pm, tok, tiny, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False)
    p, ad = pm.build(tok, False, cfg, tmp_path / "dora")
    want = _peft_deltas(pm, p, pm.make_model(len(tok), False))
    r = check(tiny[False][0], [(ad, 1.0)], ["Q4_0", "Q8_0"])
    (a,) = r.adapters
    assert a.deployment == "merged only" and a.merged.ok
    assert "DoRA" in (a.runtime.why or "") and "merged path" in (a.runtime.why or ""), a.runtime.why
    got = {t.tensor: t.delta_sq for t in r.tensors}
    assert set(got) == set(want)
    for name, v in want.items():  # PEFT merges in float32 from f16 weights: agree to float32 rounding
        assert got[name] == pytest.approx(v, rel=1e-3), name
    assert all(t.how == "explicit" for t in r.tensors)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_modules_to_save_is_merged_only(pm, tok, tiny, tied, tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False)
    p, ad = pm.build(tok, tied, cfg, tmp_path / "mts")
    want = _peft_deltas(pm, p, pm.make_model(len(tok), tied))
    r = check(tiny[tied][0], [(ad, 1.0)], ["Q8_0"])
    (a,) = r.adapters
    assert a.deployment == "merged only"
    assert "modules_to_save" in (a.runtime.why or "")
    got = {t.tensor: t.delta_sq for t in r.tensors}
    assert got["token_embd.weight"] == pytest.approx(want["token_embd.weight"], rel=1e-3)
    assert got["blk.0.attn_q.weight"] == pytest.approx(want["blk.0.attn_q.weight"], rel=1e-3)
    if tied:
        assert any("untied" in n for n in a.notes)


def test_lm_head_lora_on_tied_model_is_merged_only(pm, tok, tiny, tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    _, ad = pm.build(tok, True, cfg, tmp_path / "head")
    for base in tiny[True]:  # the GGUF and the HF folder say the same
        r = check(base, [(ad, 1.0)], ["Q8_0"])
        (a,) = r.adapters
        assert a.deployment == "merged only", base
        assert "tie" in (a.runtime.why or "") and "merged path" in (a.runtime.why or ""), a.runtime.why
        assert any("output.weight" in s for s in r.skipped)


def test_hf_folder_base_equals_its_gguf(pm, tok, tiny, tmp_path):
    """An HF folder is checked without conversion, with the verdicts of its F16 GGUF."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"], init_lora_weights=False)
    _, ad = pm.build(tok, False, cfg, tmp_path / "plain")
    gguf_path, folder = tiny[False]
    a = check(gguf_path, [(ad, 1.0)], ["Q4_0", "Q8_0"])
    b = check(folder, [(ad, 1.0)], ["Q4_0", "Q8_0"])
    assert b.base_kind == "hf" and b.arch == "llama" and b.tokenizer_ok
    assert b.adapters[0].deployment == a.adapters[0].deployment == "runtime adapter and merged"
    by_name = {t.tensor: t for t in b.tensors}
    assert set(by_name) == {t.tensor for t in a.tensors}
    for x in a.tensors:
        y = by_name[x.tensor]
        assert x.delta_sq == pytest.approx(y.delta_sq, rel=1e-12)
        for u, v in zip(x.types, y.types):
            assert (u.type, u.below) == (v.type, v.below)
            assert u.noise_sq == pytest.approx(v.noise_sq, rel=1e-12)  # the model's weights are exactly f16


def test_unsupported_hf_architecture_is_a_verdict(tmp_path, demo, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    (folder / "tokenizer.model").write_bytes(b"\0")
    r = check(folder, [(demo, 1.0)], ["Q8_0"])
    assert not r.arch_ok and "GPT2LMHeadModel" in (r.arch_why or "") and "qwen2" in (r.arch_why or "")
    assert not r.tokenizer_ok and "SentencePiece" in (r.tokenizer_why or "")
    assert run_cli(["check", str(_config(tmp_path, folder, demo, ["Q8_0"]))]) == 0
    assert "architecture - NO" in capsys.readouterr().out


def test_a_grid_the_base_lies_on_is_named(smollm2_f16, tmp_path):
    """SmolLM2's F16 here is dequantized from Q4_1, so its weights lie on q4_1's grid: rounding
    W + ΔW to q4_1 returns most of the way to W. check names that (the verdict itself stays the
    noise comparison); q8_0's grid is unrelated. The sampled-row share is checked against the
    share over every row, computed here from the merged rows and loraq's q4_1 (byte-identical)."""
    from loraq.kernels import dequantize, quantize

    ad = make_adapter(smollm2_f16, tmp_path / "a", rank=8, targets=["q_proj"], layers=[0, 1])
    r = check(smollm2_f16, [(ad, 1.0)], ["Q4_1", "Q8_0"])
    by = {(tc.tensor, tn.ftype): tn for tc in r.tensors for tn in tc.types}
    st = load_file(str(ad / "adapter_model.safetensors"))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    t41 = ggml_type("q4_1")
    with open_gguf(smollm2_f16) as g:
        for k, a in st.items():
            if ".lora_A." not in k:
                continue
            name = _gguf_name(k)
            d = (cfg["lora_alpha"] / a.shape[0]) * (st[k.replace(".lora_A.", ".lora_B.")].astype(np.float64) @ a.astype(np.float64))
            w = read_f32(g, g.tensor(name)).reshape(d.shape)
            m = np.ascontiguousarray((w + d).astype(np.float32))
            e = dequantize(quantize(m, t41, None), t41, m.shape).astype(np.float64) - m
            want = -float((e * d).sum() / (d * d).sum())
            assert want > 0.5
            assert by[(name, "Q4_1")].erased == pytest.approx(want, abs=0.05)
            assert abs(by[(name, "Q8_0")].erased) < 0.1
    lines = {s.ftype: s.line for s in r.summaries}
    assert "q4_1 takes back" in lines["Q4_1"] and "the base lies on that grid" in lines["Q4_1"]
    assert "grid" not in lines["Q8_0"]
