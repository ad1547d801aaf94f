"""report.json / report.md / report.html for `compare`, and the quality gates (design.md, Report).

`build_report` turns the scored variants into the JSON document design.md specifies (exactly its
keys); `write_reports` renders it three ways, each written atomically; `check_gates` and
`raise_if_failed` apply `compare.gates` (exit 3 when one fails). Gates apply to the candidates
(`merged` and `runtime_lora`); a `base` variant (no adapter) is shown for scale only.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_output
from ..errors import GateFailed
from .metrics import KLDResult

KINDS = ("merged", "runtime_lora", "base")
KIND_LABEL = {"merged": "merged", "runtime_lora": "runtime LoRA", "base": "base (no adapter)"}
GATED_KINDS = ("merged", "runtime_lora")


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


def _num(x: Any) -> float | None:
    """A JSON-safe float: NaN and ±Inf become null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _rel(path: Path | str, workdir: Path | str | None) -> str:
    p = Path(path)
    if workdir is not None:
        try:
            return Path(os.path.relpath(p, workdir)).as_posix() if p.is_absolute() else p.as_posix()
        except ValueError:  # another drive on Windows
            pass
    return p.as_posix()


def effect_retention(kld_mean: float | None, adapter_kld_mean: float | None) -> float | None:
    """1 − KLD(ref‖candidate)/KLD(ref‖base without adapter); None when the adapter had no
    measurable effect (its KLD is not > 0) or a number is missing."""
    if kld_mean is None or adapter_kld_mean is None or not adapter_kld_mean > 0:
        return None
    return _num(1.0 - kld_mean / adapter_kld_mean)


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
    gates: Any = None,
    workdir: Path | str | None = None,
) -> dict:
    """The report document (design.md, Report), with `gates` filled in by check_gates.

    `adapter_effect` is KLD(reference ‖ base without adapter): a KLDResult or its kld_mean.
    `gates` is a Gates model, a mapping with the same keys, or None (nothing gated). Paths under
    `workdir` are written relative to it."""
    for v in variants:
        if v.kind not in KINDS:
            raise ValueError(f"variant {v.name}: kind must be one of {KINDS}, got {v.kind!r}")
    a_kld = _num(adapter_effect.kld_mean if isinstance(adapter_effect, KLDResult) else adapter_effect)
    rows = []
    for v in variants:
        s = v.stats
        kld = _num(s.kld_mean)
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
                "effect_retention": effect_retention(kld, a_kld),
            }
        )
    report = {
        "loraq_version": __version__,
        "text": {"path": _rel(text_path, workdir), "tokens": int(text_tokens), "ctx": int(ctx), "chunks": int(chunks)},
        "reference": {"name": reference_name, "ppl": _num(reference_ppl)},
        "adapter_effect": {"kld_mean": a_kld},
        "variants": rows,
        "gates": {"passed": True, "failures": []},
    }
    failures = check_gates(report, gates)
    report["gates"] = {"passed": not failures, "failures": failures}
    return report


# ---------------------------------------------------------------------------------------------
# Gates

_GATES = (
    # (gate key, metric, failing when the value is … the limit)
    ("max_kld_mean", "kld_mean", ">"),
    ("min_same_top", "same_top", "<"),
    ("min_effect_retention", "effect_retention", "<"),
)


def _gate_values(gates: Any) -> dict[str, float | None]:
    if gates is None:
        return {}
    if hasattr(gates, "model_dump"):
        gates = gates.model_dump()
    if not isinstance(gates, Mapping):
        raise TypeError(f"gates must be a Gates model or a mapping, not {type(gates).__name__}")
    unknown = set(gates) - {g for g, _, _ in _GATES}
    if unknown:
        raise ValueError(f"unknown gate(s): {', '.join(sorted(unknown))}")
    return {k: (None if v is None else float(v)) for k, v in gates.items()}


def _pair(value: float, limit: float) -> tuple[str, str]:
    """Value and limit printed with 4 significant digits, more if that would make them look equal."""
    for digits in (4, 6, 8, 12, 17):
        a, b = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if a != b:
            return a, b
    return a, b


