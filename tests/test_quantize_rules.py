"""llama-quantize's per-tensor type plan (llama_tensor_get_type), docs/llama-cpp.md §4.3–4.6.

The SmolLM2 table is docs/llama-cpp.md §4.5, which was verified with `llama-quantize --dry-run` and the
reference quant logs; the byte-level interop tests compare whole files with llama.cpp. The
synthetic cases below drive TypePlanner through every branch (MoE, 70B, falcon, tied/untied,
options, fallback) with expected types written out from the reference's rules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loraq.errors import BadArguments, BadInput
from loraq.ggml_types import BY_NAME, F16, FileType, file_type
from loraq.gguf_io import open_gguf
from loraq.quantize.driver import QuantizeOptions, plan_quantize
from loraq.quantize.rules import ModelFacts, TypeOptions, TypePlanner, iteration_order, requires_imatrix, use_more_bits


def T(name: str):
    return BY_NAME[name.lower()]


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


# ---------------------------------------------------------------------------------------------
# Synthetic models: every branch of TypePlanner, with the expected types written out from
# docs/llama-cpp.md §4.2 (default types), §4.3–4.6, independently of loraq's code.

# §4.2: llama_ftype_get_default_type
DEFAULT = {
    "F32": "f32",
    "F16": "f16",
    "BF16": "bf16",
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "Q5_0": "q5_0",
    "Q5_1": "q5_1",
    "Q8_0": "q8_0",
    "Q2_K": "q2_K",
    "Q2_K_S": "q2_K",
    "Q3_K_S": "q3_K",
    "Q3_K_M": "q3_K",
    "Q3_K_L": "q3_K",
    "Q4_K_S": "q4_K",
    "Q4_K_M": "q4_K",
    "Q5_K_S": "q5_K",
    "Q5_K_M": "q5_K",
    "Q6_K": "q6_K",
    "IQ4_NL": "iq4_nl",
    "IQ4_XS": "iq4_xs",
    "TQ1_0": "tq1_0",
    "TQ2_0": "tq2_0",
}


def umb(n: int) -> set[int]:
    """§4.4 use_more_bits(i, n) = i < n/8 || i >= 7*n/8 || (i - n/8) % 3 == 2, C integer division."""
    return {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}


UMB8, UMB16, UMB80 = umb(8), umb(16), umb(80)


def test_umb_helper_is_the_reference_formula():
    assert {i for i in range(30) if umb(30) and i in umb(30)} == UMB30
    assert {0, 1, 4, 7, 10, 13, 14, 15} == UMB16
    assert {0, 3, 6, 7} == UMB8


def per_layer(n: int, base: str, **types: set[int] | range) -> dict[int, str]:
    """{layer: type}: `base` except on the layers listed for each type."""
    out = dict.fromkeys(range(n), base)
    for t, layers in types.items():
        for i in layers:
            out[i] = t
    return out


def n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing size-1 dimensions do not count."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


@dataclass(frozen=True)
class Model:
    arch: str = "llama"
    n_layer: int = 16
    n_head: int = 8
    n_head_kv: int = 8
    n_expert: int = 0
    tied: bool = False
    qkv: bool = False  # fused attn_qkv (falcon) instead of attn_q/k/v
    shexp: bool = False  # MoE shared expert: a second ffn_down-like tensor per layer
    n_embd: int = 512
    n_ff: int = 1024

    def tensors(self) -> dict[str, tuple[int, ...]]:
        e, f, v = self.n_embd, self.n_ff, 1000
        t: dict[str, tuple[int, ...]] = {"token_embd.weight": (e, v), "output_norm.weight": (e,)}
        if not self.tied:
            t["output.weight"] = (e, v)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            t[b + "attn_norm.weight"] = (e,)
            t[b + "ffn_norm.weight"] = (e,)
            if self.qkv:
                t[b + "attn_qkv.weight"] = (e, 3 * e)
            else:
                t |= {b + "attn_q.weight": (e, e), b + "attn_k.weight": (e, e // 4), b + "attn_v.weight": (e, e // 4)}
            t[b + "attn_output.weight"] = (e, e)
            if self.n_expert:
                t[b + "ffn_gate_inp.weight"] = (e, self.n_expert)
                for p, ne in (("gate", (e, f)), ("up", (e, f)), ("down", (f, e))):
                    t[f"{b}ffn_{p}_exps.weight"] = (*ne, self.n_expert)
                    if self.shexp:
                        t[f"{b}ffn_{p}_shexp.weight"] = ne
            else:
                t |= {b + "ffn_gate.weight": (e, f), b + "ffn_up.weight": (e, f), b + "ffn_down.weight": (f, e)}
        return t

    def facts(self) -> ModelFacts:
        wv = sum(any(k in n for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")) for n in self.tensors())
        return ModelFacts(self.arch, self.n_layer, self.n_head, self.n_head_kv, self.n_expert, not self.tied, wv)


def plan_types(ftype: FileType | str, model: Model, tensors: dict[str, tuple[int, ...]] | None = None, **opts) -> dict[str, str]:
    ft = file_type(ftype) if isinstance(ftype, str) else ftype
    tensors = tensors if tensors is not None else model.tensors()
    planner = TypePlanner(ft, model.facts(), TypeOptions(**opts))
    return {n: planner.choose(n, tensors[n], F16, n_dims(tensors[n])).type.name for n in iteration_order(list(tensors))}


def _key(name: str) -> str:
    if name in ("token_embd.weight", "output.weight"):
        return name.removesuffix(".weight")
    stem = name.split(".")[2].removesuffix("_exps").removesuffix("_shexp")
    return "attn_v" if stem == "attn_qkv" else stem


def expected_types(ftype: str, model: Model, spec: dict[str, str | dict[int, str]]) -> dict[str, str]:
    """Every tensor's type: `spec` per category (a type, or {layer: type}), else the default;
    norms and the MoE router are never quantized (they stay F16 here)."""
    out = {}
    for name in model.tensors():
        if name.endswith("_norm.weight") or "ffn_gate_inp" in name:
            out[name] = "f16"
            continue
        v = spec.get(_key(name), DEFAULT[ftype])
        out[name] = v[int(name.split(".")[1])] if isinstance(v, dict) else v
    return out


DENSE = Model()  # 16 layers, n_gqa 1, untied: n/8 = 2, n/16 = 1
GQA4 = Model(n_head=32, n_head_kv=8)  # n_gqa 4
TIED = Model(tied=True)
L70B = Model(n_layer=80, n_head=64, n_head_kv=8)  # llama, 80 layers, n_head != n_head_kv: LLM_TYPE_70B
L65B = Model(n_layer=80, n_head=64, n_head_kv=64)  # 80 layers but n_head == n_head_kv: not 70B
FALCON = Model(arch="falcon", qkv=True)
MOE8 = Model(n_layer=8, n_head=32, n_head_kv=8, n_expert=8)  # n/8 = 1
MOE4 = Model(n_layer=8, n_expert=4, shexp=True)  # MoE, not 8 experts: ffn layer parsed from the name

D = DENSE.n_layer
CASES = [
    # --- legacy ftypes: only R1 (output q6_K, or q8_0 for Q8_0); imatrix: R8 last line
    ("Q4_0", DENSE, {}, {"output": "q6_K"}),
    ("Q4_0", DENSE, {"has_imatrix": True}, {"output": "q6_K", "ffn_down": per_layer(D, "q4_0", q4_1={0, 1})}),
    ("Q5_0", DENSE, {"has_imatrix": True}, {"output": "q6_K", "ffn_down": per_layer(D, "q5_0", q5_1={0, 1})}),
    ("Q5_0", DENSE, {}, {"output": "q6_K"}),
    ("Q4_1", DENSE, {"has_imatrix": True}, {"output": "q6_K"}),
    ("Q5_1", DENSE, {}, {"output": "q6_K"}),
    ("Q8_0", DENSE, {}, {}),
    ("Q8_0", TIED, {}, {}),
    ("Q4_0", TIED, {}, {"token_embd": "q6_K"}),
    # --- K ftypes, dense, n_gqa 1 then 4
    ("Q2_K", DENSE, {}, {"output": "q6_K", "attn_v": "q3_K", "ffn_down": "q3_K", "attn_output": "q3_K"}),
    ("Q2_K", GQA4, {}, {"output": "q6_K", "attn_v": "q4_K", "ffn_down": "q3_K", "attn_output": "q3_K"}),
    ("Q2_K_S", DENSE, {}, {"output": "q6_K", "ffn_down": per_layer(D, "q2_K", q4_K={0, 1})}),
    ("Q2_K_S", GQA4, {}, {"output": "q6_K", "attn_v": "q4_K", "ffn_down": per_layer(D, "q2_K", q4_K={0, 1})}),
    ("Q3_K_S", DENSE, {}, {"output": "q6_K"}),
    (
        "Q3_K_M",
        DENSE,
        {},
        {"output": "q6_K", "attn_v": per_layer(D, "q4_K", q5_K={0, 1}), "ffn_down": per_layer(D, "q4_K", q5_K={0}), "attn_output": "q4_K"},
    ),
    ("Q3_K_L", DENSE, {}, {"output": "q6_K", "attn_v": "q5_K", "ffn_down": "q5_K", "attn_output": "q5_K"}),
    ("Q4_K_S", DENSE, {}, {"output": "q6_K", "attn_v": per_layer(D, "q4_K", q5_K=range(4)), "ffn_down": per_layer(D, "q4_K", q5_K={0, 1})}),
    ("Q4_K_M", DENSE, {}, {"output": "q6_K", "attn_v": per_layer(D, "q4_K", q6_K=UMB16), "ffn_down": per_layer(D, "q4_K", q6_K=UMB16)}),
    ("Q4_K_M", TIED, {}, {"token_embd": "q6_K", "attn_v": per_layer(D, "q4_K", q6_K=UMB16), "ffn_down": per_layer(D, "q4_K", q6_K=UMB16)}),
    ("Q5_K_S", DENSE, {}, {"output": "q6_K"}),
    ("Q5_K_M", DENSE, {}, {"output": "q6_K", "attn_v": per_layer(D, "q5_K", q6_K=UMB16), "ffn_down": per_layer(D, "q5_K", q6_K=UMB16)}),
    ("Q6_K", DENSE, {}, {"output": "q6_K"}),
    # --- IQ4: attn_v only with n_gqa >= 4; ffn_down i < n/8 only without an imatrix
    ("IQ4_NL", DENSE, {}, {"output": "q6_K", "ffn_down": per_layer(D, "iq4_nl", q5_K={0, 1})}),
    ("IQ4_NL", GQA4, {"has_imatrix": True}, {"output": "q6_K", "attn_v": "q5_K"}),
    ("IQ4_XS", GQA4, {}, {"output": "q6_K", "attn_v": "q5_K", "ffn_down": per_layer(D, "iq4_xs", q5_K={0, 1})}),
    ("IQ4_XS", DENSE, {"has_imatrix": True}, {"output": "q6_K"}),
    # --- ternary: untied token_embd q4_K (R3); tied it is R1's q6_K
    ("TQ1_0", DENSE, {}, {"output": "q6_K", "token_embd": "q4_K"}),
    ("TQ2_0", DENSE, {}, {"output": "q6_K", "token_embd": "q4_K"}),
    ("TQ2_0", TIED, {}, {"token_embd": "q6_K"}),
    # --- float ftypes: no rules at all
    ("F16", DENSE, {}, {}),
    ("BF16", TIED, {}, {}),
    ("F32", GQA4, {}, {}),
    # --- 70B: attn_v q3_K/q4_K -> q5_K after the other attn_v rules
    ("Q3_K_S", L70B, {}, {"output": "q6_K", "attn_v": "q5_K"}),
    ("Q3_K_S", L65B, {}, {"output": "q6_K"}),
    ("Q2_K", L70B, {}, {"output": "q6_K", "attn_v": "q5_K", "ffn_down": "q3_K", "attn_output": "q3_K"}),
    ("Q3_K_M", L70B, {}, {"output": "q6_K", "attn_v": "q5_K", "ffn_down": per_layer(80, "q4_K", q5_K=range(5)), "attn_output": "q4_K"}),
    ("Q4_K_M", L70B, {}, {"output": "q6_K", "attn_v": per_layer(80, "q5_K", q6_K=UMB80), "ffn_down": per_layer(80, "q4_K", q6_K=UMB80)}),
    ("Q5_K_M", L70B, {}, {"output": "q6_K", "attn_v": per_layer(80, "q5_K", q6_K=UMB80), "ffn_down": per_layer(80, "q5_K", q6_K=UMB80)}),
    # --- falcon (fused attn_qkv counts as attn_v): output q8_0; its own ffn_down and attn_output lines
    ("Q4_0", FALCON, {}, {"output": "q8_0"}),
    ("Q2_K", FALCON, {}, {"output": "q8_0", "attn_v": "q3_K", "ffn_down": "q3_K"}),
    (
        "Q3_K_M",
        FALCON,
        {},
        {"output": "q8_0", "attn_v": per_layer(D, "q4_K", q5_K={0, 1}), "ffn_down": per_layer(D, "q3_K", q4_K=UMB16, q5_K={0})},
    ),
    ("Q3_K_L", FALCON, {}, {"output": "q8_0", "attn_v": "q5_K", "ffn_down": "q4_K", "attn_output": "q4_K"}),
    (
        "Q4_K_M",
        FALCON,
        {},
        {"output": "q8_0", "attn_v": per_layer(D, "q4_K", q6_K=UMB16), "ffn_down": per_layer(D, "q4_K", q5_K=UMB16, q6_K={0})},
    ),
    ("Q4_K_S", FALCON, {}, {"output": "q8_0", "attn_v": per_layer(D, "q4_K", q5_K=range(4))}),
    # --- 8 experts: attn_v and attn_k q8_0 for any ftype; attn_output q5_K for the listed ftypes
    ("Q4_0", MOE8, {}, {"output": "q6_K", "attn_v": "q8_0", "attn_k": "q8_0"}),
    ("Q2_K", MOE8, {}, {"output": "q6_K", "attn_v": "q8_0", "attn_k": "q8_0", "attn_output": "q5_K", "ffn_down": "q3_K"}),
    ("Q3_K_M", MOE8, {}, {"output": "q6_K", "attn_v": "q8_0", "attn_k": "q8_0", "attn_output": "q5_K", "ffn_down": "q4_K"}),
    ("Q3_K_L", MOE8, {}, {"output": "q6_K", "attn_v": "q8_0", "attn_k": "q8_0", "ffn_down": "q5_K"}),
    (
        "Q4_K_M",
        MOE8,
        {},
        {"output": "q6_K", "attn_v": "q8_0", "attn_k": "q8_0", "attn_output": "q5_K", "ffn_down": per_layer(8, "q4_K", q6_K=UMB8)},
    ),
    ("Q5_K_M", MOE8, {}, {"output": "q6_K", "attn_v": "q8_0", "attn_k": "q8_0", "ffn_down": per_layer(8, "q5_K", q6_K=UMB8)}),
    # --- 4 experts + shared expert: two ffn_down tensors per layer, the layer comes from the name
    ("Q2_K_S", MOE4, {}, {"output": "q6_K", "ffn_down": per_layer(8, "q2_K", q4_K={0})}),
    ("Q4_K_M", MOE4, {}, {"output": "q6_K", "attn_v": per_layer(8, "q4_K", q6_K=UMB8), "ffn_down": per_layer(8, "q4_K", q6_K=UMB8)}),
]


@pytest.mark.parametrize(
    "ftype, model, opts, spec",
    CASES,
    ids=[
        f"{f}-{['dense', 'gqa4', 'tied', '70b', '65b', 'falcon', 'moe8', 'moe4'][[DENSE, GQA4, TIED, L70B, L65B, FALCON, MOE8, MOE4].index(m)]}"
        + ("-imatrix" if o.get("has_imatrix") else "")
        for f, m, o, _ in CASES
    ],
)
def test_synthetic_plan_follows_reference_rules(ftype, model, opts, spec):
    got = plan_types(ftype, model, **opts)
    want = expected_types(ftype, model, spec)
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not wrong, f"{len(wrong)} tensors differ (got, want), e.g. {list(wrong.items())[:6]}"


def test_low_bit_iq_ftypes_get_q5_k_output():
    """R1: IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ2_S, IQ2_M, IQ1_M -> q5_K for output / tied token_embd.
    (loraq offers none of these ftypes yet; only R1 knows about them.)"""
    iq2 = FileType("IQ2_XXS", 19, "iq2_xxs", "IQ2_XXS - 2.0625 bpw")
    for model in (DENSE, TIED):
        t = {"token_embd.weight" if model.tied else "output.weight": (512, 1000)}
        assert plan_types(iq2, model, t) == {next(iter(t)): "q5_K"}


# --- what is never quantized (§4.3), categories (§4.4), and the options (§4.1, §4.4 steps 1-7)


@pytest.mark.parametrize(
    "name, ne",
    [
        ("blk.0.attn_norm.weight", (512,)),
        ("blk.0.attn_q.weight", (512, 1)),  # [N, 1] counts as 1-D
        ("blk.0.attn_q.bias", (512, 512)),  # not ending in "weight"
        ("blk.0.ffn_gate_inp.weight", (512, 8)),
        ("position_embd.weight", (512, 512)),
        ("token_types.weight", (512, 2)),
        ("blk.0.ssm_conv1d.weight", (512, 4)),
        ("blk.0.time_mix_first.weight", (512, 512)),
        ("v.blk.0.attn_rel_b.weight", (512, 512)),
        ("v.patch_embd.weight", (512, 512)),
    ],
)
def test_never_quantized(name, ne):
    c = TypePlanner(file_type("Q4_0"), DENSE.facts(), TypeOptions()).choose(name, ne, F16, n_dims(ne))
    assert (c.quantize, c.type.name) == (False, "f16")


def test_leave_output_tensor():
    p = TypePlanner(file_type("Q4_K_M"), DENSE.facts(), TypeOptions(leave_output_tensor=True))
    c = p.choose("output.weight", (512, 1000), F16, 2)
    assert (c.quantize, c.type.name) == (False, "f16")


def test_other_categories():
    """attn_kv_b is attn_v-like (Q2_K: q3_K); a tensor of no category keeps the default;
    per_layer_token_embd is token_embd (tied: R1)."""
    m = Model(n_layer=1, tied=True)
    got = plan_types(
        "Q2_K", m, {"blk.0.attn_kv_b.weight": (512, 512), "blk.0.ssm_in.weight": (512, 512), "per_layer_token_embd.weight": (512, 512)}
    )
    assert got == {"per_layer_token_embd.weight": "q6_K", "blk.0.attn_kv_b.weight": "q3_K", "blk.0.ssm_in.weight": "q2_K"}


def test_type_options():
    q4k, q8 = T("q4_K"), T("q8_0")
    small = {"token_embd.weight": (576, 1000), "output.weight": (576, 1000), "per_layer_token_embd.weight": (576, 1000)}
    # --token-embedding-type / --output-tensor-type: returned as they are, no shape fallback
    got = plan_types("Q4_0", DENSE, small, token_embedding_type=q4k, output_tensor_type=q4k)
    assert got == dict.fromkeys(small, "q4_K")
    # per_layer_token_embd with a matching --tensor-type: the override (then the fallback) instead
    got = plan_types("Q4_0", DENSE, small, token_embedding_type=q8, tensor_types=[("PER_LAYER", q4k)])
    # (output: R1 q6_K, which does not fit 576 and falls back to q8_0)
    assert got == {"token_embd.weight": "q8_0", "output.weight": "q8_0", "per_layer_token_embd.weight": "q5_0"}
    # tied: token_embd takes --output-tensor-type through R1, and the fallback applies
    tied = {"token_embd.weight": (576, 1000), "blk.0.attn_q.weight": (512, 512)}
    assert plan_types("Q4_0", TIED, tied, output_tensor_type=q4k) == {"token_embd.weight": "q5_0", "blk.0.attn_q.weight": "q4_0"}
    assert plan_types("Q4_0", TIED, {"token_embd.weight": (512, 1000)}, output_tensor_type=q4k) == {"token_embd.weight": "q4_K"}
    # first matching --tensor-type wins (lowercased pattern); the fallback still applies after it
    t = {"blk.0.attn_v.weight": (576, 512), "blk.0.attn_q.weight": (512, 512), "blk.0.ffn_up.weight": (512, 1024)}
    got = plan_types("Q4_K_M", DENSE, t, tensor_types=[("ATTN_V", T("q6_K")), ("attn", T("q5_K"))])
    assert got == {"blk.0.attn_q.weight": "q5_K", "blk.0.attn_v.weight": "q8_0", "blk.0.ffn_up.weight": "q4_K"}
    # --pure: no rules (output keeps the default); the fallback applies
    got = plan_types("Q4_K_M", DENSE, {"output.weight": (512, 1000), "blk.0.attn_v.weight": (576, 512)}, pure=True)
    assert got == {"output.weight": "q4_K", "blk.0.attn_v.weight": "q5_0"}
    with pytest.raises(BadArguments, match="regular expression"):
        TypePlanner(file_type("Q4_0"), DENSE.facts(), TypeOptions(tensor_types=[("attn_(", q8)]))


def test_output_row_not_a_multiple_of_the_default_block_is_q8_0():
    """R1: ne0 % blck(default) != 0 -> q8_0 directly; ne0 % 32 == 0 but 576 % 256 != 0 for Q4_0:
    R1 gives q6_K and the fallback makes it q8_0 (the SmolLM2 example of §4.5)."""
    assert plan_types("Q4_K_M", DENSE, {"output.weight": (576, 1000)}) == {"output.weight": "q8_0"}
    assert plan_types("Q4_0", DENSE, {"output.weight": (576, 1000)}) == {"output.weight": "q8_0"}
    # 48 % 32 != 0: R1 gives q8_0, which does not fit either, so the fallback makes it f16
    assert plan_types("Q4_0", DENSE, {"output.weight": (48, 1000)}) == {"output.weight": "f16"}


@pytest.mark.parametrize(
    "target, ne0, want",
    [
        ("q4_K", 576, "q5_0"),
        ("q5_K", 576, "q5_1"),
        ("q6_K", 576, "q8_0"),
        ("q2_K", 576, "q4_0"),
        ("q3_K", 576, "q4_0"),
        ("tq1_0", 576, "q4_0"),
        ("tq2_0", 576, "q4_0"),
        ("iq4_xs", 576, "iq4_nl"),
        ("iq2_xxs", 576, "iq4_nl"),
        ("q4_K", 48, "f16"),  # the replacement q5_0 does not fit either
        ("q8_0", 48, "f16"),  # no replacement, block <= 32
        ("q4_K", 512, "q4_K"),  # fits: no fallback
    ],
)
def test_shape_fallback(target, ne0, want):
    p = TypePlanner(file_type("Q4_0"), DENSE.facts(), TypeOptions(tensor_types=[("attn_q", T(target))]))
    assert p.choose("blk.0.attn_q.weight", (ne0, 512), F16, 2).type.name == want
    assert p.n_fallback == (want != target)


def test_no_fallback_for_wide_blocks_is_an_error():
    p = TypePlanner(file_type("Q4_0"), DENSE.facts(), TypeOptions(tensor_types=[("attn_q", T("q8_K"))]))
    with pytest.raises(BadArguments, match="no fallback type"):
        p.choose("blk.0.attn_q.weight", (576, 512), F16, 2)


@pytest.mark.parametrize("name", ["blk.8.ffn_down_exps.weight", "ffn_up_exps.weight"])
def test_moe_ffn_tensor_needs_a_layer(name):
    p = TypePlanner(file_type("Q4_K_M"), MOE4.facts(), TypeOptions())
    with pytest.raises(BadInput, match="cannot determine the layer"):
        p.choose(name, (512, 1024, 4), F16, 3)


def test_no_kv_heads_is_not_gqa():
    facts = ModelFacts("llama", 1, 8, 0, 0, True, 1)
    p = TypePlanner(file_type("Q2_K"), facts, TypeOptions())
    assert p.choose("blk.0.attn_v.weight", (512, 512), F16, 2).type.name == "q3_K"


@pytest.mark.parametrize(
    "ftype, target, name, needs",
    [
        ("Q2_K", "q2_K", "blk.0.attn_q.weight", False),
        ("Q2_K_S", "q2_K", "blk.0.attn_q.weight", True),
        ("Q2_K_S", "q2_K", "token_embd.weight", False),
        ("Q2_K_S", "q2_K", "output.weight", False),
        ("Q4_0", "iq2_xxs", "blk.0.attn_q.weight", True),
        ("Q4_0", "iq1_m", "blk.0.attn_q.weight", True),
        ("Q4_0", "iq4_xs", "blk.0.attn_q.weight", False),
        ("Q4_K_M", "q4_K", "blk.0.attn_q.weight", False),
    ],
)
def test_requires_imatrix(ftype, target, name, needs):
    assert requires_imatrix(file_type(ftype), T(target), name) is needs
