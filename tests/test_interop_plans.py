"""Interop: for every ftype, loraq's whole output file equals llama.cpp's (`llama_model_quantize`,
byte-identical to llama-quantize) on four model shapes: the real SmolLM2 (shape fallbacks), a
synthetic model with 256-multiple widths, a GQA model with n_gqa = 4, and an 8-expert MoE model.
A byte mismatch first reports which tensors got a different type, then which differ in bytes."""

from __future__ import annotations

import gguf
import pytest

from conftest import llama_quantize
from loraq.ggml_types import file_type
from loraq.gguf_io import open_gguf
from loraq.kernels import can_quantize
from loraq.quantize.driver import QuantizeOptions, plan_quantize, quantize_model
from scripts import make_synthetic_model as mk_model

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")

FTYPES = [
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
]


@pytest.fixture(scope="module")
def models(smollm2_f16, smollm2_q4_1, synth256, tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    gqa = mk_model.make_model(d / "gqa4.gguf", smollm2_q4_1, n_embd=256, n_ff=512, n_layer=8, n_head=8, n_head_kv=2, seed=3)
    moe = mk_model.make_model(
        d / "moe8.gguf", smollm2_q4_1, n_embd=256, n_ff=256, n_layer=4, n_head=4, n_head_kv=4, n_expert=8, tied=False, seed=4
    )
    return {"smollm2": smollm2_f16, "synth256": synth256, "gqa4": gqa, "moe8": moe}


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("model", ["smollm2", "synth256", "gqa4", "moe8"])
def test_file_equalsllama_quantize(models, tmp_path, model, ftype):
    src = models[model]
    ft = file_type(ftype)
    with open_gguf(src) as f:
        plan, _ = plan_quantize(f, ft, QuantizeOptions(), dry_run=True)
    missing = sorted({e.dst.name for e in plan if not can_quantize(e.dst)})
    if missing:
        pytest.skip(f"kernels not implemented yet: {missing}")
    ours, theirs = tmp_path / "loraq.gguf_io", tmp_path / "llama.gguf"
    quantize_model(src, ours, ftype, QuantizeOptions(threads=2))
    llama_quantize(src, theirs, ft.id)
    a, b = _types(ours), _types(theirs)
    diff = {n: (a[n], b.get(n)) for n in a if a[n] != b.get(n)}
    assert not diff, f"{len(diff)} tensor types differ (loraq, llama.cpp): {dict(list(diff.items())[:6])}"
    assert ours.read_bytes() == theirs.read_bytes()