def check_gates(report: Mapping, gates: Any) -> list[str]:
    """One line per failed gate, e.g. "merged-Q4_0: kld_mean 0.0612 > max_kld_mean 0.05".

    Only `merged` and `runtime_lora` variants are gated. A gated metric that is missing (NaN, or
    effect_retention when the adapter had no measurable effect) fails its gate."""
    limits = _gate_values(gates)
    failures = []
    for v in report["variants"]:
        if v["kind"] not in GATED_KINDS:
            continue
        for key, metric, op in _GATES:
            limit = limits.get(key)
            if limit is None:
                continue
            value = v.get(metric)
            if value is None:
                why = "adapter had no measurable effect" if metric == "effect_retention" else "not a number"
                failures.append(f"{v['name']}: {metric} undefined ({why}), {key} {limit:g}")
                continue
            bad = value > limit if op == ">" else value < limit
            if bad:
                a, b = _pair(value, limit)
                failures.append(f"{v['name']}: {metric} {a} {op} {key} {b}")
    return failures


def raise_if_failed(report: Mapping) -> None:
    """Raise GateFailed (exit 3) with one line naming each failing variant and metric."""
    failures = list(report["gates"]["failures"])
    if not failures:
        return
    names = {f.split(":", 1)[0] for f in failures}
    raise GateFailed(
        f"quality gate failed for {len(names)} variant(s): "
        + "; ".join(failures)
        + " (see report.md; choose a larger type or relax compare.gates)"
    )


# ---------------------------------------------------------------------------------------------
# Rendering helpers shared by Markdown and HTML

COLUMNS = (
    # header, key, formatter
    ("variant", "name", str),
    ("kind", "kind", lambda k: {"runtime_lora": "runtime LoRA"}.get(k, k)),
    ("type", "type", str),
    ("size MiB", "size_bytes", lambda b: f"{b / 2**20:,.1f}"),
    ("bpw", "bpw", lambda x: f"{x:.2f}"),
    ("PPL", "ppl", lambda x: f"{x:.4f}"),
    ("PPL ratio", "ppl_ratio", lambda x: f"{x:.4f}"),
    ("KLD mean", "kld_mean", lambda x: f"{x:.6f}"),
    ("KLD p99", "kld_p99", lambda x: f"{x:.6f}"),
    ("KLD max", "kld_max", lambda x: f"{x:.6f}"),
    ("same top %", "same_top", lambda x: f"{100 * x:.2f}"),
    ("Δp RMS %", "dp_rms", lambda x: f"{100 * x:.3f}"),
    ("effect kept %", "effect_retention", lambda x: f"{100 * x:.1f}"),
)


def _cells(v: Mapping) -> list[str]:
    out = []
    for _, key, fmt in COLUMNS:
        x = v.get(key)
        out.append("–" if x is None else fmt(x))
    return out


def _failed_names(report: Mapping) -> set[str]:
    names = {v["name"] for v in report["variants"]}
    out = set()
    for f in report["gates"]["failures"]:
        n = f.split(": ", 1)[0]
        if n in names:
            out.add(n)
    return out


def _status(v: Mapping, failed: set[str]) -> str:
    if v["kind"] not in GATED_KINDS:
        return "–"
    return "FAIL" if v["name"] in failed else "ok"


