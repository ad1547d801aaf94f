"""report.json, report.md and report.html, each written atomically.

The HTML comes from templates/report.html.j2 with autoescaping: variant names and paths are the
user's, and the page must stay inert (no script, nothing fetched)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

import jinja2
from markupsafe import Markup, escape

from ..atomic import atomic_output
from .gates import GATED_KINDS, GateFailure, GateLimits, check_gates
from .plot import COLORS, KIND_LABEL, svg_plot, text_plot
from .report import report_json
from .schema import OtherTextReport, Report, VariantRow

COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    # header, key, formatter
    ("variant", "name", str),
    ("kind", "kind", lambda k: {"runtime_lora": "runtime LoRA"}.get(str(k), str(k))),
    ("type", "type", str),
    ("imatrix", "imatrix", lambda b: "yes" if b else "no"),
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


PAIR_NOTE = (
    "★ the better of a type's pair with and without the importance matrix (quantize.imatrix: auto): "
    "the only one of the two that deliver may ship."
)


def qlora_note(report: Report) -> str | None:
    """merge.base_precision nf4_roundtrip: which merged file keeps more of the fine-tune, by PPL on
    the evaluation text (KLD to the F16 reference would favour the original merge by construction)."""
    rows = {
        v["name"].rsplit("-", 1)[-1]: v for v in report["variants"] if v["kind"] == "merged" and v["name"].endswith(("-nf4", "-original"))
    }
    a, b = rows.get("nf4"), rows.get("original")
    if a is None or b is None or a["ppl"] is None or b["ppl"] is None:
        return None
    better = a if a["ppl"] < b["ppl"] else b
    return (
        f"QLoRA: merged into the NF4-roundtripped weights (as trained) PPL {a['ppl']:.4f}, into the original weights "
        f"PPL {b['ppl']:.4f}: `{better['name']}` keeps more of the fine-tune on this text (lower PPL)."
    )


def _rows(report: Report, failures: list[GateFailure]) -> list[tuple[VariantRow, list[str], str]]:
    """Each variant with its formatted cells and its gate status ("ok", "FAIL", or "–" when not gated)."""
    failed = {f.variant for f in failures}
    rows = []
    for v in report["variants"]:
        cells = ["–" if v.get(key) is None else fmt(v.get(key)) for _, key, fmt in COLUMNS]  # type: ignore[arg-type]
        if v["kind"] == "base":
            cells[3] = "–"
        if v.get("target"):
            cells[2] += f" mix ({v.get('target')})"
        if v.get("preferred") is True:
            cells[3] += " ★"
        status = "–" if v["kind"] not in GATED_KINDS else "FAIL" if v["name"] in failed else "ok"
        rows.append((v, cells, status))
    return rows


def _summary_lines(report: Report) -> list[str]:
    t, r, a = report["text"], report["reference"], report["adapter_effect"]
    scored = t["chunks"] * (t["ctx"] - 1 - t["ctx"] // 2)
    ppl = "–" if r["ppl"] is None else f"{r['ppl']:.4f}"
    akld = "–" if a["kld_mean"] is None else f"{a['kld_mean']:.6f}"
    return [
        (
            f"Evaluation text `{t['path']}`: {t['tokens']} tokens, {t['chunks']} chunks of {t['ctx']} "
            f"({scored} scored positions: the second half of each chunk, as llama-perplexity); KV cache: {t.get('kv_cache', 'f32')}."
        ),
        f"Reference **{r['name']}**: PPL {ppl}. Logits computed by the **{report.get('engine', {}).get('name', 'numpy')}** engine.",
        (f"Adapter effect, KLD(reference ‖ base without adapter): {akld}. *effect kept* = 1 − KLD(reference ‖ variant) / adapter effect."),
    ]


def _other_texts(report: Report) -> list[tuple[OtherTextReport, list[str], list[list[str]]]]:
    """compare.also: each further text with its summary lines and its table's cells (not gated)."""
    out = []
    for o in report.get("other_texts", []):
        sub = cast(Report, {**report, **o, "other_texts": []})
        out.append((o, _summary_lines(sub), [cells for _, cells, _ in _rows(sub, [])]))
    return out


def render_markdown(report: Report, gates: GateLimits) -> str:
    failures = check_gates(report, gates)
    out = ["# loraq report", ""]
    out += [f"{line}  " for line in _summary_lines(report)]
    out += ["", f"Quality gates: **failed** ({len(failures)})." if failures else "Quality gates: **passed**.", ""]
    heads = [h for h, _, _ in COLUMNS] + ["gates"]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(heads) - 1)) + "|:---:|")
    for _, cells, status in _rows(report, failures):
        cells = [c.replace("|", "\\|") for c in cells]
        out.append(f"| `{cells[0]}` | " + " | ".join(cells[1:] + [status]) + " |")
    if any(v.get("preferred") is not None for v in report["variants"]):
        out += ["", PAIR_NOTE]
    if note := qlora_note(report):
        out += ["", note]
    if failures:
        out += ["", "Gate failures:", ""] + [f"- {f}" for f in failures]
    if plot := text_plot(report):
        out += ["", "## KLD against file size", "", "```text", *plot, "```"]
    for o, summary, rows in _other_texts(report):
        out += ["", f"## Also evaluated on `{o['name']}`", ""] + [f"{line}  " for line in summary] + [""]
        out.append("| " + " | ".join(heads[:-1]) + " |")
        out.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(heads) - 1)) + "|")
        for cells in rows:
            cells = [c.replace("|", "\\|") for c in cells]
            out.append(f"| `{cells[0]}` | " + " | ".join(cells[1:]) + " |")
    out += ["", f"loraq {report['loraq_version']}. KLD, same top and Δp as llama-perplexity --kl-divergence.", ""]
    return "\n".join(out)


def _md_inline(s: str) -> Markup:
    """The summary lines' tiny Markdown (`code`, **bold**, *em*) as HTML, the text escaped first."""
    s = str(escape(s))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return Markup(re.sub(r"\*([^*]+)\*", r"<i>\1</i>", s))


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("loraq.compare", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_env.filters.update(md_inline=_md_inline, f1=lambda x: f"{x:.1f}")


def render_html(report: Report, gates: GateLimits) -> str:
    failures = check_gates(report, gates)
    return _env.get_template("report.html.j2").render(
        report=report,
        summary=_summary_lines(report),
        failures=failures,
        heads=[h for h, _, _ in COLUMNS],
        rows=_rows(report, failures),
        others=_other_texts(report),
        pair_note=PAIR_NOTE if any(v.get("preferred") is not None for v in report["variants"]) else "",
        qlora_note=qlora_note(report) or "",
        plot=svg_plot(report, gates),
        colors=COLORS,
        kind_label=KIND_LABEL,
    )


def write_reports(report: Report, workdir: Path | str, gates: GateLimits) -> dict[str, Path]:
    """Write report.json, report.md and report.html into workdir, each atomically.

    `gates` must be those the report was built with: the Markdown and HTML mark the variants that
    fail them, and the plot draws the max_kld_mean limit."""
    docs = {"json": report_json(report), "md": render_markdown(report, gates), "html": render_html(report, gates)}
    paths = {}
    for key, text in docs.items():
        final = Path(workdir) / f"report.{key}"
        with atomic_output(final) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths[key] = final
    return paths
