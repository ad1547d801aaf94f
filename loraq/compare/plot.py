"""Where things go on the plot of KLD mean against file size: the SVG's layout (drawn by
templates/report.html.j2) and report.md's text plot.

KLD is on a log scale: a Q8_0 and a Q2_K differ by decades."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .gates import GateLimits, gate_limits
from .schema import KINDS, Report, VariantRow

KIND_LABEL = {"merged": "merged", "runtime_lora": "runtime LoRA", "base": "base (no adapter)"}
COLORS = {"merged": "#1f6fb4", "runtime_lora": "#e0701b", "base": "#6b6b6b"}
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


@dataclass(frozen=True)
class _Point:
    name: str
    kind: str
    type: str
    size: float  # MiB
    kld: float
    same_top: float | None


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    anchor: str
    color: str
    text: str


@dataclass
class SvgPlot:
    width: int
    height: int
    left: int
    top: int
    pw: int  # plot area
    ph: int
    xticks: list[tuple[float, str]] = field(default_factory=list)  # x, label
    yticks: list[tuple[float, str, bool]] = field(default_factory=list)  # y, label, is a decade
    refs: list[tuple[float, Text]] = field(default_factory=list)  # dashed line's y, its caption
    legend: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, width, height
    kinds: list[str] = field(default_factory=list)
    markers: list[tuple[_Point, float, float, str]] = field(default_factory=list)  # variant, x, y, tooltip
    labels: list[Text] = field(default_factory=list)


def _label(v: VariantRow) -> str:
    """A point's label: its type; a mix by its target; "+im" when quantized with an imatrix."""
    target = v.get("target")
    t = f"mix {target.removeprefix('size of ')}" if target else v["type"]
    return t + ("+im" if v.get("imatrix") and v["kind"] != "base" else "")


def _points(report: Report) -> list[_Point]:
    return [
        _Point(v["name"], v["kind"], _label(v), v["size_bytes"] / 2**20, v["kld_mean"], v["same_top"])
        for v in report["variants"]
        if v["kld_mean"] is not None
    ]


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
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    ticks, t = [], math.ceil(lo / step) * step
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (not logs) between 10**lo and 10**hi: decades, plus 2 and 5 when few decades."""
    mults = (1, 2, 5) if hi - lo < 3 else (1,)
    values = (m * 10.0**e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mults)
    return [v for v in values if lo <= math.log10(v) <= hi]


def _fmt_tick(v: float) -> str:
    if 1e-3 <= v < 1e4:
        return f"{v:g}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def _clashes(box: Box, boxes: Iterable[Box]) -> int:
    return sum(not (box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3]) for b in boxes)


def svg_plot(report: Report, gates: GateLimits, width: int = 820, height: int = 460) -> SvgPlot:
    """One marker per variant, dashed lines at the adapter's effect and the max_kld_mean gate."""
    ml, mt = 78, 22
    pw, ph = width - ml - 24, height - mt - 58
    plot = SvgPlot(width, height, ml, mt, pw, ph)
    pts = _points(report)
    if not pts:
        return plot
    akld = report["adapter_effect"]["kld_mean"]
    refs = []  # (value, label, color)
    if akld is not None and akld > 0:
        refs.append((akld, "adapter effect (no fine-tune)", "#888"))
    if max_kld := gate_limits(gates).get("max_kld_mean"):
        refs.append((max_kld, "gate max_kld_mean", "#c62828"))
    lo, hi, floor = _log_range([p.kld for p in pts] + [r[0] for r in refs])
    xlo, xhi = _lin_range([p.size for p in pts])

    def X(s: float) -> float:
        return ml + (s - xlo) / (xhi - xlo) * pw

    def Y(k: float) -> float:
        return mt + (hi - math.log10(max(k, floor))) / (hi - lo) * ph

    plot.xticks = [(X(t), f"{t:g}") for t in _nice_ticks(xlo, xhi)]
    plot.yticks = [(Y(t), _fmt_tick(t), abs(math.log10(t) - round(math.log10(t))) < 1e-9) for t in _log_ticks(lo, hi)]
    placed: list[Box] = [(X(p.size) - 8, Y(p.kld) - 8, X(p.size) + 8, Y(p.kld) + 8) for p in pts]
    # Reference lines, captioned at whichever end of the line is free of markers.
    for value, label, color in refs:
        y = Y(value)
        caption = f"{label} {value:.4g}"
        w = 6.0 * len(caption)
        right: Box = (ml + pw - 6 - w, y - 15, ml + pw - 6, y - 2)
        left: Box = (ml + 6, y - 15, ml + 6 + w, y - 2)
        if _clashes(right, placed) <= _clashes(left, placed):
            placed.append(right)
            plot.refs.append((y, Text(ml + pw - 6, y - 5, "end", color, caption)))
        else:
            placed.append(left)
            plot.refs.append((y, Text(ml + 6, y - 5, "start", color, caption)))
    # The legend goes in the corner that hides the fewest markers and captions.
    plot.kinds = [k for k in KINDS if any(p.kind == k for p in pts)]
    lw, lh = 150, 12 + 20 * len(plot.kinds)
    corners = [(ml + pw - lw - 8, mt + 8), (ml + 8, mt + 8), (ml + pw - lw - 8, mt + ph - lh - 8), (ml + 8, mt + ph - lh - 8)]
    lx, ly = min(corners, key=lambda c: _clashes((c[0] - 12, c[1] - 12, c[0] + lw + 12, c[1] + lh + 12), placed))
    placed.append((lx - 4, ly - 4, lx + lw + 4, ly + lh + 4))
    plot.legend = (lx, ly, lw, lh)
    # Labels, placed greedily where they overlap nothing placed before.
    for p in sorted(pts, key=lambda q: (q.size, q.kld)):
        x, y = X(p.size), Y(p.kld)
        text = p.type if p.kind != "base" else f"{p.type} (base)"
        w = 6.6 * len(text) + 2
        cands = [
            (x + 10, y + 4, "start"), (x - 10, y + 4, "end"), (x, y - 12, "middle"), (x, y + 20, "middle"),
            (x + 9, y - 9, "start"), (x - 9, y - 9, "end"), (x + 9, y + 17, "start"), (x - 9, y + 17, "end"),
        ]  # fmt: skip
        tx, ty, anchor = cands[0]
        box: Box = (tx, ty - 11, tx + w, ty + 3)
        for cx, cy, ca in cands:
            x0 = cx if ca == "start" else cx - w if ca == "end" else cx - w / 2
            cbox = (x0, cy - 11, x0 + w, cy + 3)
            inside = cbox[0] >= ml and cbox[2] <= ml + pw and cbox[1] >= mt and cbox[3] <= mt + ph
            if inside and not _clashes(cbox, placed):
                tx, ty, anchor, box = cx, cy, ca, cbox
                break
        placed.append(box)
        plot.labels.append(Text(tx, ty, anchor, COLORS[p.kind], text))
    for p in pts:
        tip = f"{p.name}: KLD {p.kld:.6f}, {p.size:.1f} MiB"
        if p.same_top is not None:
            tip += f", same top {100 * p.same_top:.2f} %"
        if p.kld <= 0:
            tip += " (KLD ≤ 0, drawn at the bottom)"
        plot.markers.append((p, X(p.size), Y(p.kld), tip))
    return plot


