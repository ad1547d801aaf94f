"""Interop: compare.engine numpy and llama.cpp produce the same report on SmolLM2.

Each engine builds its own reference (F16 base + the demo adapter at runtime) from the same tokens
of the GPL v3 text (4 chunks × 256) and scores the same files: the base without the adapter, a
merged Q4_K_M and a runtime-LoRA Q8_0 (base quantized, GGUF adapter applied by each engine).
The reports must agree: mean KLD within 0.002 and PPL within 1 % for every variant, the
reference PPL within 1 %. The oracle is llama.cpp itself (through llama-cpp-python).

Measured (scripts/bench_compare_engines.py, same tokens): reference PPL 19.6708 / 19.6732,
merged-Q4_K_M KLD 0.05523 / 0.05452 and PPL −0.13 %, merged-Q8_0 KLD 0.00438 / 0.00430 and PPL
−0.25 %. runtime-Q4_K_M is NOT within the PPL bound at 4 chunks (KLD 0.06205 / 0.06084, PPL
20.795 / 20.541, −1.22 %): on K-quants the engines' per-position logits differ by a KLD of ~0.02
(Q8_K activation rounding amplifies last-bit differences), which 508 scored tokens do not average
out; it is left out here and reported, not hidden. That ~0.01 is the floor, not a wrong LoRA path
(scripts/bench_compare_engines.py --floor, 2 chunks): base Q4_K_M 0.0088, with the runtime LoRA
0.0090, and the numpy engine against itself with its input embeddings moved by one ulp 0.010; at 8
chunks the bench measured runtime-Q4_K_M KLD 0.06848 / 0.06848, PPL +0.014 %."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loraq.compare.stage import Candidate, build_reference, compare_models, evaluation_tokens
from loraq.convert import convert_adapter
from loraq.llama.engine import Engine
from loraq.llama.llama_cpp_engine import LlamaCppEngine
from loraq.merge import AdapterSpec, merge_model
from loraq.quantize.driver import QuantizeOptions, quantize_many
from scripts import make_demo_adapter

pytestmark = pytest.mark.interop
pytest.importorskip("llama_cpp")
GPL = Path("/usr/share/common-licenses/GPL-3")
CTX, CHUNKS = 256, 4


@pytest.fixture(scope="module")
def files(smollm2_f16, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("engines")
    peft = d / "adapter"
    make_demo_adapter.make_adapter(smollm2_f16, peft, rank=16, seed=0)
    lora = d / "adapter-f16.gguf"
    convert_adapter(peft, smollm2_f16, lora, outtype="f16")
    merged = d / "merged-f16.gguf"
    merge_model(smollm2_f16, [AdapterSpec(peft, 1.0)], merged)
    mq, bq = d / "merged-Q4_K_M.gguf", d / "base-Q8_0.gguf"
    quantize_many(merged, [("Q4_K_M", mq)], QuantizeOptions(threads=2))
    quantize_many(smollm2_f16, [("Q8_0", bq)], QuantizeOptions(threads=2))
    return {"base": smollm2_f16, "peft": peft, "lora": lora, "merged-Q4_K_M": mq, "base-Q8_0": bq, "dir": d}


def _report(files: dict[str, Path], engine: str) -> dict:
    if not GPL.exists():
        pytest.skip("the GPL v3 text (Debian base-files) is not installed")
    work = files["dir"] / engine
    work.mkdir()
    ref = work / "reference.kld"
    # The reference's adapter is the PEFT folder, as `loraq run` gives it: the llama.cpp engine
    # converts it to an F32 GGUF LoRA on the way.
    build_reference(files["base"], [(files["peft"], 1.0)], GPL, CTX, CHUNKS, ref, threads=2, engine=engine)
    cands = [
        Candidate("base", "base", "F16", files["base"]),
        Candidate("merged-Q4_K_M", "merged", "Q4_K_M", files["merged-Q4_K_M"]),
        Candidate("runtime-Q8_0", "runtime_lora", "Q8_0", files["base-Q8_0"], [(files["lora"], 1.0)]),
    ]
    return dict(compare_models(ref, cands, GPL, work, None, 2, engine=engine))


def test_numpy_and_llama_cpp_engines_give_the_same_report(files):
    reports = {e: _report(files, e) for e in ("numpy", "llama.cpp")}
    a, b = reports["numpy"], reports["llama.cpp"]
    assert a["engine"] == {"name": "numpy"} and b["engine"] == {"name": "llama.cpp"}
    assert abs(a["reference"]["ppl"] / b["reference"]["ppl"] - 1) < 0.01, (a["reference"], b["reference"])
    assert abs(a["adapter_effect"]["kld_mean"] - b["adapter_effect"]["kld_mean"]) < 0.002
    assert a["adapter_effect"]["kld_mean"] > 0.01  # the adapter has an effect both engines must see (0.035)
    va, vb = ({v["name"]: v for v in r["variants"]} for r in (a, b))
    print(f"\nreference PPL numpy {a['reference']['ppl']:.4f} llama.cpp {b['reference']['ppl']:.4f}")
    for name in va:
        x, y = va[name], vb[name]
        print(
            f"{name:15} KLD {x['kld_mean']:.5f} {y['kld_mean']:.5f}  PPL {x['ppl']:.4f} {y['ppl']:.4f}  same top {x['same_top']:.4f} {y['same_top']:.4f}"
        )
    assert list(va) == list(vb) == ["base", "merged-Q4_K_M", "runtime-Q8_0"]
    for name in va:
        x, y = va[name], vb[name]
        assert abs(x["ppl"] / y["ppl"] - 1) < 0.01, (name, x["ppl"], y["ppl"])
        assert abs(x["kld_mean"] - y["kld_mean"]) < 0.002, (name, x["kld_mean"], y["kld_mean"])
        # same top over 508 tokens moves in steps of 0.002; measured up to 0.0197 apart (runtime-Q8_0)
        assert abs(x["same_top"] - y["same_top"]) < 0.04, (name, x["same_top"], y["same_top"])


def test_runtime_lora_logits_match_the_numpy_engine(files):
    """Logit level, one chunk: the F16 base + the F16 GGUF LoRA at scale 0.5, both engines. On F16 the
    engines agree to ~1e-6 KLD (on a quantized base the Q8_K/Q8_0 rounding floor is ~0.02 per
    position, too coarse to see a wrong scale), so a LoRA silently not applied, or applied with
    another alpha/rank scale, fails by orders of magnitude."""
    if not GPL.exists():
        pytest.skip("the GPL v3 text (Debian base-files) is not installed")
    _, toks, _ = evaluation_tokens(files["base"], GPL, 64, 1)
    rows = slice(32, 63)

    def logits(eng) -> np.ndarray:
        out: list[np.ndarray] = []
        eng.run(toks, lambda i, lg: out.append(lg), rows=rows)
        return out[0].astype(np.float64)

    lora = [(files["lora"], 0.5)]
    with LlamaCppEngine(files["base"], lora, threads=2) as e:
        got = logits(e)
    with LlamaCppEngine(files["base"], [(files["lora"], 1.0)], threads=2) as e:
        full = logits(e)
    want = logits(Engine(files["base"], lora, threads=2))
    assert got.shape == want.shape == (31, 49152)

    def lsm(x: np.ndarray) -> np.ndarray:
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    def kld(p: np.ndarray, q: np.ndarray) -> float:
        lp, lq = lsm(p), lsm(q)
        return float((np.exp(lp) * (lp - lq)).sum(-1).mean())

    assert kld(want, got) < 1e-4, kld(want, got)
    assert kld(want, full) > 100 * kld(want, got), (kld(want, full), kld(want, got))  # the scale matters
