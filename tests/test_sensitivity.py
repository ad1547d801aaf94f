"""Per-tensor sensitivity probes (loraq/imatrix/sensitivity.py) and the mix's erasure check.

Each probe's KLD is checked against an independent computation: the model file rewritten with that
one tensor quantized to the probe type (loraq's quantizer is byte-identical to ggml's), both files
run whole by the engine, and the KL divergence taken on the chunks' second halves. The erasure
check is checked on a base constructed on q4_1's grid, where rounding W + ΔW back to that grid must
undo the delta and a finer symmetric grid must not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraq.errors import BadArguments, BadInput
from loraq.ggml_types import ggml_type
from loraq.imatrix.sensitivity import Sensitivity, measure_sensitivity, read_sensitivity, write_sensitivity
from loraq.kernels import dequantize, quantize
from loraq.llama.calibration import calibration_tokens
from loraq.llama.engine import chunk_tokens, logits_for
from loraq.quantize.driver import QuantizeOptions, quantize_model
from loraq.quantize.mix import MAX_ERASED, _fill_sensitivity, row_errors

TEXT = "Pack my box with five dozen liquor jugs, then sphinx of black quartz judge my vow. " * 40
CTX, CHUNKS = 64, 2


def _kld_second_half(ref: np.ndarray, got: np.ndarray) -> float:
    def logp(x: np.ndarray) -> np.ndarray:
        x = x[:, CTX // 2 :].reshape(-1, x.shape[-1]).astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lr, lg = logp(ref), logp(got)
    return float(np.mean((np.exp(lr) * (lr - lg)).sum(axis=1)))


@pytest.mark.parametrize(
    "name",
    [
        "blk.1.ffn_down.weight",
        pytest.param("blk.2.attn_k.weight", marks=pytest.mark.slow),
        pytest.param("token_embd.weight", marks=pytest.mark.slow),
    ],
)
def test_a_probe_is_the_kld_of_that_tensor_quantized_alone(synth256, tmp_path, name):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    got = measure_sensitivity(synth256, text, [name], ctx=CTX, chunks=CHUNKS)
    kld, sq = got.tensors[name]

    # the oracle: a file with only that tensor in q4_0, both files run from the start
    one = tmp_path / "one.gguf"
    quantize_model(synth256, one, "Q4_0", QuantizeOptions(tensor_types=[(f"^{name.replace('.', '[.]')}$", "q4_0"), (".", "f16")]))
    cal = calibration_tokens(synth256, text, CHUNKS * CTX + 1)
    toks = chunk_tokens(cal.tokens, CTX, CHUNKS, bos=cal.bos)
    want = _kld_second_half(logits_for(synth256, toks, emulate_activations=False), logits_for(one, toks, emulate_activations=False))
    assert want > 0
    assert kld == pytest.approx(want, rel=1e-3, abs=1e-7)

    from loraq.gguf_io import open_gguf
    from loraq.kernels import read_f32

    with open_gguf(synth256) as a, open_gguf(one) as b:
        e = read_f32(b, b.tensor(name)) - read_f32(a, a.tensor(name))
    assert sq == pytest.approx(float((e.astype(np.float64) ** 2).sum()), rel=1e-5)


def test_blocks_read_again_per_probe_give_the_same_values(synth256, tmp_path, monkeypatch):
    """Past CACHE_BYTES (a model bigger than memory allows) each probe reads its blocks again."""
    import loraq.imatrix.sensitivity as sens

    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    names = ["blk.0.attn_v.weight", "blk.3.ffn_up.weight"]
    kept = measure_sensitivity(synth256, text, names, ctx=CTX, chunks=1)
    monkeypatch.setattr(sens, "CACHE_BYTES", 0)
    again = measure_sensitivity(synth256, text, names, ctx=CTX, chunks=1)
    assert again.tensors == kept.tensors and all(v[0] > 0 for v in kept.tensors.values())


def test_the_probe_leaves_the_fine_tunes_delta_alone(synth256, tmp_path):
    """With the base, the probe's error is orthogonal to merged − base."""
    from loraq.imatrix.sensitivity import probe_error

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    delta = (0.05 * rng.standard_normal((64, 4)) @ rng.standard_normal((4, 256))).astype(np.float32)
    e = probe_error(w + delta, "q4_0", delta)
    assert abs(float((e.astype(np.float64) * delta).sum())) < 1e-4 * float(np.linalg.norm(e) * np.linalg.norm(delta))
    assert float((probe_error(w + delta, "q4_0", None) * delta).sum()) != pytest.approx(0.0, abs=1e-6)


def test_a_grid_the_base_lies_on_erases_the_delta():
    """A base dequantized from q4_1 (the demo's SmolLM2): q4_1 snaps W + ΔW back to W; q8_0 does not."""
    rng = np.random.default_rng(1)
    t41 = ggml_type("q4_1")
    raw = rng.standard_normal((128, 256)).astype(np.float32)
    base = dequantize(quantize(raw, t41, None), t41, raw.shape)
    delta = (1e-3 * rng.standard_normal((128, 8)) @ rng.standard_normal((8, 256))).astype(np.float32)
    merged = np.ascontiguousarray(base + delta)
    assert row_errors(merged, t41, None, delta)[2] > 0.8 > MAX_ERASED
    assert abs(row_errors(merged, ggml_type("q8_0"), None, delta)[2]) < 0.1
    # on a base that lies on no grid the delta survives every type
    merged2 = np.ascontiguousarray(raw + delta)
    assert abs(row_errors(merged2, t41, None, delta)[2]) < MAX_ERASED


def test_unprobed_tensors_take_their_kinds_median():
    got = _fill_sensitivity(
        {"blk.0.attn_q.weight": 1.0, "blk.1.attn_q.weight": 3.0, "blk.0.ffn_up.weight": 10.0},
        ["blk.2.attn_q.weight", "blk.2.ffn_up.weight", "output.weight"],
    )
    assert got == {"blk.2.attn_q.weight": 2.0, "blk.2.ffn_up.weight": 10.0, "output.weight": 3.0}


def test_the_file_round_trips_and_hostile_files_are_one_line(tmp_path):
    s = Sensitivity("q4_0", 64, 2, {"blk.0.attn_q.weight": (0.5, 2.0)})
    p = write_sensitivity(tmp_path / "s.json", s)
    back = read_sensitivity(p)
    assert back.tensors == s.tensors and back.per_unit("blk.0.attn_q.weight") == 0.25
    for body in (
        "not json",
        "[]",
        '{"format": "x", "tensors": {}}',
        json.dumps({"format": "loraq-sensitivity-1", "tensors": {"a": {"kld": -1, "noise_sq": 1}}}),
    ):
        (tmp_path / "bad.json").write_text(body)
        with pytest.raises(BadInput):
            read_sensitivity(tmp_path / "bad.json")
    with pytest.raises(BadArguments):
        measure_sensitivity(tmp_path / "missing.gguf", tmp_path / "t.txt", ctx=1)
