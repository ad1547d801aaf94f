"""The report (schema.py) built from the scored variants, and read back from report.json.

render.py draws it; gates.py judges it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from .. import __version__
from . import gates as _gates
from .gates import GateLimits
from .metrics import KLDResult
from .schema import KINDS, OtherTextReport, Report, VariantRow


@dataclass(frozen=True)
class VariantScore:
    """One scored candidate: what it is, its file, and its KLDAccumulator result."""

    name: str  # e.g. "merged-Q4_K_M"
    kind: str  # "merged" | "runtime_lora" | "base"
    type: str  # e.g. "Q4_K_M"
    path: Path | str
    size_bytes: int  # bytes loaded for this variant (base + adapter for runtime LoRA)
    bpw: float
    stats: KLDResult
    imatrix: bool = False  # quantized with an importance matrix
    target: str | None = None  # a size-targeted mix: "size of Q4_K_M", "4.8 bpw"


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _rel(path: Path | str, workdir: Path | str | None) -> str:
    p = Path(path)
    if workdir is not None and p.is_absolute():
        try:
            return Path(os.path.relpath(p, workdir)).as_posix()
        except ValueError:  # another drive on Windows
            pass
    return p.as_posix()


def build_report(
    *,
    text_path: Path | str,
    text_tokens: int,
    ctx: int,
    chunks: int,
    reference_name: str,
    reference_ppl: float,
    adapter_effect: KLDResult | float | None,
    variants: Sequence[VariantScore],
    gates: GateLimits = None,
    workdir: Path | str | None = None,
    kv_cache: str = "f32",
    engine: str = "numpy",
) -> Report:
    """The report, its "gates" entry filled in by gates.check_gates.

    `adapter_effect` is KLD(reference ‖ base without adapter): a KLDResult or its kld_mean. Paths
    under `workdir` are written relative to it. `engine` names what computed the logits (compare.engine)."""
    for v in variants:
        if v.kind not in KINDS:
            raise ValueError(f"variant {v.name}: kind must be one of {KINDS}, got {v.kind!r}")
    a_kld = _num(adapter_effect.kld_mean if isinstance(adapter_effect, KLDResult) else adapter_effect)
    rows: list[VariantRow] = []
    for v in variants:
        s, kld = v.stats, _num(v.stats.kld_mean)
        # effect kept, 1 − KLD(ref‖variant)/KLD(ref‖base without adapter): undefined without a measurable adapter effect
        kept = _num(1.0 - kld / a_kld) if kld is not None and a_kld is not None and a_kld > 0 else None
        rows.append(
            {
                "name": v.name,
                "kind": v.kind,
                "type": v.type,
                "path": _rel(v.path, workdir),
                "size_bytes": int(v.size_bytes),
                "bpw": _num(v.bpw),
                "ppl": _num(s.ppl),
                "ppl_ratio": _num(s.ppl_ratio),
                "kld_mean": kld,
                "kld_p99": _num(s.kld_p99),
                "kld_max": _num(s.kld_max),
                "same_top": _num(s.same_top),
                "dp_rms": _num(s.dp_rms),
                "effect_retention": kept,
                "imatrix": bool(v.imatrix),
                "target": v.target,
                "preferred": None,
            }
        )
    _mark_preferred(rows)
    report: Report = {
        "loraq_version": __version__,
        "text": {
            "path": _rel(text_path, workdir),
            "tokens": int(text_tokens),
            "ctx": int(ctx),
            "chunks": int(chunks),
            "kv_cache": kv_cache,
        },
        "engine": {"name": engine},
        "reference": {"name": reference_name, "ppl": _num(reference_ppl)},
        "adapter_effect": {"kld_mean": a_kld},
        "variants": rows,
        "gates": {"passed": True, "failures": []},
    }
    failures = _gates.check_gates(report, gates)
    report["gates"] = {"passed": not failures, "failures": [str(f) for f in failures]}
    return report


def other_text_section(name: str, rep: Report) -> OtherTextReport:
    """A further evaluation text's part of the report: a report's text, reference, effect and
    variants (gates and deliver use the main text only)."""
    return {
        "name": name,
        "text": rep["text"],
        "reference": rep["reference"],
        "adapter_effect": rep["adapter_effect"],
        # ★ is the main text's choice (what deliver ships); a further text only shows the figures
        "variants": [{**v, "preferred": None} for v in rep["variants"]],
    }


def _mark_preferred(rows: list[VariantRow]) -> None:
    """quantize.imatrix: auto builds each type with and without the imatrix: the one with the lower
    KLD mean is preferred (what deliver may ship), the other not; a tie keeps the plain one. A
    size-targeted mix pairs with its own -imatrix twin. Variants without such a pair keep None."""
    pairs: dict[tuple[str, str | None], list[VariantRow]] = {}
    for r in rows:
        if r["kind"] == "merged":
            pairs.setdefault((r["type"], r["target"] and r["name"].removesuffix("-imatrix")), []).append(r)
    for pair in pairs.values():
        if len(pair) != 2 or pair[0]["imatrix"] == pair[1]["imatrix"]:
            continue
        plain, imat = sorted(pair, key=lambda r: r["imatrix"])
        a, b = plain["kld_mean"], imat["kld_mean"]
        better_imat = a is not None and b is not None and b < a
        plain["preferred"], imat["preferred"] = not better_imat, better_imat


def preferred(row: VariantRow) -> bool:
    """False only for the worse of an auto pair (rows from older reports have no key: True)."""
    return row.get("preferred") is not False


def report_json(report: Report) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def load_report(path: Path) -> Report:
    return cast(Report, json.loads(path.read_text(encoding="utf-8")))