def text_plot(report: Report, width: int = 60, height: int = 14) -> list[str]:
    """A text scatter plot: one letter per type, UPPER case merged, lower case runtime LoRA,
    digits for base variants."""
    pts = _points(report)
    if not pts:
        return []
    lo, hi, floor = _log_range([p.kld for p in pts])
    xlo, xhi = _lin_range([p.size for p in pts])
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    types = list(dict.fromkeys(p.type for p in pts if p.kind != "base"))
    bases = [p.name for p in pts if p.kind == "base"]
    grid = [[" "] * width for _ in range(height)]
    for p in pts:
        if p.kind == "base":
            ch = "0123456789"[bases.index(p.name) % 10]
        else:
            ch = letters[types.index(p.type) % 26]
            ch = ch if p.kind == "merged" else ch.lower()
        col = round((p.size - xlo) / (xhi - xlo) * (width - 1))
        row = height - 1 - round((math.log10(max(p.kld, floor)) - lo) / (hi - lo) * (height - 1))
        grid[row][col] = ch if grid[row][col] == " " else "*"
    lines = []
    for r in range(height):
        y = hi - r / (height - 1) * (hi - lo)
        label = f"{10**y:9.2e}" if r in (0, height // 2, height - 1) else " " * 9
        lines.append(f"{label} |" + "".join(grid[r]).rstrip())
    left, right = f"{xlo:.1f}", f"{xhi:.1f} MiB"
    lines += [
        " " * 10 + "+" + "-" * width,
        " " * 11 + left + " " * max(1, width - len(left) - len(right)) + right,
        "",
        "y: KLD mean (log scale); x: file size. UPPER case = merged, lower case = runtime LoRA, * = overlapping points.",
    ]
    lines += [f"  {letters[i % 26]}/{letters[i % 26].lower()} = {t}" for i, t in enumerate(types)]
    lines += [f"  {i % 10} = {b} (base, no adapter)" for i, b in enumerate(bases)]
    return lines
