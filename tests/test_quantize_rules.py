"""llama-quantize's per-tensor type plan, checked against llama.cpp's own outputs.

The SmolLM2 table is reference §4.5, which was verified with `llama-quantize --dry-run` and the
reference quant logs; the byte-level interop tests compare whole files with llama.cpp."""

from __future__ import annotations

import pytest

from loraq.ggml_types import file_type
from loraq.gguf_io import open_gguf
from loraq.quantize.driver import QuantizeOptions, plan_quantize
from loraq.quantize.rules import iteration_order, use_more_bits

UMB30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_use_more_bits_matches_reference_example():
    assert {i for i in range(30) if use_more_bits(i, 30)} == UMB30


def test_iteration_order_is_layer_then_bytes():
    names = ["blk.10.attn_q.weight", "token_embd.weight", "blk.2.ffn_up.weight", "blk.2.attn_k.weight", "output_norm.weight"]
    assert iteration_order(names) == [
        "output_norm.weight",
        "token_embd.weight",
        "blk.2.attn_k.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight",
    ]


def _plan(path, ftype, **kw):
    with open_gguf(path) as f:
        plan, _ = plan_quantize(f, file_type(ftype), QuantizeOptions(**kw), dry_run=True)
    return {e.name: e.dst.name for e in plan}


def _smol_expect(ftype: str, name: str) -> str:
    """Reference §4.5's table for SmolLM2-135M (30 layers, n_embd 576, n_ff 1536, tied)."""
    if name.endswith("_norm.weight"):
        return "f32"
    if name == "token_embd.weight":
        return "q8_0"
    layer = int(name.split(".")[1])
    kind = name.split(".")[2]
    umb = layer in UMB30
    table = {
        "Q8_0": lambda: "q8_0",
        "Q4_0": lambda: "q4_0",
        "Q4_1": lambda: "q4_1",
        "Q5_0": lambda: "q5_0",
        "Q5_1": lambda: "q5_1",
        "Q2_K": lambda: {"attn_v": "q4_0", "ffn_down": "q3_K"}.get(kind, "q4_0"),
        "Q3_K_M": lambda: {
            "attn_output": "q5_0",
            "attn_v": "q5_1" if layer < 2 else "q5_0",
            "ffn_down": "q5_K" if layer < 30 // 16 else "q4_K",
        }.get(kind, "q4_0"),
        "Q4_K_M": lambda: {"attn_v": "q8_0" if umb else "q5_0", "ffn_down": "q6_K" if umb else "q4_K"}.get(kind, "q5_0"),
        "Q5_K_M": lambda: {"attn_v": "q8_0" if umb else "q5_1", "ffn_down": "q6_K" if umb else "q5_K"}.get(kind, "q5_1"),
        "Q6_K": lambda: "q6_K" if kind == "ffn_down" else "q8_0",
        "IQ4_NL": lambda: ("q5_K" if layer < 3 else "iq4_nl") if kind == "ffn_down" else "iq4_nl",
        "IQ4_XS": lambda: ("q5_K" if layer < 3 else "iq4_xs") if kind == "ffn_down" else "iq4_nl",
    }
    return table[ftype]()


@pytest.mark.parametrize(
    "ftype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]
)
def test_smollm2_plan_matches_llama_quantize(smollm2_f16, ftype):
    plan = _plan(smollm2_f16, ftype)
    assert len(plan) == 272
    wrong = {n: (t, _smol_expect(ftype, n)) for n, t in plan.items() if t != _smol_expect(ftype, n)}
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {list(wrong.items())[:5]}"


def test_float_ftypes_apply_no_rules(smollm2_f16):
    plan = _plan(smollm2_f16, "BF16")
    assert {t for n, t in plan.items() if not n.endswith("_norm.weight")} == {"bf16"}


def test_overrides_and_flags(smollm2_f16):
    plan = _plan(smollm2_f16, "Q4_0", tensor_types=[("attn_v", "q8_0"), ("attn", "q5_0")], token_embedding_type="f16")
    assert plan["blk.3.attn_v.weight"] == "q8_0"  # first matching pattern wins
    assert plan["blk.3.attn_q.weight"] == "q5_0"
    assert plan["blk.3.ffn_up.weight"] == "q4_0"
    assert plan["token_embd.weight"] == "f16"  # --token-embedding-type: no rules, no fallback
    pure = _plan(smollm2_f16, "Q4_K_M", pure=True)
    # --pure skips the mixture rules; the shape fallback still applies (576 % 256 != 0)
    assert pure["blk.0.ffn_down.weight"] == "q4_K" and pure["blk.0.attn_v.weight"] == "q5_0"


def test_requantize_needs_flag(smollm2_q4_1):
    from loraq.errors import BadArguments

    with open_gguf(smollm2_q4_1) as f, pytest.raises(BadArguments, match="--allow-requantize"):
        plan_quantize(f, file_type("Q8_0"), QuantizeOptions(), dry_run=True)
