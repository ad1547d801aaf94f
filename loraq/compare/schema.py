"""report.json's document (docs/design.md, Report): exactly its keys, in its order.

Typed JSON rather than objects, so report.json round-trips byte for byte and `loraq run` can
re-apply changed gates to an old report without rescoring."""

from __future__ import annotations

from typing import TypedDict

KINDS = ("merged", "runtime_lora", "base")


# Numbers are None where JSON has null: NaN/Inf, or a quantity that is undefined.
class VariantRow(TypedDict):
    name: str
    kind: str
    type: str
    path: str
    size_bytes: int
    bpw: float | None
    ppl: float | None
    ppl_ratio: float | None
    kld_mean: float | None
    kld_p99: float | None
    kld_max: float | None
    same_top: float | None
    dp_rms: float | None
    effect_retention: float | None
    imatrix: bool  # quantized with an importance matrix (report.json of loraq < 0.x: absent, read as False)
    target: str | None  # a size-targeted mix's target ("size of Q4_K_M", "4.8 bpw"); None for a fixed type
    # quantize.imatrix: auto: True for the better of a type's pair with/without the imatrix, False
    # for the other (deliver never ships it); None when there is no such pair
    preferred: bool | None


class TextInfo(TypedDict):
    path: str
    tokens: int
    ctx: int
    chunks: int
    kv_cache: str  # "f32" | "f16": the engine's KV cache, as llama-perplexity's -ctk/-ctv (default f16)


class EngineInfo(TypedDict):
    name: str  # compare.engine: "numpy" or "llama.cpp"


class ReferenceInfo(TypedDict):
    name: str
    ppl: float | None


class AdapterEffect(TypedDict):
    kld_mean: float | None


class GateSummary(TypedDict):
    passed: bool
    failures: list[str]


class OtherTextReport(TypedDict):
    """compare.also: the variants scored on a further evaluation text (its own reference)."""

    name: str
    text: TextInfo
    reference: ReferenceInfo
    adapter_effect: AdapterEffect
    variants: list[VariantRow]


class _Report(TypedDict):
    loraq_version: str
    text: TextInfo
    engine: EngineInfo
    reference: ReferenceInfo
    adapter_effect: AdapterEffect
    variants: list[VariantRow]
    gates: GateSummary


class Report(_Report, total=False):
    other_texts: list[OtherTextReport]  # only with compare.also
