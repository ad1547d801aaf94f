"""llama-quantize's per-tensor type selection (llama_tensor_get_type), docs/llama-cpp.md §4.3–4.6.

The rules are order-dependent: counters for attn_v and ffn_* advance in llama.cpp's tensor
iteration order (layer number, then name), so `TypePlanner.choose` must be called in that order
(`iteration_order`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import regex

from ..errors import BadArguments, BadInput, shown
from ..ggml_types import BY_NAME, F16, FileType, GGMLType

_BLK = re.compile(r"^blk\.(\d+)\.")

# Substrings / exact names that llama-quantize never quantizes (tensor_allows_quantization).
_NEVER_SUBSTR = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_EXACT = ("position_embd.weight", "token_types.weight")
_RWKV = tuple(
    f"time_mix_{s}.weight"
    for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1", "decay_w2", "lerp_fused")
)
# Target types that need an importance matrix (tensor_requires_imatrix).
_NEEDS_IMATRIX = {"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"}
# The ftypes llama-quantize refuses to write without one (their mixes use the types above, or q2_K as Q2_K_S)
# (IQ3_XS: its attn_k/attn_q and middle ffn_gate/ffn_up are iq3_xxs)
NEEDS_IMATRIX_FTYPES = frozenset({"IQ3_XXS", "IQ3_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_M", "IQ1_S", "Q2_K_S"})
# Shape fallback (tensor_type_fallback) when ne[0] is not a multiple of the block size.
_FALLBACK = {
    **{t: "iq4_nl" for t in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs")},
    **{t: "q4_0" for t in ("q2_K", "q3_K", "tq1_0", "tq2_0")},
    "q4_K": "q5_0",
    "q5_K": "q5_1",
    "q6_K": "q8_0",
}
_IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}
# R4: these ftypes have their own branch, ahead of (and instead of) the per-category rules
_IQ_VERY_LOW = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


def T(name: str) -> GGMLType:
    return BY_NAME[name.lower()]


def layer_of(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def iteration_order(names: list[str]) -> list[str]:
    """llama.cpp's weights_map order: layer number (non-block tensors first), then byte order."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


def allows_quantization(name: str, n_dims: int, leave_output: bool) -> bool:
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if leave_output and name == "output.weight":
        return False
    if name in _NEVER_EXACT or any(s in name for s in _NEVER_SUBSTR):
        return False
    return not any(name.endswith(s) for s in _RWKV)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    # C integer arithmetic; i - n/8 can be negative only when the first test is already true.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class ModelFacts:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int
    has_output: bool  # an `output.weight` exists (untied embeddings)
    n_attention_wv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 1

    @property
    def is_70b(self) -> bool:
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv

    @property
    def falcon(self) -> bool:
        return self.arch == "falcon"


@dataclass
class TypeOptions:
    output_tensor_type: GGMLType | None = None
    token_embedding_type: GGMLType | None = None
    tensor_types: list[tuple[str, GGMLType]] = field(default_factory=list)  # (pattern, type)
    pure: bool = False
    leave_output_tensor: bool = False
    has_imatrix: bool = False


@dataclass
class Choice:
    type: GGMLType
    reason: str
    quantize: bool  # False: copied in its current type


