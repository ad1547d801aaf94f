"""Incremental compare: each variant's scores are their own checkpoint (score:<variant>), so adding a
type to a config scores only that type's variants, and the report assembled from the score files
is byte-identical to one scored in a single pass (compare_models)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from loraq.compare.stage import Candidate, compare_models
from loraq.errors import BadInput
from loraq.pipeline.config import load_config
from loraq.pipeline.runner import run_pipeline, stage_status
from tiny_project import make_tiny_project

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "events.schema.json").read_text())
REPORTS = ("report.json", "report.md", "report.html")


@pytest.fixture(scope="module")
def project(smollm2_q4_1, tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("incr"), smollm2_q4_1)


def _write_cfg(d: Path, workdir: str, types: list[str], kv_cache: str | None = None) -> Path:
    cfg = {
        "name": "incr",
        "workdir": workdir,
        "base": "base.gguf",
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": types},
        "compare": {"text": "eval.txt", "ctx": 32, "chunks": 2, "gates": {"max_kld_mean": 10.0}},
    }
    if kv_cache is not None:
        cfg["compare"]["kv_cache"] = kv_cache  # type: ignore[index]
    p = d / f"{workdir}-{'-'.join(types)}{'-' + kv_cache if kv_cache else ''}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _ran(reports) -> list[str]:
    return [r.name for r in reports if r.status == "ran"]


def _reports(work: Path) -> dict[str, bytes]:
    return {n: (work / n).read_bytes() for n in REPORTS}


SCORES_Q8 = ["score:base", "score:merged-Q8_0", "score:runtime-Q8_0"]


def test_adding_a_type_scores_only_its_variants(project):
    cfg1 = load_config(_write_cfg(project, "work", ["Q8_0"]))
    t0 = time.perf_counter()
    first = run_pipeline(cfg1)
    t_first = time.perf_counter() - t0
    assert _ran(first) == ["check", "convert", "merge", "quantize:Q8_0", "quantize-base:Q8_0", "reference", *SCORES_Q8, "compare"]
    work = cfg1.workdir_path
    assert sorted(p.name for p in (work / "scores").iterdir()) == ["base.json", "merged-Q8_0.json", "runtime-Q8_0.json"]

    # Add Q4_0: status says the old scores are up to date and the new ones wait for their files.
    cfgp = _write_cfg(project, "work", ["Q8_0", "Q4_0"])
    status = {r.name: r.reason for r in stage_status(load_config(cfgp))}
    assert {k: status[k] for k in ("reference", *SCORES_Q8)} == dict.fromkeys(("reference", *SCORES_Q8), "up-to-date")
    assert status["score:merged-Q4_0"] == "waits-for:quantize:Q4_0" and status["score:runtime-Q4_0"] == "waits-for:quantize-base:Q4_0"
    assert status["compare"] == "waits-for:score:merged-Q4_0"

    # The rerun (through the CLI, as a user runs it): its events say which variants were scored
    # and which were skipped.
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "loraq", "run", str(cfgp), "--json"], capture_output=True, text=True, cwd=ROOT)
    t_add = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    for e in events:
        jsonschema.validate(e, SCHEMA)
    done = [e["stage"] for e in events if e["event"] == "stage_done"]
    skipped = [e["stage"] for e in events if e["event"] == "stage_skipped"]
    assert done == ["check", "quantize:Q4_0", "quantize-base:Q4_0", "score:merged-Q4_0", "score:runtime-Q4_0", "compare"]
    assert skipped == ["convert", "merge", "quantize:Q8_0", "quantize-base:Q8_0", "reference", *SCORES_Q8]
    summary = {s["stage"]: s["status"] for s in events[-1]["stages"]}
    assert summary["score:merged-Q4_0"] == "ran" and summary["score:merged-Q8_0"] == "skipped"
    print(f"\nsynthetic timings: first run (Q8_0) {t_first:.2f}s, add Q4_0 (CLI, incl. startup) {t_add:.2f}s")

    # The same report as a from-scratch run with both types, and as one compare_models pass.
    cfg2 = load_config(cfgp)
    incremental = _reports(work)
    fresh = load_config(_write_cfg(project, "work-fresh", ["Q8_0", "Q4_0"]))
    run_pipeline(fresh)
    assert _reports(fresh.workdir_path) == incremental
    names = [r["name"] for r in json.loads(incremental["report.json"])["variants"]]
    assert names == ["base", "merged-Q8_0", "merged-Q4_0", "runtime-Q8_0", "runtime-Q4_0"]

    # compare_models scores in one pass and writes the reports itself: byte for byte the same.
    adapter = [(work / "adapter-f16.gguf", 1.0)]
    cands = [Candidate("base", "base", "F16", project / "base.gguf")]
    cands += [Candidate(f"merged-{t}", "merged", t, work / f"merged-{t}.gguf") for t in ("Q8_0", "Q4_0")]
    cands += [
        Candidate(f"runtime-{t}", "runtime_lora", t, work / f"base-{t}.gguf", adapter, [work / f"base-{t}.gguf", adapter[0][0]])
        for t in ("Q8_0", "Q4_0")
    ]
    for n in REPORTS:
        (work / n).unlink()
    assert cfg2.compare is not None
    compare_models(work / "reference.kld", cands, project / "eval.txt", work, cfg2.compare.gates)
    assert _reports(work) == incremental

    # Nothing left to do; --force=compare rescores every variant (and reassembles the report).
    assert _ran(run_pipeline(cfg2)) == []
    every = [*SCORES_Q8[:2], "score:merged-Q4_0", "score:runtime-Q8_0", "score:runtime-Q4_0", "compare"]
    assert _ran(run_pipeline(cfg2, force="compare")) == every
    assert _reports(work) == incremental
    # One variant can be rescored by name; the same scores leave the report up to date.
    assert _ran(run_pipeline(cfg2, force="score:runtime-Q4_0")) == ["score:runtime-Q4_0"]


def test_damaged_or_foreign_score_file(project, tmp_path):
    """A hand-edited score file reruns only its own stage; a score file of another variant is refused."""
    cfg = load_config(_write_cfg(project, "work-damage", ["Q8_0"]))
    run_pipeline(cfg)
    work = cfg.workdir_path
    path = work / "scores" / "merged-Q8_0.json"
    doc = json.loads(path.read_text())
    doc["stats"]["kld_mean"] = 123.0
    path.write_text(json.dumps(doc))
    assert {r.name: r.reason for r in stage_status(cfg)}["score:merged-Q8_0"] == "output-modified"
    before = (work / "report.json").read_bytes()
    # Rescored to the bytes the report was assembled from: the report stays as it was.
    assert _ran(run_pipeline(cfg)) == ["score:merged-Q8_0"]
    assert (work / "report.json").read_bytes() == before and json.loads(path.read_text())["stats"]["kld_mean"] != 123.0

    from loraq.compare.stage import read_score

    other = tmp_path / "x.json"
    shutil.copyfile(work / "scores" / "base.json", other)
    with pytest.raises(BadInput, match="not a loraq score file"):
        read_score(other, Candidate("merged-Q8_0", "merged", "Q8_0", work / "merged-Q8_0.gguf"))
    other.write_text("{}")
    with pytest.raises(BadInput, match="not a loraq score file"):
        read_score(other, Candidate("base", "base", "F16", project / "base.gguf"))


def test_kv_cache_is_a_setting_of_reference_and_scores(project):
    """compare.kv_cache changes the numbers: the reference and every score rerun, and the report says which."""
    first = run_pipeline(load_config(_write_cfg(project, "work-kv", ["Q8_0"])))
    assert "reference" in _ran(first)
    work = load_config(_write_cfg(project, "work-kv", ["Q8_0"])).workdir_path
    assert json.loads((work / "report.json").read_text())["text"]["kv_cache"] == "f32"
    kld32 = json.loads((work / "report.json").read_text())["variants"][1]["kld_mean"]

    cfg16 = load_config(_write_cfg(project, "work-kv", ["Q8_0"], kv_cache="f16"))
    status = {r.name: r.reason for r in stage_status(cfg16)}
    assert status["quantize:Q8_0"] == "up-to-date"  # nothing upstream of compare is redone
    assert all(status[k] != "up-to-date" for k in ("reference", *SCORES_Q8))
    second = run_pipeline(cfg16)
    assert _ran(second) == ["reference", *SCORES_Q8, "compare"]
    report = json.loads((work / "report.json").read_text())
    assert report["text"]["kv_cache"] == "f16"
    assert report["variants"][1]["kld_mean"] != kld32
    assert "KV cache: f16" in (work / "report.md").read_text()
