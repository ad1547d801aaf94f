"""The quality gates (docs/design.md, compare.gates): which candidate breaks which limit.

Gates apply to the candidates (`merged` and `runtime_lora`); a `base` variant (no adapter) is in
the report for scale only. Failures are records; their one-line text is what report.json,
report.md and the exit-3 message show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from ..errors import GateFailed
from .schema import Report


class _GatesModel(Protocol):  # pipeline.config.Gates, which sits on a layer above this one
    def model_dump(self) -> Mapping[str, float | None]: ...


GateLimits: TypeAlias = "_GatesModel | Mapping[str, float | None] | None"

GATED_KINDS = ("merged", "runtime_lora")
# metric: (gate key, fails when the value is … the limit)
_GATES = {"kld_mean": ("max_kld_mean", ">"), "same_top": ("min_same_top", "<"), "effect_retention": ("min_effect_retention", "<")}


@dataclass(frozen=True)
class GateFailure:
    variant: str
    metric: str  # a key of _GATES
    value: float | None  # None: undefined (NaN, or effect_retention when the adapter had no effect)
    limit: float

    def __str__(self) -> str:
        """e.g. "merged-Q4_0: kld_mean 0.0612 > max_kld_mean 0.05"."""
        key, op = _GATES[self.metric]
        if self.value is None:
            why = "adapter had no measurable effect" if self.metric == "effect_retention" else "not a number"
            return f"{self.variant}: {self.metric} undefined ({why}), {key} {self.limit:g}"
        # 4 significant digits, more when that would print a failing value equal to its limit
        for digits in (4, 6, 8, 12, 17):
            a, b = f"{self.value:.{digits}g}", f"{self.limit:.{digits}g}"
            if a != b:
                break
        return f"{self.variant}: {self.metric} {a} {op} {key} {b}"


def gate_limits(gates: GateLimits) -> dict[str, float]:
    """The limits that are set, by gate key; `gates` is a Gates model or a mapping with its keys."""
    if gates is None:
        return {}
    values = gates.model_dump() if hasattr(gates, "model_dump") else gates
    if not isinstance(values, Mapping):
        raise TypeError(f"gates must be a Gates model or a mapping, not {type(gates).__name__}")
    unknown = set(values) - {key for key, _ in _GATES.values()}
    if unknown:
        raise ValueError(f"unknown gate(s): {', '.join(sorted(unknown))}")
    return {k: float(v) for k, v in values.items() if v is not None}


def check_gates(report: Report, gates: GateLimits) -> list[GateFailure]:
    """Every (candidate, gate) that fails, in report order. A gated metric that is missing fails."""
    limits = gate_limits(gates)
    failures = []
    for v in report["variants"]:
        if v["kind"] not in GATED_KINDS:
            continue
        for metric, (key, op) in _GATES.items():
            if key not in limits:
                continue
            value: float | None = v.get(metric)  # type: ignore[assignment]
            if value is None or (value > limits[key] if op == ">" else value < limits[key]):
                failures.append(GateFailure(v["name"], metric, value, limits[key]))
    return failures


def gate_failed(failures: Sequence[GateFailure]) -> GateFailed:
    """The exit-3 error: one line naming each failing variant and metric."""
    n = len({f.variant for f in failures})
    lines = "; ".join(map(str, failures))
    return GateFailed(
        f"quality gate failed for {n} variant(s): {lines} (see report.md; choose a larger type or relax compare.gates)", failures
    )


def enforce_gates(report: Report, gates: GateLimits) -> None:
    """Raise GateFailed (exit 3) when any gate fails."""
    if failures := check_gates(report, gates):
        raise gate_failed(failures)
