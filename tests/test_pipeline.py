"""`loraq run` / `loraq status`: skip-when-up-to-date, reruns of exactly the stale stages, reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraq.pipeline.config import load_config
from loraq.pipeline.runner import run_pipeline, stage_status
from scripts import make_demo_adapter as mk_adapter
from tiny_project import make_tiny_project


@pytest.fixture(scope="module")
def project(smollm2_q4_1, tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("proj"), smollm2_q4_1)


def _write_cfg(d: Path, **over) -> Path:
    cfg = {
        "name": "t",
        "workdir": "work",
        "base": "base.gguf",
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": ["Q8_0", "Q4_0"]},
    }
    cfg.update(over)
    p = d / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _snapshot(work: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(work.iterdir())}


def _ran(reports) -> list[str]:
    return [r.name for r in reports if r.status == "ran"]


def test_run_skip_and_rerun_exactly_what_changed(project):
    cfg = load_config(_write_cfg(project))
    first = run_pipeline(cfg, force="all")
    assert _ran(first) == ["check", "convert", "merge", "quantize:Q8_0", "quantize:Q4_0"]
    work = cfg.workdir_path
    snap = _snapshot(work)
    assert set(snap) == {"check.json", "adapter-f16.gguf", "merged-f16.gguf", "merged-Q8_0.gguf", "merged-Q4_0.gguf", "manifest.json"}

    again = run_pipeline(cfg)
    assert _ran(again) == [] and {r.reason for r in again} == {"up-to-date"}
    assert _snapshot(work) == snap  # a second run changes no file, the manifest included

    # Touching without changing content: re-hashed, still up to date.
    st = project / "adapter" / "adapter_model.safetensors"
    st.touch()
    assert _ran(run_pipeline(cfg)) == []

    # Changing the adapter reruns every stage after it, and reports why.
    mk_adapter.make_adapter(project / "base.gguf", project / "adapter", rank=4, seed=1)
    status = {r.name: r.reason for r in stage_status(cfg)}
    assert status == {
        "check": "input-changed:adapter",
        "convert": "input-changed:adapter",
        "merge": "input-changed:adapter",
        "quantize:Q8_0": "waits-for:merge",
        "quantize:Q4_0": "waits-for:merge",
    }
    assert _ran(run_pipeline(cfg)) == ["check", "convert", "merge", "quantize:Q8_0", "quantize:Q4_0"]

    # Damaged or missing outputs rerun only their own stage.
    q4 = work / "merged-Q4_0.gguf"
    data = bytearray(q4.read_bytes())
    data[-100] ^= 0xFF
    q4.write_bytes(bytes(data))
    (work / "merged-Q8_0.gguf").unlink()
    status = {r.name: r.reason for r in stage_status(cfg)}
    assert status["quantize:Q4_0"] == "output-modified" and status["quantize:Q8_0"] == "output-missing"
    assert status["merge"] == "up-to-date"
    assert _ran(run_pipeline(cfg)) == ["quantize:Q8_0", "quantize:Q4_0"]

    # Settings: only the stage whose settings changed (and what it feeds) reruns.
    cfg2 = load_config(_write_cfg(project, convert={"outtype": "f32"}))
    assert _ran(run_pipeline(cfg2)) == ["convert"]
    cfg3 = load_config(_write_cfg(project, convert={"outtype": "f32"}, quantize={"types": ["Q8_0", "Q4_0", "Q5_1"]}))
    assert _ran(run_pipeline(cfg3)) == ["check", "quantize:Q5_1"]  # check's verdicts cover every type


def test_rerun_is_byte_identical(project):
    cfg = load_config(_write_cfg(project))
    run_pipeline(cfg)
    work = cfg.workdir_path
    before = {p.name: p.read_bytes() for p in work.glob("*.gguf")}
    run_pipeline(cfg, force="all")
    after = {p.name: p.read_bytes() for p in work.glob("*.gguf")}
    assert before == after


def test_until_and_force_one_stage(project):
    cfg = load_config(_write_cfg(project, workdir="work-until"))
    assert _ran(run_pipeline(cfg, until="merge")) == ["check", "convert", "merge"]
    assert _ran(run_pipeline(cfg)) == ["quantize:Q8_0", "quantize:Q4_0"]
    assert _ran(run_pipeline(cfg, force="quantize:Q4_0")) == ["quantize:Q4_0"]
    assert _ran(run_pipeline(cfg, force="quantize")) == ["quantize:Q8_0", "quantize:Q4_0"]


def test_cli_json_events(project):
    cfgp = _write_cfg(project, workdir="work-json")
    out = subprocess.run([sys.executable, "-m", "loraq.cli", "run", str(cfgp), "--json"], capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("stage_started") == 5 and kinds.count("stage_done") == 5 and kinds[-1] == "summary"
    out = subprocess.run([sys.executable, "-m", "loraq.cli", "status", str(cfgp)], capture_output=True, text=True, check=True)
    assert out.stdout.count("up-to-date") == 5 and "will run" not in out.stdout


def test_config_errors_all_at_once_with_near_miss(project):
    from loraq.errors import BadArguments

    p = project / "bad.yaml"
    p.write_text(
        yaml.safe_dump(
            {"name": "t", "workdir": "w", "base": "missing.gguf", "adapterz": [], "quantize": {"typez": ["Q4_0"], "types": ["Q9_9"]}}
        )
    )
    with pytest.raises(BadArguments) as e:
        load_config(p)
    msg = str(e.value)
    assert "adapterz: unknown key; did you mean 'adapters'?" in msg
    assert "quantize.typez: unknown key; did you mean 'types'?" in msg
    assert "quantize.types" in msg and "Q9_9" in msg
    assert "adapters: Field required" in msg
    assert "\n" not in msg


def test_batched_quantize_equals_single_quantize(project, tmp_path):
    """The run reads the F16 once for all types; each file must equal a one-type quantize."""
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    cfg = load_config(_write_cfg(project, workdir="work-batch"))
    run_pipeline(cfg)
    work = cfg.workdir_path
    for t in ("Q8_0", "Q4_0"):
        single = tmp_path / f"{t}.gguf"
        quantize_model(work / "merged-f16.gguf", single, t, QuantizeOptions(threads=1))
        assert single.read_bytes() == (work / f"merged-{t}.gguf").read_bytes(), t


def test_compare_stage_report_and_gate_exit_3(project):
    """The compare stage writes the report with every variant; a gate set too tight exits 3 and
    names the failing variant and metric, on the run that scored it and on every later run."""
    text = project / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    cfgp = _write_cfg(
        project,
        workdir="work-cmp",
        quantize={"types": ["Q8_0"]},
        compare={"text": "eval.txt", "ctx": 32, "chunks": 2, "gates": {"max_kld_mean": 1e-12}},
    )
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "loraq.cli", "run", str(cfgp)], capture_output=True, text=True)
        assert out.returncode == 3, out.stderr
        err = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(err) == 1 and "Traceback" not in out.stderr
        assert "merged-Q8_0: kld_mean" in err[0] and "max_kld_mean" in err[0]
    report = json.loads((project / "work-cmp" / "report.json").read_text())
    names = {v["name"] for v in report["variants"]}
    assert names == {"base", "merged-Q8_0", "runtime-Q8_0"}
    assert report["gates"]["passed"] is False
    for v in report["variants"]:
        assert v["size_bytes"] > 0 and v["kld_mean"] is not None and 0 <= v["same_top"] <= 1
    assert (project / "work-cmp" / "report.html").read_text().count("<svg") == 1
    # Relaxing the gate needs no rescoring: the same run now passes with every stage skipped.
    cfgp = _write_cfg(
        project,
        workdir="work-cmp",
        quantize={"types": ["Q8_0"]},
        compare={"text": "eval.txt", "ctx": 32, "chunks": 2, "gates": {"max_kld_mean": 10.0}},
    )
    out = subprocess.run([sys.executable, "-m", "loraq.cli", "run", str(cfgp), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(e["event"] == "stage_skipped" for e in events[:-1]) and events[-1]["gates"]["passed"]


def test_qlora_merge_scores_both_precisions_and_check_runs_first(project):
    """merge.base_precision nf4_roundtrip: the merge stage writes what `loraq merge --base-precision
    nf4_roundtrip` writes, merge-original the plain merge, and compare scores both merged files,
    the report naming the one with the lower PPL; the check stage writes its verdicts first."""
    compare = {"text": "eval.txt", "ctx": 64, "chunks": 2, "runtime_lora": False}
    cfg = load_config(_write_cfg(project, workdir="work-qlora", merge={"base_precision": "nf4_roundtrip"}, compare=compare))
    ran = _ran(run_pipeline(cfg))
    assert ran[:4] == ["check", "convert", "merge", "merge-original"]
    work = cfg.workdir_path
    cli = work.parent / "cli-nf4.gguf"
    subprocess.run(
        [sys.executable, "-m", "loraq", "merge", "base.gguf", "--lora", "adapter", "-o", str(cli), "--base-precision", "nf4_roundtrip"],
        cwd=project,
        check=True,
        capture_output=True,
    )
    assert (work / "merged-f16.gguf").read_bytes() == cli.read_bytes()
    assert (work / "merged-original-f16.gguf").read_bytes() != (work / "merged-f16.gguf").read_bytes()
    rep = json.loads((work / "report.json").read_text())
    rows = {v["name"]: v for v in rep["variants"]}
    a, b = rows["merged-f16-nf4"], rows["merged-f16-original"]
    assert a["ppl"] != b["ppl"]
    better = "merged-f16-nf4" if a["ppl"] < b["ppl"] else "merged-f16-original"
    assert f"`{better}` keeps more of the fine-tune" in (work / "report.md").read_text()
    check = json.loads((work / "check.json").read_text())
    assert [s["ftype"] for s in check["summaries"]] == ["Q8_0", "Q4_0"] and "seconds" not in check