def _summary_lines(report: Mapping) -> list[str]:
    t, r, a = report["text"], report["reference"], report["adapter_effect"]
    scored = t["chunks"] * (t["ctx"] - 1 - t["ctx"] // 2)
    ppl = "–" if r["ppl"] is None else f"{r['ppl']:.4f}"
    akld = "–" if a["kld_mean"] is None else f"{a['kld_mean']:.6f}"
    return [
        (
            f"Evaluation text `{t['path']}`: {t['tokens']} tokens, {t['chunks']} chunks of {t['ctx']} "
            f"({scored} scored positions: the second half of each chunk, as llama-perplexity)."
        ),
        f"Reference **{r['name']}**: PPL {ppl}.",
        (f"Adapter effect, KLD(reference ‖ base without adapter): {akld}. *effect kept* = 1 − KLD(reference ‖ variant) / adapter effect."),
    ]


def _gate_line(report: Mapping) -> str:
    g = report["gates"]
    if g["passed"]:
        return "Quality gates: **passed**."
    return f"Quality gates: **failed** ({len(g['failures'])})."


# ---------------------------------------------------------------------------------------------
# Plot geometry (shared by the SVG and the text plot)


def _plot_points(report: Mapping) -> list[dict]:
    pts = []
    for v in report["variants"]:
        if v.get("kld_mean") is None:
            continue
        pts.append({"name": v["name"], "kind": v["kind"], "type": v["type"], "size": v["size_bytes"] / 2**20, "kld": v["kld_mean"]})
    return pts


def _log_range(values: Iterable[float]) -> tuple[float, float, float]:
    """(lo, hi, floor) in log10 units, padded; values <= 0 are drawn at `floor`."""
    values = list(values)
    pos = [x for x in values if x > 0]
    floor = min(pos) / 3 if pos else 1e-6
    logs = [math.log10(max(x, floor)) for x in values] or [math.log10(floor)]
    lo, hi = min(logs), max(logs)
    if hi - lo < 1:
        mid = (hi + lo) / 2
        lo, hi = mid - 0.5, mid + 0.5
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad, floor


def _lin_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9 * max(1.0, abs(hi)):
        lo, hi = lo - max(1.0, 0.1 * abs(lo)), hi + max(1.0, 0.1 * abs(hi))
    pad = 0.08 * (hi - lo)
    return max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    raw = span / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (not logs) between 10**lo and 10**hi: decades, plus 2 and 5 when few decades."""
    ticks = []
    mults = (1, 2, 5) if hi - lo < 3 else (1,)
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in mults:
            v = m * 10.0**e
            if lo <= math.log10(v) <= hi:
                ticks.append(v)
    return ticks


def _fmt_tick(v: float) -> str:
    if v >= 1e-3 and v < 1e4:
        return f"{v:g}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


# ---------------------------------------------------------------------------------------------
# Markdown


def _text_plot(report: Mapping, width: int = 60, height: int = 14) -> list[str]:
    """A text scatter plot: one letter per type, UPPER case merged, lower case runtime LoRA,
    digits for base variants."""
    pts = _plot_points(report)
    if not pts:
        return []
    lo, hi, floor = _log_range([p["kld"] for p in pts])
    xlo, xhi = _lin_range([p["size"] for p in pts])
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    types = []
    for p in pts:
        if p["kind"] != "base" and p["type"] not in types:
            types.append(p["type"])
    bases = [p["name"] for p in pts if p["kind"] == "base"]
    grid = [[" "] * width for _ in range(height)]
    for p in pts:
        if p["kind"] == "base":
            ch = "0123456789"[bases.index(p["name"]) % 10]
        else:
            ch = letters[types.index(p["type"]) % 26]
            ch = ch if p["kind"] == "merged" else ch.lower()
        col = round((p["size"] - xlo) / (xhi - xlo) * (width - 1))
        y = math.log10(max(p["kld"], floor))
        row = height - 1 - round((y - lo) / (hi - lo) * (height - 1))
        cell = grid[row][col]
        grid[row][col] = ch if cell == " " else "*"
    lines = []
    for r in range(height):
        y = hi - r / (height - 1) * (hi - lo)
        label = f"{10**y:9.2e}" if r in (0, height // 2, height - 1) else " " * 9
        lines.append(f"{label} |" + "".join(grid[r]).rstrip())
    lines.append(" " * 10 + "+" + "-" * width)
    left, right = f"{xlo:.1f}", f"{xhi:.1f} MiB"
    lines.append(" " * 11 + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append("")
    lines.append("y: KLD mean (log scale); x: file size. UPPER case = merged, lower case = runtime LoRA, * = overlapping points.")
    for i, t in enumerate(types):
        lines.append(f"  {letters[i % 26]}/{letters[i % 26].lower()} = {t}")
    for i, b in enumerate(bases):
        lines.append(f"  {i % 10} = {b} (base, no adapter)")
    return lines


def render_markdown(report: Mapping) -> str:
    failed = _failed_names(report)
    out = ["# loraq report", ""]
    out += [f"{line}  " for line in _summary_lines(report)]
    out += ["", _gate_line(report), ""]
    heads = [h for h, _, _ in COLUMNS] + ["gates"]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(heads) - 1)) + "|:---:|")
    for v in report["variants"]:
        cells = [c.replace("|", "\\|") for c in _cells(v)]
        cells[0] = f"`{cells[0]}`"
        out.append("| " + " | ".join(cells + [_status(v, failed)]) + " |")
    if report["gates"]["failures"]:
        out += ["", "Gate failures:", ""]
        out += [f"- {f}" for f in report["gates"]["failures"]]
    plot = _text_plot(report)
    if plot:
        out += ["", "## KLD against file size", "", "```text", *plot, "```"]
    out += ["", f"loraq {report['loraq_version']}. KLD, same top and Δp as llama-perplexity --kl-divergence.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# HTML + SVG

_COLORS = {"merged": "#1f6fb4", "runtime_lora": "#e0701b", "base": "#6b6b6b"}


def _marker(kind: str, x: float, y: float, name: str, tip: str) -> str:
    c = _COLORS.get(kind, "#333")
    attrs = f'class="marker {kind}" data-variant="{html.escape(name)}"'
    t = f"<title>{html.escape(tip)}</title>"
    if kind == "merged":
        return f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{c}" stroke="#fff" stroke-width="1.5">{t}</circle>'
    if kind == "runtime_lora":
        pts = f"{x:.1f},{y - 7:.1f} {x + 6.5:.1f},{y + 5:.1f} {x - 6.5:.1f},{y + 5:.1f}"
        return f'<polygon {attrs} points="{pts}" fill="{c}" stroke="#fff" stroke-width="1.5">{t}</polygon>'
    return (
        f'<rect {attrs} x="{x - 5.5:.1f}" y="{y - 5.5:.1f}" width="11" height="11" fill="{c}" stroke="#fff" stroke-width="1.5">{t}</rect>'
    )


def _legend_marker(kind: str, x: float, y: float) -> str:
    c = _COLORS[kind]
    if kind == "merged":
        return f'<circle cx="{x}" cy="{y}" r="6" fill="{c}"/>'
    if kind == "runtime_lora":
        return f'<polygon points="{x},{y - 7} {x + 6.5},{y + 5} {x - 6.5},{y + 5}" fill="{c}"/>'
    return f'<rect x="{x - 5.5}" y="{y - 5.5}" width="11" height="11" fill="{c}"/>'


def render_svg(report: Mapping, gates: Any = None, width: int = 820, height: int = 460) -> str:
    """Scatter plot of KLD mean (log scale) against file size, one marker per variant."""
    pts = _plot_points(report)
    ml, mr, mt, mb = 78, 24, 22, 58
    pw, ph = width - ml - mr, height - mt - mb
    svg = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            'role="img" aria-label="KLD mean against file size" font-family="system-ui, sans-serif" font-size="12">'
        ),
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/>',
    ]
    if not pts:
        svg.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" text-anchor="middle" fill="#777">no scored variants</text>')
        svg.append("</svg>")
        return "\n".join(svg)
    limits = _gate_values(gates)
    akld = report["adapter_effect"]["kld_mean"]
    refs = []  # (value, label, color)
    if akld is not None and akld > 0:
        refs.append((akld, "adapter effect (no fine-tune)", "#888"))
    if limits.get("max_kld_mean"):
        refs.append((limits["max_kld_mean"], "gate max_kld_mean", "#c62828"))
    lo, hi, floor = _log_range([p["kld"] for p in pts] + [r[0] for r in refs])
    xlo, xhi = _lin_range([p["size"] for p in pts])

    def X(s: float) -> float:
        return ml + (s - xlo) / (xhi - xlo) * pw

    def Y(k: float) -> float:
        return mt + (hi - math.log10(max(k, floor))) / (hi - lo) * ph

    for t in _nice_ticks(xlo, xhi):
        x = X(t)
        svg.append(f'<line x1="{x:.1f}" y1="{mt}" x2="{x:.1f}" y2="{mt + ph}" stroke="#e6e6e6"/>')
        svg.append(f'<text x="{x:.1f}" y="{mt + ph + 17}" text-anchor="middle" fill="#444">{t:g}</text>')
    for t in _log_ticks(lo, hi):
        y = Y(t)
        major = abs(math.log10(t) - round(math.log10(t))) < 1e-9
        svg.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="{"#dcdcdc" if major else "#eeeeee"}"/>')
        svg.append(f'<text x="{ml - 7}" y="{y + 4:.1f}" text-anchor="end" fill="#444">{_fmt_tick(t)}</text>')
    svg.append(f'<text x="{ml + pw / 2}" y="{height - 14}" text-anchor="middle" font-size="13" fill="#222">file size (MiB)</text>')
    svg.append(
        f'<text transform="translate(18 {mt + ph / 2}) rotate(-90)" text-anchor="middle" font-size="13" fill="#222">'
        "KLD mean vs reference (log scale)</text>"
    )

    def clashes(box, boxes) -> int:
        return sum(not (box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3]) for b in boxes)

    markers = [(X(p["size"]) - 8, Y(p["kld"]) - 8, X(p["size"]) + 8, Y(p["kld"]) + 8) for p in pts]
    placed: list[tuple[float, float, float, float]] = list(markers)
    # Reference lines, captioned at whichever end of the line is free of markers.
    for value, label, color in refs:
        y = Y(value)
        caption = f"{label} {value:.4g}"
        w = 6.0 * len(caption)
        right = (ml + pw - 6 - w, y - 15, ml + pw - 6, y - 2)
        left = (ml + 6, y - 15, ml + 6 + w, y - 2)
        box, anchor, tx = (right, "end", ml + pw - 6) if clashes(right, placed) <= clashes(left, placed) else (left, "start", ml + 6)
        placed.append(box)
        svg.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="{color}" stroke-dasharray="6 4"/>')
        svg.append(f'<text x="{tx:.1f}" y="{y - 5:.1f}" text-anchor="{anchor}" fill="{color}" font-size="11">{html.escape(caption)}</text>')
    # The legend goes in the corner that hides the fewest markers and captions.
    kinds = [k for k in KINDS if any(p["kind"] == k for p in pts)]
    lw, lh = 150, 12 + 20 * len(kinds)
    corners = [(ml + pw - lw - 8, mt + 8), (ml + 8, mt + 8), (ml + pw - lw - 8, mt + ph - lh - 8), (ml + 8, mt + ph - lh - 8)]
    lx, ly = min(corners, key=lambda c: clashes((c[0] - 12, c[1] - 12, c[0] + lw + 12, c[1] + lh + 12), placed))
    placed.append((lx - 4, ly - 4, lx + lw + 4, ly + lh + 4))
    legend = [
        f'<g class="legend"><rect x="{lx}" y="{ly}" width="{lw}" height="{lh}" fill="#fff" fill-opacity="0.92" stroke="#ccc" rx="4"/>'
    ]
    for i, k in enumerate(kinds):
        yy = ly + 16 + 20 * i
        legend.append(_legend_marker(k, lx + 16, yy))
        legend.append(f'<text x="{lx + 30}" y="{yy + 4}" fill="#222">{KIND_LABEL[k]}</text>')
    legend.append("</g>")
    svg += legend

    # Markers, then labels placed greedily where they overlap nothing placed before.
    labels = []
    for p in sorted(pts, key=lambda q: (q["size"], q["kld"])):
        x, y = X(p["size"]), Y(p["kld"])
        text = p["type"] if p["kind"] != "base" else f"{p['type']} (base)"
        w = 6.6 * len(text) + 2
        cands = [
            (x + 10, y + 4, "start"), (x - 10, y + 4, "end"), (x, y - 12, "middle"), (x, y + 20, "middle"),
            (x + 9, y - 9, "start"), (x - 9, y - 9, "end"), (x + 9, y + 17, "start"), (x - 9, y + 17, "end"),
        ]  # fmt: skip
        best = None
        for tx, ty, anchor in cands:
            x0 = tx if anchor == "start" else tx - w if anchor == "end" else tx - w / 2
            box = (x0, ty - 11, x0 + w, ty + 3)
            inside = box[0] >= ml and box[2] <= ml + pw and box[1] >= mt and box[3] <= mt + ph
            if inside and not clashes(box, placed):
                best = (tx, ty, anchor, box)
                break
        if best is None:
            tx, ty, anchor = cands[0]
            best = (tx, ty, anchor, (tx, ty - 11, tx + w, ty + 3))
        placed.append(best[3])
        color = _COLORS.get(p["kind"], "#333")
        labels.append(
            f'<text class="label" x="{best[0]:.1f}" y="{best[1]:.1f}" text-anchor="{best[2]}" fill="{color}">{html.escape(text)}</text>'
        )
    rows = {v["name"]: v for v in report["variants"]}
    for p in pts:
        v = rows[p["name"]]
        tip = f"{p['name']}: KLD {p['kld']:.6f}, {p['size']:.1f} MiB"
        if v.get("same_top") is not None:
            tip += f", same top {100 * v['same_top']:.2f} %"
        if p["kld"] <= 0:
            tip += " (KLD ≤ 0, drawn at the bottom)"
        svg.append(_marker(p["kind"], X(p["size"]), Y(p["kld"]), p["name"], tip))
    svg += labels

    svg.append("</svg>")
    return "\n".join(svg)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 16px; margin: 26px 0 8px; }
p { margin: 4px 0; line-height: 1.45; } code { background: #f2f2f2; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; font-size: 12.5px; margin-top: 12px; }
th, td { padding: 5px 7px; border-bottom: 1px solid #e3e3e3; white-space: nowrap; }
th { background: #f4f5f7; text-align: right; } th.l, td.l { text-align: left; } td { text-align: right;
  font-variant-numeric: tabular-nums; }
tr.fail td { background: #fdecea; } .ok { color: #1b7f3b; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.kind-merged { color: #1f6fb4; } .kind-runtime_lora { color: #e0701b; } .kind-base { color: #6b6b6b; }
.banner { display: inline-block; padding: 3px 10px; border-radius: 4px; font-weight: 600; margin-top: 8px; }
.banner.ok { background: #e6f4ea; } .banner.bad { background: #fdecea; }
ul.fail { color: #c62828; font-size: 13px; } footer { color: #777; font-size: 12px; margin-top: 20px; }
"""


def _md_inline(s: str) -> str:
    """The summary lines' tiny Markdown (`code`, **bold**, *em*) as HTML."""
    import re

    s = html.escape(s, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", s)


def render_html(report: Mapping, gates: Any = None) -> str:
    failed = _failed_names(report)
    g = report["gates"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>loraq report: {html.escape(report['reference']['name'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>loraq report</h1>",
    ]
    out += [f"<p>{_md_inline(line)}</p>" for line in _summary_lines(report)]
    if g["passed"]:
        out.append('<div class="banner ok">Quality gates passed</div>')
    else:
        out.append(f'<div class="banner bad">Quality gates failed ({len(g["failures"])})</div>')
        out.append('<ul class="fail">' + "".join(f"<li>{html.escape(f)}</li>" for f in g["failures"]) + "</ul>")
    out.append('<div style="overflow-x: auto"><table><thead><tr>')
    for i, (h, _, _) in enumerate(COLUMNS):
        out.append(f'<th class="{"l" if i < 3 else ""}">{html.escape(h)}</th>')
    out.append('<th class="l">gates</th></tr></thead><tbody>')
    for v in report["variants"]:
        cells = _cells(v)
        st = _status(v, failed)
        cls = ' class="fail"' if st == "FAIL" else ""
        row = [f'<td class="l" title="{html.escape(v["path"])}"><code>{html.escape(cells[0])}</code></td>']
        row.append(f'<td class="l kind-{html.escape(v["kind"])}">{html.escape(cells[1])}</td>')
        row.append(f'<td class="l">{html.escape(cells[2])}</td>')
        row += [f"<td>{html.escape(c)}</td>" for c in cells[3:]]
        scls = "ok" if st == "ok" else "bad" if st == "FAIL" else ""
        row.append(f'<td class="l {scls}">{st}</td>')
        out.append(f"<tr{cls}>" + "".join(row) + "</tr>")
    out.append("</tbody></table></div>")
    out.append("<h2>KLD against file size</h2>")
    out.append(render_svg(report, gates))
    out.append(
        f"<footer>loraq {html.escape(str(report['loraq_version']))}. KLD, same top and Δp as "
        "llama-perplexity --kl-divergence, over the second half of each chunk. Lower KLD is closer to the reference."
        "</footer>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_reports(report: Mapping, workdir: Path | str, gates: Any = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html into workdir, each atomically.

    `gates` (optional) draws the max_kld_mean limit on the plot."""
    workdir = Path(workdir)
    docs = {
        "json": ("report.json", json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"),
        "md": ("report.md", render_markdown(report)),
        "html": ("report.html", render_html(report, gates)),
    }
    paths = {}
    for key, (name, text) in docs.items():
        final = workdir / name
        with atomic_output(final) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths[key] = final
    return paths
