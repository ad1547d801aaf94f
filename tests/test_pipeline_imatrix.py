"""`loraq run` with an imatrix stage: quantize.imatrix auto/always/never, size-targeted mixes,
the report marking the better of each with/without pair, deliver skipping the worse, and the
warning when calibration and evaluation texts overlap.

The bytes are checked against oracles: the imatrix variant's blocks against libgguf (ggml's
quantizer given the same per-column weights), the imatrix file against `loraq imatrix` (itself
checked against llama-imatrix in test_imatrix_collect.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from loraq.gguf_io import open_gguf
from loraq.kernels import read_f32
from loraq.pipeline.config import load_config
from loraq.pipeline.runner import overlap_warning, run_pipeline
from loraq.quantize.imatrix_file import quant_weights, read_imatrix
from loraq.quantize.mix import MIX_KV
from tiny_project import TEXT, make_tiny_project

CALIB = "Pack my box with five dozen liquor jugs, then sphinx of black quartz judge my vow. " * 50


@pytest.fixture(scope="module")
def project(smollm2_q4_1, tmp_path_factory) -> Path:
    d = make_tiny_project(tmp_path_factory.mktemp("proj-im"), smollm2_q4_1)
    (d / "calib.txt").write_text(CALIB)
    return d


def _cfg(d: Path, name: str = "cfg.yaml", **over) -> Path:
    cfg = {
        "name": "t",
        "workdir": "work",
        "base": "base.gguf",
        "adapters": [{"path": "adapter"}],
        "imatrix": {"text": "calib.txt", "ctx": 64, "chunks": 2},
        "quantize": {"types": ["Q4_0"], "targets": [{"size_of": "Q4_0"}]},
        "compare": {"text": "eval.txt", "ctx": 64, "chunks": 2, "runtime_lora": False},
    }
    cfg.update(over)
    p = d / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _loraq(*argv: str | Path, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "loraq", *map(str, argv)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # 8 s: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_auto_scores_both_and_a_mix_fits_the_size(project):
    # a 64-wide model: Q4_0's budget is below the smallest mix once the head's type is fixed; Q8_0's is not
    cfg = load_config(_cfg(project, quantize={"types": ["Q4_0", "Q8_0"], "targets": [{"size_of": "Q8_0"}]}))
    reports = run_pipeline(cfg, force="all")
    ran = [r.name for r in reports if r.status == "ran"]
    assert ran[:6] == ["check", "convert", "merge", "imatrix", "sensitivity", "quantize:Q4_0"]
    # Q8_0 ignores an imatrix: built once; a mix at its size may use types that don't: both
    assert ran[6:10] == ["quantize:Q4_0-imatrix", "quantize:Q8_0", "quantize:mix-Q8_0", "quantize:mix-Q8_0-imatrix"]
    assert {"score:merged-Q4_0", "score:merged-Q4_0-imatrix", "score:merged-mix-Q8_0", "score:merged-mix-Q8_0-imatrix", "compare"} <= set(
        ran
    )
    work = cfg.workdir_path

    # The stage's sensitivities are what `loraq sensitivity` writes for the same model, base and text.
    _loraq(
        "sensitivity",
        work / "merged-f16.gguf",
        "-f",
        "calib.txt",
        "-c",
        "64",
        "--chunks",
        "2",
        "--base",
        "base.gguf",
        "-o",
        "cli-sens.json",
        cwd=project,
    )
    assert json.loads((work / "sensitivity.json").read_text()) == json.loads((project / "cli-sens.json").read_text())

    # The stage's imatrix is what `loraq imatrix` writes for the same model, text and ctx.
    _loraq("imatrix", work / "merged-f16.gguf", "-f", "calib.txt", "-c", "64", "--chunks", "2", "-o", "cli-imatrix.gguf", cwd=project)
    assert (work / "imatrix.gguf").read_bytes() == (project / "cli-imatrix.gguf").read_bytes()

    # The imatrix variant's blocks are ggml's for those weights (libgguf), and differ from the plain ones.
    libgguf = pytest.importorskip("libgguf")
    weights = quant_weights(read_imatrix(work / "imatrix.gguf"))
    name = "blk.1.ffn_down.weight"
    with open_gguf(work / "merged-f16.gguf") as g:
        rows = read_f32(g, g.tensor(name))
    want = np.asarray(libgguf.quantize_rows(np.ascontiguousarray(rows), 2, weights[name])).view(np.uint8).ravel()  # 2: q4_0
    with open_gguf(work / "merged-Q4_0-imatrix.gguf") as g, open_gguf(work / "merged-Q4_0.gguf") as p:
        got, plain = g.read_raw(g.tensor(name)), p.read_raw(p.tensor(name))
        assert g.get_str("quantize.imatrix.file") == "imatrix.gguf"  # by its name in the workdir, as typed there
    assert np.array_equal(got, want) and not np.array_equal(got, plain)

    # The mix stays within Q8_0's size and records its choice.
    mix, q8 = work / "merged-mix-Q8_0.gguf", work / "merged-Q8_0.gguf"
    assert mix.stat().st_size <= q8.stat().st_size
    with open_gguf(mix) as g:
        assert g.get_str(MIX_KV)

    rep = json.loads((work / "report.json").read_text())
    rows_ = {v["name"]: v for v in rep["variants"]}
    a, b = rows_["merged-Q4_0"], rows_["merged-Q4_0-imatrix"]
    assert (a["imatrix"], b["imatrix"]) == (False, True) and {a["preferred"], b["preferred"]} == {True, False}
    assert (a["preferred"] is True) == (a["kld_mean"] <= b["kld_mean"])
    m, mi = rows_["merged-mix-Q8_0"], rows_["merged-mix-Q8_0-imatrix"]
    assert m["target"] == mi["target"] == "size of Q8_0" and {m["preferred"], mi["preferred"]} == {True, False}
    md = (work / "report.md").read_text()
    assert "★" in md and "mix (size of Q8_0)" in md and "+im" in md

    # A rerun does nothing.
    assert [r.name for r in run_pipeline(cfg) if r.status == "ran"] == []


def test_deliver_best_never_ships_the_worse_of_a_pair(project):
    cfg = load_config(_cfg(project, workdir="work", deliver={"best": {"max_kld_mean": 100.0}, "files": []}, quantize={"types": ["Q4_0"]}))
    run_pipeline(cfg)
    rep = json.loads((cfg.workdir_path / "report.json").read_text())
    worse = next(v["name"] for v in rep["variants"] if v["preferred"] is False)
    shipped = [p.name for p in (cfg.workdir_path / "dist").iterdir() if p.suffix == ".gguf"]
    assert f"{worse}.gguf" not in shipped and len(shipped) == 1


@pytest.mark.parametrize(
    ("mode", "variants"),
    [
        ("never", ["quantize:Q4_0"]),
        ("always", ["imatrix", "quantize:Q4_0-imatrix"]),
        ("auto", ["imatrix", "quantize:Q4_0", "quantize:Q4_0-imatrix"]),
    ],
)
def test_modes_build_what_they_say(project, mode, variants):
    from loraq.pipeline.runner import build_stages

    cfg = load_config(_cfg(project, quantize={"types": ["Q4_0"], "imatrix": mode}))
    names = [s.name for s in build_stages(cfg) if s.kind in ("imatrix", "quantize")]
    assert names == variants


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"imatrix": None, "quantize": {"types": ["Q4_0"], "imatrix": "always"}}, "needs an imatrix section"),
        ({"imatrix": None, "quantize": {"types": ["Q2_K_S"]}}, "Q2_K_S need an importance matrix"),
        ({"quantize": {"types": ["Q4_0"], "targets": [{"bpw": 4.5, "size_of": "Q4_0"}]}}, "exactly one of bpw and size_of"),
        ({"quantize": {"types": ["Q4_0"], "targets": [{"size_of": "Q4_0"}, {"size_of": "Q4_0"}]}}, "same variant"),
        ({"imatrix": {"text": "missing.txt"}}, "imatrix.text: file not found"),
        ({"imatrix": {"text": "calib.txt", "ctx": 0}}, "imatrix.ctx"),
    ],
)
def test_bad_imatrix_config_is_one_line(project, over, message, capsys):
    from loraq.errors import BadArguments

    with pytest.raises(BadArguments, match=message):
        load_config(_cfg(project, name="bad.yaml", **over))


def test_overlapping_calibration_warns(project):
    (project / "calib-overlap.txt").write_text(CALIB + "\n" + TEXT.replace(". ", ".\n"))
    assert overlap_warning(load_config(_cfg(project))) is None  # disjoint
    w = overlap_warning(load_config(_cfg(project, imatrix={"text": "calib-overlap.txt"})))
    assert w is not None and "also in the calibration text" in w
    assert overlap_warning(load_config(_cfg(project, imatrix={"text": "eval.txt"}))) is not None


def test_compare_reads_chat_jsonl(project, tmp_path):
    """An evaluation JSONL is rendered with the model's chat template, as calibration JSONL is."""
    from loraq.compare.stage import evaluation_tokens
    from loraq.llama.calibration import calibration_tokens

    chats = tmp_path / "eval.jsonl"
    line = {"messages": [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": TEXT[:400]}]}
    chats.write_text("\n".join(json.dumps(line) for _ in range(4)) + "\n")
    stored, _, n = evaluation_tokens(project / "base.gguf", chats, 64, 2)
    ids = calibration_tokens(project / "base.gguf", chats).tokens
    assert n == len(ids) and stored.ravel().tolist() == ids[:128]


def test_further_texts_get_their_own_scores(project, tmp_path):
    """compare.also: a second evaluation text is scored like the main one, in its own folder and
    report section; its figures equal `loraq compare` run on that text alone."""
    other = "She sells sea shells by the sea shore; the shells she sells are surely sea shells. " * 30
    (project / "generic.txt").write_text(other)
    compare = {"text": "eval.txt", "ctx": 64, "chunks": 2, "runtime_lora": False, "also": {"generic": "generic.txt"}}
    cfg = load_config(_cfg(project, workdir="work-also", imatrix=None, quantize={"types": ["Q4_0"]}, compare=compare))
    ran = [r.name for r in run_pipeline(cfg) if r.status == "ran"]
    assert {"reference:generic", "score:generic:merged-Q4_0", "score:generic:base"} <= set(ran)
    work = cfg.workdir_path
    rep = json.loads((work / "report.json").read_text())
    (sec,) = rep["other_texts"]
    assert sec["name"] == "generic" and sec["text"]["path"] == "../generic.txt"
    got = {v["name"]: v["kld_mean"] for v in sec["variants"]}
    assert got.keys() == {v["name"] for v in rep["variants"]} and got != {v["name"]: v["kld_mean"] for v in rep["variants"]}

    out = tmp_path / "cli"
    args = ["base.gguf", "--lora", "adapter", "-f", "generic.txt", "--ctx", "64", "--chunks", "2"]
    _loraq("compare", *args, "--merged", work / "merged-Q4_0.gguf", "-o", out, cwd=project)
    cli = {v["name"]: v["kld_mean"] for v in json.loads((out / "report.json").read_text())["variants"]}
    assert cli["merged-Q4_0"] == got["merged-Q4_0"] and cli["base"] == got["base"]
    md = (work / "report.md").read_text()
    assert "## Also evaluated on `generic`" in md and "Also evaluated on <code>generic</code>" in (work / "report.html").read_text()

    # Dropping the text: only the compare stage reruns (the main text's scores stay).
    cfg2 = load_config(_cfg(project, workdir="work-also", imatrix=None, quantize={"types": ["Q4_0"]}, compare={**compare, "also": {}}))
    assert [r.name for r in run_pipeline(cfg2) if r.status == "ran"] == ["compare"]
    assert "other_texts" not in json.loads((work / "report.json").read_text())


def test_bad_text_name(project):
    from loraq.errors import BadArguments

    compare = {"text": "eval.txt", "also": {"../x": "eval.txt"}}
    with pytest.raises(BadArguments, match="a text's name"):
        load_config(_cfg(project, name="bad2.yaml", compare=compare))