class TypePlanner:
    """Chooses each tensor's type; call `choose` in `iteration_order`."""

    def __init__(self, ftype: FileType, facts: ModelFacts, opts: TypeOptions):
        self.ftype, self.facts, self.opts = ftype, facts, opts
        self.default = T(ftype.default)
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_fallback = 0
        self._overrides = [(_TimedPattern(p), t, p) for p, t in opts.tensor_types]

    def choose(self, name: str, ne: tuple[int, ...], current: GGMLType, n_dims: int) -> Choice:
        o = self.opts
        if not allows_quantization(name, n_dims, o.leave_output_tensor):
            return Choice(current, "not quantized (llama-quantize keeps it)", False)
        cat = category(name)
        overridden = name == "per_layer_token_embd.weight" and any(r.search(name) for r, _, _ in self._overrides)
        if o.token_embedding_type is not None and cat == "token_embd" and not overridden:
            return Choice(o.token_embedding_type, "--token-embedding-type", True)
        if o.output_tensor_type is not None and cat == "output":
            return Choice(o.output_tensor_type, "--output-tensor-type", True)
        t = self.default
        if not t.quantized:
            return Choice(t, "ftype default", True)
        reason = "ftype default"
        manual = next(((tt, p) for r, tt, p in self._overrides if r.search(name)), None)
        if manual is not None:
            t, reason = manual[0], f"--tensor-type {manual[1]}"
        elif not o.pure:
            t, why = self._mixture(name, ne, cat, t)
            if why:
                reason = why
        return self._fallback(name, ne, t, reason)

    # -- R1..R12 --------------------------------------------------------------------------------
    def _mixture(self, name: str, ne: tuple[int, ...], cat: str, t: GGMLType) -> tuple[GGMLType, str]:
        f, fx = self.ftype.name, self.facts
        o = self.opts
        if cat == "output" or (cat == "token_embd" and not fx.has_output):
            what = "output" if cat == "output" else "tied token_embd"
            if o.output_tensor_type is not None:
                return o.output_tensor_type, f"{what}: --output-tensor-type"
            if fx.falcon or ne[0] % self.default.block:
                return T("q8_0"), f"{what}: q8_0 (row length {ne[0]} not a multiple of {self.default.block})"
            if f in _IQ_LOW:
                return T("q5_K"), f"{what} rule"
            if t.name != "q8_0":
                return T("q6_K"), f"{what} rule: q6_K"
            return t, ""
        if cat == "token_embd":
            if f in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return T("q2_K"), "untied token_embd rule"
            if f in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                return T("iq3_s"), "untied token_embd rule"
            if f in ("TQ1_0", "TQ2_0"):
                return T("q4_K"), "untied token_embd rule"
            return t, ""
        if f in _IQ_VERY_LOW:
            return self._very_low(cat, t)
        if cat == "attn_v":
            i, n = self.i_attention_wv, fx.n_attention_wv
            new = t
            if f == "Q2_K":
                new = T("q4_K") if fx.n_gqa >= 4 else T("q3_K")
            elif f == "Q2_K_S" and fx.n_gqa >= 4:
                new = T("q4_K")
            elif f == "IQ3_XXS":
                new = T("q4_K") if fx.n_gqa >= 4 else (T("iq3_s") if not o.has_imatrix else T("iq3_xxs"))
            elif (f in ("IQ3_XS", "IQ3_S") and fx.n_gqa >= 4) or f == "IQ3_M":
                new = T("q4_K")
            elif f == "Q3_K_M":
                new = T("q5_K") if i < 2 else T("q4_K")
            elif f == "Q3_K_L" or (f in ("IQ4_NL", "IQ4_XS") and fx.n_gqa >= 4):
                new = T("q5_K")
            elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                new = T("q6_K")
            elif f == "Q4_K_S" and i < 4:
                new = T("q5_K")
            if fx.is_70b and new.name in ("q3_K", "q4_K"):
                new = T("q5_K")
            if fx.n_expert == 8:
                new = T("q8_0")
            self.i_attention_wv += 1
            return new, (f"attn_v rule (#{i} of {n})" if new != t else "")
        if cat in ("attn_k", "attn_q"):
            if cat == "attn_k" and fx.n_expert == 8:
                return T("q8_0"), "attn_k rule (8 experts)"
            to = {"IQ3_XS": "iq3_xxs", "IQ3_XXS": "iq2_s"}.get(f)
            return (T(to), f"{cat} rule") if to else (t, "")
        if cat == "ffn_down":
            i = self._ffn_layer(name, "i_ffn_down")
            n = fx.n_layer
            new = t
            if f == "Q2_K":
                new = T("q3_K")
            elif f == "Q2_K_S":
                if i < n // 8:
                    new = T("q4_K")
            elif f == "IQ3_XXS" and not o.has_imatrix:
                new = T("q4_K") if i < n // 8 else T("q3_K")
            elif f == "Q3_K_M":
                new = T("q5_K") if i < n // 16 else (T("q4_K") if (not fx.falcon or use_more_bits(i, n)) else T("q3_K"))
            elif f == "IQ3_M" and (i < n // 8 or (fx.n_expert == 8 and use_more_bits(i, n))):
                new = T("q4_K")
            elif f == "Q3_K_L":
                new = T("q4_K") if fx.falcon else T("q5_K")
            elif f == "Q4_K_M":
                if fx.falcon:
                    new = T("q6_K") if i < n // 16 else (T("q5_K") if use_more_bits(i, n) else T("q4_K"))
                elif use_more_bits(i, n):
                    new = T("q6_K")
            elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not o.has_imatrix:
                new = T("q5_K")
            elif f == "Q5_K_M" and use_more_bits(i, n):
                new = T("q6_K")
            elif f == "Q4_K_S" and not fx.falcon and i < n // 8:
                new = T("q5_K")
            elif f in ("Q4_0", "Q5_0") and o.has_imatrix and i < n // 8:
                new = T("q4_1") if f == "Q4_0" else T("q5_1")
            return new, (f"ffn_down rule (layer {i} of {n})" if new != t else "")
        if cat == "attn_output":
            if not fx.falcon:
                if fx.n_expert == 8:
                    if f in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"):
                        return T("q5_K"), "attn_output rule (8 experts)"
                else:
                    to = {"Q2_K": "q3_K", "IQ3_XXS": "iq3_s", "Q3_K_M": "q4_K", "Q3_K_L": "q5_K", "IQ3_M": "q4_K"}.get(f)
                    if to:
                        return T(to), "attn_output rule"
            elif f == "Q3_K_L":
                return T("q4_K"), "attn_output rule (falcon)"
            return t, ""
        if cat in ("ffn_gate", "ffn_up"):
            i = self._ffn_layer(name, f"i_{cat}")
            n = fx.n_layer
            if f == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
                return T("iq3_xxs"), f"{cat} rule (layer {i} of {n})"
        return t, ""

    def _very_low(self, cat: str, t: GGMLType) -> tuple[GGMLType, str]:
        """R4, for IQ2_XXS/IQ2_XS/IQ1_S/IQ2_S/IQ2_M/IQ1_M. ffn_down counts with the plain counter,
        MoE or not, and ffn_gate/ffn_up are not counted."""
        f, fx = self.ftype.name, self.facts
        s_or_m = f in ("IQ2_S", "IQ2_M")
        if cat == "attn_v":
            i = self.i_attention_wv
            self.i_attention_wv += 1
            if fx.n_gqa >= 4 or fx.n_expert >= 4:
                return T("q4_K"), f"attn_v rule (#{i})"
            return (T("iq3_s") if s_or_m else T("q2_K")), f"attn_v rule (#{i})"
        if cat == "attn_k" and fx.n_expert == 8:
            return T("q4_K"), "attn_k rule (8 experts)"
        if cat == "ffn_down":
            i = self.i_ffn_down
            self.i_ffn_down += 1
            if i < fx.n_layer // 8:
                return (T("iq3_s") if s_or_m else T("q2_K")), f"ffn_down rule (#{i} of {fx.n_layer})"
            return t, ""
        if cat == "attn_output":
            if fx.n_expert == 8:
                return T("q5_K"), "attn_output rule (8 experts)"
            if f in ("IQ1_S", "IQ1_M"):
                return T("iq2_xxs"), "attn_output rule"
            if s_or_m:
                return T("iq3_s"), "attn_output rule"
        return t, ""

    def _ffn_layer(self, name: str, counter: str) -> int:
        """Dense models use the running counter; MoE models parse `blk.N.` from the name."""
        i = getattr(self, counter)
        setattr(self, counter, i + 1)
        if self.facts.n_expert > 1:
            li = layer_of(name)
            if li < 0 or li >= self.facts.n_layer:
                raise BadInput(f"cannot determine the layer of tensor {name}")
            return li
        return i

    def _fallback(self, name: str, ne: tuple[int, ...], t: GGMLType, reason: str) -> Choice:
        if ne[0] % t.block == 0:
            return Choice(t, reason, True)
        self.n_fallback += 1
        new_name = _FALLBACK.get(t.name)
        if new_name is None:
            if t.block > 32:
                raise BadArguments(f"tensor {name}: no fallback type is defined for {t.name} with row length {ne[0]}")
            new = F16
        else:
            new = T(new_name)
            if ne[0] % new.block:
                new = F16
        return Choice(new, f"{reason}; {t.name} -> {new.name} (row length {ne[0]} not a multiple of {t.block})", True)


class _TimedPattern:
    """A --tensor-type pattern as llama-quantize uses it: lowercased, searched in the name. Matched
    with the regex package under a time limit, so a catastrophically backtracking pattern (from a
    shared config, say) is an error rather than a hang."""

    TIMEOUT_S = 0.5

    def __init__(self, p: str):
        self.text = p
        try:
            self._re: Any = regex.compile(p.lower())
        except (regex.error, re.error, ValueError, TypeError, RecursionError) as exc:
            raise BadArguments(f"--tensor-type pattern '{shown(p)}' is not a valid regular expression ({exc})") from None

    def search(self, name: str) -> bool:
        try:
            return self._re.search(name, timeout=self.TIMEOUT_S) is not None
        except TimeoutError:
            raise BadArguments(f"--tensor-type pattern '{shown(self.text)}' takes too long to match '{name}'; simplify it") from None


def requires_imatrix(ftype: FileType, t: GGMLType, name: str) -> bool:
    if name in ("token_embd.weight", "output.weight"):
        return False
    return t.name in _NEEDS_IMATRIX or (t.name == "q2_K" and ftype.name == "Q2_K_S")
