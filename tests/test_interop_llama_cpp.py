"""Interop: llama.cpp (llama-cpp-python) loads loraq's outputs and agrees with them.

Oracles here are llama.cpp itself: its runtime LoRA against loraq's merge, and its quantizer
(`llama_model_quantize`, byte-identical to llama-quantize) against loraq's quantize."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import llama_quantize
from scripts import make_demo_adapter

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")

TEXT = b"The quick brown fox jumps over the lazy dog. In 1776, the Declaration of Independence was"
LEGACY = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}


def _logits(path, lora=None, scale=1.0):
    # F32 KV cache: with the default F16 cache, two nearly equal models can round a K/V entry to
    # different F16 values, which would hide the comparison under cache noise.
    kw = dict(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0, type_v=0)
    if lora is not None:
        kw.update(lora_path=str(lora), lora_scale=scale)
    llm = llama_cpp.Llama(**kw)
    toks = llm.tokenize(TEXT, add_bos=True)
    llm.reset()
    llm.eval(toks)
    out = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    del llm
    return out


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_adapter(smollm2_f16, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter") / "demo"
    make_demo_adapter.make_adapter(smollm2_f16, d, rank=16, seed=1)
    return d


@pytest.fixture(scope="module")
def merged_f16(smollm2_f16, demo_adapter, tmp_path_factory):
    from loraq.merge import AdapterSpec, merge_model

    out = tmp_path_factory.mktemp("merged") / "merged-f16.gguf"
    merge_model(smollm2_f16, [AdapterSpec(demo_adapter, 1.0)], out, "f16")
    return out


def test_llama_cpp_loads_merged_and_quantized(merged_f16, tmp_path):
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    ref = _logits(merged_f16)
    assert np.isfinite(ref).all()
    q = tmp_path / "merged-Q8_0.gguf"
    quantize_model(merged_f16, q, "Q8_0", QuantizeOptions(threads=2))
    got = _logits(q)
    assert np.isfinite(got).all()
    # Q8_0 of the same model keeps the argmax almost everywhere
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("ftype", list(LEGACY))
def test_quantize_file_byte_identical_to_llama_cpp(merged_f16, tmp_path, ftype):
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    ours, theirs = tmp_path / f"loraq-{ftype}.gguf", tmp_path / f"llama-{ftype}.gguf"
    quantize_model(merged_f16, ours, ftype, QuantizeOptions(threads=2))
    llama_quantize(merged_f16, theirs, LEGACY[ftype])
    assert ours.stat().st_size == theirs.stat().st_size
    assert _sha(ours) == _sha(theirs)


def test_synthetic_256_file_byte_identical_to_llama_cpp(synth256, tmp_path):
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    for ftype in ("Q4_0", "Q8_0"):
        ours, theirs = tmp_path / f"loraq-{ftype}.gguf", tmp_path / f"llama-{ftype}.gguf"
        try:
            quantize_model(synth256, ours, ftype, QuantizeOptions(threads=2))
        except Exception as exc:  # the tied token_embd goes to q6_K: needs the K-quant kernels
            pytest.skip(f"needs a K type: {exc}")
        llama_quantize(synth256, theirs, LEGACY[ftype])
        assert _sha(ours) == _sha(theirs), ftype


def test_runtime_lora_matches_f32_merge(smollm2_q4_1, demo_adapter, tmp_path):
    """llama.cpp's runtime LoRA on the F32 base == loraq's F32 merge of the same adapter."""
    from loraq.convert import convert_adapter
    from loraq.merge import AdapterSpec, merge_model
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    base32 = tmp_path / "base-f32.gguf"
    quantize_model(smollm2_q4_1, base32, "F32", QuantizeOptions(allow_requantize=True, threads=2))
    lora32 = tmp_path / "adapter-f32.gguf"
    convert_adapter(demo_adapter, base32, lora32, outtype="f32")
    merged32 = tmp_path / "merged-f32.gguf"
    merge_model(base32, [AdapterSpec(lora32, 1.0)], merged32, "f32")

    runtime = _logits(base32, lora=lora32)
    merged = _logits(merged32)
    plain = _logits(base32)
    assert np.abs(runtime - merged).max() < 1e-3
    assert (runtime.argmax(-1) == merged.argmax(-1)).all()
    # and the adapter really changes the model (the comparison above is not vacuous)
    assert np.abs(runtime - plain).max() > 0.05
