"""The deliver stage (workdir/dist/) and the versioned `run --json` event stream.

A tiny synthetic model (SmolLM2's tokenizer and chat template) runs through convert → merge →
quantize → compare → deliver in seconds; the tests read dist/ back: its files, SHA256SUMS, the
model card's numbers against report.json, the Modelfiles, byte-identical reruns elsewhere, and the
refusals (gate failure: exit 3 and no dist/; unknown variant: exit 2)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from markdown_it import MarkdownIt

from loraq.errors import BadArguments, GateFailed
from loraq.gguf_io import KVList, open_gguf
from loraq.gguf_io.writer import GGUFStreamWriter, OutTensor
from loraq.pipeline.config import DeliverBest, load_config
from loraq.pipeline.deliver import CHATML_TEMPLATE, choose_best, ollama_chat
from tiny_project import make_tiny_project

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "events.schema.json").read_text())
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _inputs(d: Path, smollm2_q4_1: Path) -> Path:
    return make_tiny_project(d, smollm2_q4_1)


@pytest.fixture(scope="module")
def project(smollm2_q4_1, tmp_path_factory) -> Path:
    return _inputs(tmp_path_factory.mktemp("deliver") / "a", smollm2_q4_1)


def _write_cfg(d: Path, workdir: str, *, compare: bool = True, gates: dict | None = None, deliver: dict | None = None, **over) -> Path:
    cfg: dict = {
        "name": "tiny-demo",
        "workdir": workdir,
        "base": "base.gguf",
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": ["Q8_0", "Q4_0"]},
    }
    if compare:
        cfg["compare"] = {"text": "eval.txt", "ctx": 32, "chunks": 2, "gates": gates or {"max_kld_mean": 10.0}}
    if deliver is not None:
        cfg["deliver"] = deliver
    cfg.update(over)
    p = d / f"{workdir}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _run(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraq", "run", str(cfg), *args], capture_output=True, text=True, cwd=ROOT)


def _events(out: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in out.stdout.splitlines()]


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _md_table(text: str, first_header: str) -> dict[str, dict[str, str]]:
    """A Markdown table (the one whose first header is `first_header`) as {first cell: {header: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    heads = [h.strip() for h in lines[start].strip("|").split(" | ")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows[cells[0].strip("`")] = dict(zip(heads, cells))
    return rows


def _close(cell: str, value: float, scale: float = 1.0) -> bool:
    """A cell printed with k decimals equals value*scale to within half a unit of its last digit."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell.replace(",", "")) - value * scale) <= 0.5 * 10**-decimals + 1e-12


# ---------------------------------------------------------------------------------------------
# A full run: fixed list + best-within-bounds. The tests that run the pipeline (`loraq run` in a
# subprocess, with compare) are the slow tier (make test-slow); the config checks stay in make test.


@pytest.fixture(scope="module")
def delivered(project) -> dict:
    """One run to score, then deliver (a fixed list plus the best variant within a bound set
    between the scores, so that the bound decides), with --json events."""
    first = _run(_write_cfg(project, "work"))
    assert first.returncode == 0, first.stderr
    report = json.loads((project / "work" / "report.json").read_text())
    kld = {v["name"]: v["kld_mean"] for v in report["variants"]}
    # The bound admits both Q8_0 variants and neither Q4_0 one.
    bound = max(kld["merged-Q8_0"], kld["runtime-Q8_0"]) * 1.01
    assert min(kld["merged-Q4_0"], kld["runtime-Q4_0"]) > bound
    deliver = {"files": ["merged-Q4_0", "runtime-Q8_0"], "best": {"max_kld_mean": bound, "prefer": "smallest"}}
    cfg = _write_cfg(project, "work", deliver=deliver)
    (project / "work" / ".dist.tmp-999999999").mkdir()  # left by a delivery killed with -9
    (project / "work" / ".dist.tmp-999999999" / "merged-Q8_0.gguf").write_bytes(b"half")
    out = _run(cfg, "--json")
    assert out.returncode == 0, out.stderr
    return {"cfg": cfg, "work": project / "work", "report": report, "bound": bound, "events": _events(out)}


@pytest.mark.slow
def test_dist_holds_the_chosen_variants_as_links(delivered):
    work, dist = delivered["work"], delivered["work"] / "dist"
    assert sorted(p.name for p in dist.iterdir()) == [
        "Modelfile.merged-Q4_0",
        "Modelfile.merged-Q8_0",
        "Modelfile.runtime-Q8_0",
        "README.md",
        "SHA256SUMS",
        "adapter-f16.gguf",
        "base-Q8_0.gguf",
        "merged-Q4_0.gguf",
        "merged-Q8_0.gguf",
    ]
    for name in ("merged-Q4_0.gguf", "merged-Q8_0.gguf", "base-Q8_0.gguf", "adapter-f16.gguf"):
        p = dist / name
        assert not p.is_symlink() and p.read_bytes() == (work / name).read_bytes()
        assert p.stat().st_ino == (work / name).stat().st_ino  # a hard link, not a copy, on one file system
    assert not list(work.glob("dist.tmp-*")) and not list(work.glob("dist.old-*"))
    assert not list(work.glob(".dist.tmp-*")) and not list(work.glob(".dist.old.tmp-*"))
    leftovers = [e for e in delivered["events"] if e["event"] == "leftovers"]
    assert [Path(p).name for e in leftovers for p in e["removed"]] == [".dist.tmp-999999999"]
    summary = delivered["events"][-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 0 and summary["dist"] == str(dist)
    assert [s["stage"] for s in summary["stages"] if s["status"] == "ran"] == ["deliver"]


@pytest.mark.slow
def test_best_is_the_smallest_within_bounds(delivered):
    """merged-Q8_0 and runtime-Q8_0 are within the bound; the merged file is smaller (no adapter)."""
    rows = {v["name"]: v for v in delivered["report"]["variants"]}
    assert rows["merged-Q8_0"]["size_bytes"] < rows["runtime-Q8_0"]["size_bytes"]
    card = (delivered["work"] / "dist" / "README.md").read_text()
    assert re.search(r"`merged-Q8_0`: merged into the weights; deliver\.best: the smallest file of 2 of 4 candidates", card)
    best = DeliverBest(max_kld_mean=delivered["bound"])
    names = list(rows)
    assert choose_best(delivered["report"], best, names)[0] == "merged-Q8_0"
    lowest = min(("merged-Q8_0", "runtime-Q8_0"), key=lambda n: rows[n]["kld_mean"])
    assert choose_best(delivered["report"], DeliverBest(max_kld_mean=delivered["bound"], prefer="lowest_kld"), names)[0] == lowest
    assert (
        choose_best(delivered["report"], DeliverBest(max_kld_mean=delivered["bound"], kinds=["runtime_lora"]), names)[0] == "runtime-Q8_0"
    )
    with pytest.raises(GateFailed, match=r"no variant is within max_kld_mean .*merged-Q4_0: kld_mean"):
        choose_best(delivered["report"], DeliverBest(max_kld_mean=min(v["kld_mean"] for v in rows.values()) / 2), names)
    with pytest.raises(GateFailed, match=r"max_size_mib 0\.001"):
        choose_best(delivered["report"], DeliverBest(max_size_mib=0.001), names)


@pytest.mark.slow
def test_sha256sums_check_passes(delivered):
    dist = delivered["work"] / "dist"
    sums = (dist / "SHA256SUMS").read_text()
    names = [line.split("  ", 1)[1] for line in sums.splitlines()]
    assert names == sorted(names) and set(names) == {p.name for p in dist.iterdir()} - {"SHA256SUMS"}
    assert all(re.fullmatch(r"[0-9a-f]{64}  [^/ ]+", line) for line in sums.splitlines())
    ok = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": OK") == len(names)


@pytest.mark.slow
def test_model_card_numbers_equal_the_report(delivered):
    dist, report = delivered["work"] / "dist", delivered["report"]
    card = (dist / "README.md").read_text()
    table = _md_table(card, "variant")
    assert list(table) == ["merged-Q4_0", "runtime-Q8_0", "merged-Q8_0"]
    md = _md_table((delivered["work"] / "report.md").read_text(), "variant")
    rows = {v["name"]: v for v in report["variants"]}
    columns = {  # card header: (report key, scale)
        "size MiB": ("size_bytes", 2**-20),
        "bpw": ("bpw", 1),
        "PPL": ("ppl", 1),
        "KLD mean": ("kld_mean", 1),
        "same top %": ("same_top", 100),
        "effect kept %": ("effect_retention", 100),
    }
    for name, cells in table.items():
        for head, (key, scale) in columns.items():
            assert cells[head] == md[name][head], (name, head)  # rendered identically to report.md
            assert _close(cells[head], rows[name][key], scale), (name, head, cells[head], rows[name][key])
    assert table["runtime-Q8_0"]["files"] == "`base-Q8_0.gguf` + `adapter-f16.gguf`"
    assert "- Base model: `base.gguf` (loraq synthetic 64x2, llama architecture)" in card
    assert "- Adapter: `adapter` at scale 1" in card
    assert "- Quality gates: passed (max_kld_mean 10)" in card
    assert "llama-cli -m merged-Q4_0.gguf\n" in card and "llama-cli -m base-Q8_0.gguf --lora adapter-f16.gguf\n" in card
    assert "ollama create tiny-demo-runtime-q8_0 -f Modelfile.runtime-Q8_0\n" in card

    html = MarkdownIt("commonmark").enable("table").render(card)
    assert html.count("<table>") == 1 and html.count("<tr>") == 1 + len(table)
    assert "<td><code>merged-Q4_0</code></td>" in html
    assert re.search(rf"<td[^>]*>{re.escape(table['merged-Q8_0']['KLD mean'])}</td>", html)
    assert "<code>&lt;|im_start|&gt;</code>" in html  # a pipe in a code span outside a table stays unescaped


@pytest.mark.slow
def test_modelfiles_chatml(delivered):
    dist = delivered["work"] / "dist"
    merged = (dist / "Modelfile.merged-Q4_0").read_text()
    runtime = (dist / "Modelfile.runtime-Q8_0").read_text()
    lines = [line for line in merged.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ./merged-Q4_0.gguf" and "ADAPTER" not in merged
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in merged
    assert CHATML_TEMPLATE == "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    assert f'SYSTEM """{SMOL_SYSTEM}"""' in merged
    assert [line for line in lines if line.startswith("PARAMETER")] == ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    rl = [line for line in runtime.splitlines() if line and not line.startswith("#")]
    assert rl[:2] == ["FROM ./base-Q8_0.gguf", "ADAPTER ./adapter-f16.gguf"]
    for mf in dist.glob("Modelfile.*"):
        for line in mf.read_text().splitlines():
            if line.startswith(("FROM ", "ADAPTER ")):
                assert (dist / line.split(" ", 1)[1]).is_file()


@pytest.mark.slow
def test_no_paths_times_or_hosts_in_deliverables(delivered, project):
    work = delivered["work"]
    texts = [p for p in (work / "dist").iterdir() if not p.name.endswith(".gguf")]
    texts += [work / "report.json", work / "report.md", work / "report.html", project / "adapter" / "adapter_config.json"]
    for p in texts:
        t = p.read_text()
        assert str(project) not in t and str(Path.home()) not in t and "/tmp" not in t, p
        assert socket.gethostname() not in t, p
        assert not re.search(r"20\d\d-\d\d-\d\d", t), p


@pytest.mark.slow
def test_checkpoint_and_status(delivered):
    """deliver is a checkpointed stage: up to date on a rerun, rebuilt when dist/ is damaged."""
    cfg, dist = delivered["cfg"], delivered["work"] / "dist"
    sums = (dist / "SHA256SUMS").read_bytes()
    out = _run(cfg, "--json")
    assert out.returncode == 0 and [e["event"] for e in _events(out)].count("stage_started") == 0
    (dist / "merged-Q4_0.gguf").unlink()
    st = subprocess.run([sys.executable, "-m", "loraq", "status", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert re.search(r"deliver\s.*will run\s.*output-modified", st.stdout), st.stdout
    out = _run(cfg, "--json")
    assert out.returncode == 0 and [e["stage"] for e in _events(out) if e["event"] == "stage_started"] == ["deliver"]
    assert (dist / "SHA256SUMS").read_bytes() == sums and (dist / "merged-Q4_0.gguf").is_file()


# ---------------------------------------------------------------------------------------------
# Byte-identical in another folder


@pytest.mark.slow
def test_identical_dist_in_another_folder(delivered, smollm2_q4_1, tmp_path):
    """The same inputs, made afresh in another folder (the adapter's config included), give the same
    dist/ bytes and the same reports. (Same machine and thread count: BLAS sums in an order that
    depends on both, so compare's last digits may differ on another CPU; docs/design.md, Deliver.)"""
    other = _inputs(tmp_path / "elsewhere" / "b", smollm2_q4_1)
    src = delivered["cfg"].parent
    assert (other / "adapter" / "adapter_config.json").read_bytes() == (src / "adapter" / "adapter_config.json").read_bytes()
    p = shutil.copy(delivered["cfg"], other / "work.yaml")
    out = _run(Path(p))
    assert out.returncode == 0, out.stderr
    a, b = delivered["work"], other / "work"
    assert (b / "dist" / "SHA256SUMS").read_text() == (a / "dist" / "SHA256SUMS").read_text()
    assert _tree(b / "dist") == _tree(a / "dist")
    for name in ("report.json", "report.md", "report.html"):
        assert (b / name).read_bytes() == (a / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.slow
def test_gate_failure_writes_no_dist_and_exits_3(project):
    cfg = _write_cfg(project, "work-gate", gates={"max_kld_mean": 1e-12}, deliver={"files": ["merged-Q8_0"]})
    out = _run(cfg, "--json")
    assert out.returncode == 3, out.stderr
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "merged-Q8_0: kld_mean" in err[0] and "dist/ was not written" in err[0]
    work = project / "work-gate"
    assert not (work / "dist").exists() and not list(work.glob("dist.*"))
    summary = _events(out)[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 3 and summary["dist"] is None
    assert summary["gates"]["passed"] is False and summary["error"] == err[0].removeprefix("error: ")
    jsonschema.validate(summary, SCHEMA)

    # A dist/ from an earlier passing run stays as it was (not replaced by a failing one).
    cfg = _write_cfg(project, "work-gate", deliver={"files": ["merged-Q8_0"]})
    assert _run(cfg).returncode == 0
    before = _tree(work / "dist")
    cfg = _write_cfg(project, "work-gate", gates={"max_kld_mean": 1e-12}, deliver={"files": ["merged-Q8_0", "merged-Q4_0"]})
    assert _run(cfg).returncode == 3
    assert _tree(work / "dist") == before


def test_unknown_variant_and_best_without_compare_exit_2(project):
    cfg = _write_cfg(project, "work-bad", deliver={"files": ["merged-Q8_0", "merged-Q9_0"]})
    out = _run(cfg, "--json")
    assert out.returncode == 2
    assert "deliver: files: unknown variant 'merged-Q9_0'" in out.stderr
    assert "this config builds: merged-Q8_0, merged-Q4_0, runtime-Q8_0, runtime-Q4_0" in out.stderr
    (summary,) = _events(out)
    jsonschema.validate(summary, SCHEMA)
    assert summary["exit_code"] == 2 and summary["stages"] == [] and summary["gates"] is None

    cfg = _write_cfg(project, "work-bad", compare=False, deliver={"best": {"max_kld_mean": 0.1}, "files": ["runtime-Q8_0"]})
    with pytest.raises(BadArguments) as e:
        load_config(cfg)
    assert "deliver: files: unknown variant 'runtime-Q8_0'" in str(e.value) and "this config builds: merged-Q8_0, merged-Q4_0" in str(
        e.value
    )
    assert "best: choosing by quality needs a compare section" in str(e.value)
    for bad, msg in (
        ({}, "nothing to deliver"),
        ({"best": {}}, "set at least one bound"),
        ({"files": ["merged-Q8_0", "merged-Q8_0"]}, "listed twice"),
        ({"files": ["merged-Q8_0"], "bset": {}}, "deliver.bset: unknown key; did you mean 'best'?"),
        ({"best": {"max_size_mb": 100}}, "did you mean 'max_size_mib'?"),
        ({"best": {"max_kld_mean": 0.1, "kinds": ["runtime_lora"]}}, None),
    ):
        p = _write_cfg(project, "work-bad", deliver=bad)
        if msg is None:
            assert load_config(p).deliver is not None
            continue
        with pytest.raises(BadArguments, match=re.escape(msg)):
            load_config(p)
    p = _write_cfg(project, "work-bad", deliver={"best": {"max_kld_mean": 0.1, "kinds": ["runtime_lora"]}}, compare=False)
    with pytest.raises(BadArguments, match="needs a compare section"):
        load_config(p)


def _with_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a GGUF with another tokenizer.chat_template."""
    from gguf import GGUFValueType as V

    with open_gguf(src) as g:
        kvs = KVList((k, kv.raw) for k, kv in g.kvs.items())
        kvs.set("tokenizer.chat_template", V.STRING, template)
        tensors = [OutTensor(t.name, t.ne, t.type) for t in g.tensors]
        with GGUFStreamWriter(dst, kvs, tensors) as w:
            for t in g.tensors:
                w.write(t.name, g.read_raw(t).tobytes())
    return dst


@pytest.mark.slow
def test_unmappable_template_no_compare(project, tmp_path):
    """A fixed list works without a compare section; a template that is not ChatML gets no
    TEMPLATE, and the card says why."""
    d = tmp_path / "llama3"
    d.mkdir()
    _with_chat_template(project / "base.gguf", d / "base.gguf", LLAMA3_TEMPLATE)
    shutil.copytree(project / "adapter", d / "adapter")
    cfg = _write_cfg(d, "work", compare=False, deliver={"files": ["merged-Q8_0"], "adapter": True})
    out = _run(cfg)
    assert out.returncode == 0, out.stderr
    dist = d / "work" / "dist"
    assert sorted(p.name for p in dist.iterdir()) == [
        "Modelfile.merged-Q8_0",
        "README.md",
        "SHA256SUMS",
        "adapter-f16.gguf",
        "merged-Q8_0.gguf",
    ]
    mf = (dist / "Modelfile.merged-Q8_0").read_text()
    assert "FROM ./merged-Q8_0.gguf" in mf
    assert not re.search(r"^(TEMPLATE|SYSTEM|PARAMETER)", mf, re.M)
    assert "# No TEMPLATE: its chat template does not render ChatML" in mf
    card = (dist / "README.md").read_text()
    assert "The Modelfiles have no `TEMPLATE`: its chat template does not render ChatML" in card
    assert "Quality not measured: the config has no compare section." in card
    assert "Also shipped: the GGUF LoRA adapter `adapter-f16.gguf`" in card
    assert _md_table(card, "variant")["merged-Q8_0"]["size MiB"] == f"{(dist / 'merged-Q8_0.gguf').stat().st_size / 2**20:,.1f}"
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dist).returncode == 0


def test_ollama_chat_mapping():
    plain = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    chat, why = ollama_chat(plain, eos="<|endoftext|>", extra_stops=["<|endoftext|>", ""])
    assert chat is not None and why == "" and chat.system is None
    assert chat.template == CHATML_TEMPLATE and chat.stops == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    # A template that drops the generation prompt, or adds a BOS text, is not ChatML as Ollama renders it.
    assert ollama_chat(plain.replace("'<|im_start|>assistant\\n'", "''"))[0] is None
    assert ollama_chat("{{ bos_token }}" + plain, bos="<s>")[0] is None
    assert ollama_chat(LLAMA3_TEMPLATE, bos="<|begin_of_text|>")[0] is None
    assert ollama_chat(None) == (None, "the GGUF has no tokenizer.chat_template")
    assert ollama_chat("{% for x in %}")[1].startswith("rendering its chat template failed")
    assert ollama_chat("{{ raise_exception('no') }}")[1].startswith("rendering its chat template failed")
    # The sandbox refuses attribute tricks and runaway work instead of running them.
    assert ollama_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}")[0] is None
    for hostile in ("{{ 'x' * 10**12 }}", "{{ ['x'] * 100000000 }}", "{{ 9 ** 99999999 }}", "{% for i in range(10**9) %}{% endfor %}"):
        chat, why = ollama_chat(hostile + plain)
        assert chat is None and why == "rendering its chat template failed (SecurityError)", hostile
    assert ollama_chat("{% for i in range(3) %}{% endfor %}" + plain)[0] is not None


# ---------------------------------------------------------------------------------------------
# The --json event stream against docs/events.schema.json


@pytest.mark.slow
def test_json_events_follow_the_schema(project, delivered):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    out = _run(_write_cfg(project, "work-events", deliver={"files": ["runtime-Q4_0"]}), "--json")
    assert out.returncode == 0, out.stderr
    events = _events(out) + delivered["events"]
    for e in events:
        errors = list(validator.iter_errors(e))
        assert not errors, (e, [x.message for x in errors])
        assert e["schema_version"] == 1
    # the fixture plants a killed delivery's folder, which the run reports removing
    assert {e["event"] for e in events} == {"leftovers", "stage_started", "stage_skipped", "stage_done", "summary"}
    fresh = _events(out)
    assert [e["event"] for e in fresh].count("summary") == 1 and fresh[-1]["event"] == "summary"
    ran = [e["stage"] for e in fresh if e["event"] == "stage_done"]
    assert ran[:2] == ["check", "convert"] and ran[-2:] == ["compare", "deliver"]
    assert {"score:base", "score:merged-Q4_0", "score:runtime-Q4_0"} <= set(ran)  # one stage per scored variant
    assert fresh[-1]["dist"] == str(project / "work-events" / "dist")

    # The schema is not vacuous: each of these breaks it.
    done = next(e for e in fresh if e["event"] == "stage_done")
    summary = fresh[-1]
    for bad in (
        {k: v for k, v in done.items() if k != "schema_version"},
        {**done, "schema_version": 2},
        {**done, "event": "stage_finished"},
        {**done, "outputs": [{"path": "x"}]},
        {**done, "stage": "quantize"},
        {**done, "stage": "score:Q4_0"},  # a variant is base, merged-<TYPE> or runtime-<TYPE>
        {k: v for k, v in summary.items() if k != "exit_code"},
        {**summary, "exit_code": 3},  # a failure must carry its error and no dist
        {**summary, "error": "boom"},
        {**summary, "surprise": 1},
    ):
        assert not validator.is_valid(bad), bad


@pytest.mark.parametrize("name", ["smollm2-demo.yaml", "ci-example.yaml"])
def test_shipped_configs_deliver(name):
    """The demo and the CI example validate (their inputs are built by make demo / the workflow)
    and both end with a deliver stage."""
    from loraq.pipeline.config import Config

    cfg = Config.model_validate(yaml.safe_load((ROOT / "configs" / name).read_text()))
    assert cfg.deliver is not None and cfg.deliver.best is not None and cfg.compare is not None
    workflow = yaml.safe_load((ROOT / "docs" / "ci-example.github-workflow.yml").read_text())
    steps = workflow["jobs"]["quantize"]["steps"]
    assert any("loraq run configs/ci-example.yaml --json" in s.get("run", "") for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-artifact") and s["with"]["path"] == "runs/ci-example/dist/" for s in steps)
