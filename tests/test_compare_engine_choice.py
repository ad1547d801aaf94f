"""compare.engine / `loraq compare --engine`: the plumbing, without llama-cpp-python.

The engine is validated like every other setting, is part of each compare checkpoint's key (a
variant scored with one engine is rescored with the other), is named in the report, and a missing
llama-cpp-python is one line and exit 2 naming the extra to install, before any work is done.
The engines' agreement on a real model is tests/test_interop_engines.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraq.errors import BadArguments, BadInput
from loraq.llama.llama_cpp_engine import INSTALL_HINT, check_adapter_targets, load_llama_cpp, make_engine
from loraq.pipeline.config import load_config
from loraq.pipeline.runner import build_stages, run_pipeline, stage_status
from tiny_project import make_tiny_project

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(smollm2_q4_1, tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("engine"), smollm2_q4_1)


def _cfg(d: Path, workdir: str, **compare) -> Path:
    cfg = {
        "name": "engine",
        "workdir": workdir,
        "base": "base.gguf",
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": ["Q8_0"]},
        "compare": {"text": "eval.txt", "ctx": 32, "chunks": 2, "runtime_lora": False, **compare},
    }
    p = d / f"{workdir}-{compare.get('engine', 'default')}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def no_llama_cpp(tmp_path) -> dict[str, str]:
    """An environment in which `import llama_cpp` fails as it does where the extra is not installed."""
    fake = tmp_path / "fake-site"
    fake.mkdir()
    (fake / "llama_cpp.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]), COLUMNS="80")


def test_config_accepts_both_engines_and_refuses_others(project):
    assert load_config(_cfg(project, "w")).compare.engine == "numpy"
    assert load_config(_cfg(project, "w", engine="llama.cpp")).compare.engine == "llama.cpp"
    with pytest.raises(BadArguments, match=r"compare\.engine: .*'numpy' or 'llama\.cpp'"):
        load_config(_cfg(project, "w", engine="vllm"))


def test_missing_llama_cpp_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # None in sys.modules: import raises ImportError
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", None)
    with pytest.raises(BadArguments) as e:
        load_llama_cpp()
    assert INSTALL_HINT in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadArguments, match="llama-cpp"):
        make_engine("llama.cpp", "model.gguf")
    with pytest.raises(BadArguments, match="unknown compare engine 'vllm'"):
        make_engine("vllm", "model.gguf")


def _one_line_exit_2(proc: subprocess.CompletedProcess, fragment: str) -> None:
    shown = f"--- stdout:\n{proc.stdout}--- stderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], shown


def test_cli_compare_engine_errors(project, no_llama_cpp, tmp_path):
    base, lora, text = project / "base.gguf", project / "adapter", project / "eval.txt"
    args = [sys.executable, "-m", "loraq", "compare", str(base), "--lora", str(lora), "-f", str(text), "-o", str(tmp_path / "out")]
    bad = subprocess.run([*args, "--engine", "vllm"], capture_output=True, text=True, env=no_llama_cpp, timeout=120)
    _one_line_exit_2(bad, "--engine: unknown engine 'vllm'")
    missing = subprocess.run([*args, "--engine", "llama.cpp"], capture_output=True, text=True, env=no_llama_cpp, timeout=120)
    _one_line_exit_2(missing, INSTALL_HINT)
    assert not (tmp_path / "out").exists()  # refused before the reference was computed


def test_run_refuses_llama_cpp_engine_before_any_stage(project, no_llama_cpp):
    cfgp = _cfg(project, "w-missing", engine="llama.cpp")
    proc = subprocess.run([sys.executable, "-m", "loraq", "run", str(cfgp)], capture_output=True, text=True, env=no_llama_cpp, timeout=120)
    _one_line_exit_2(proc, INSTALL_HINT)
    assert not (project / "w-missing" / "merged-f16.gguf").exists()  # not after merge and quantize


def test_engine_is_part_of_the_score_checkpoint_and_the_report(project):
    cfg = load_config(_cfg(project, "w-key"))
    run_pipeline(cfg)
    report = (cfg.workdir_path / "report.json").read_text()
    assert '"engine": {\n    "name": "numpy"\n  }' in report
    assert "**numpy** engine" in (cfg.workdir_path / "report.md").read_text()
    same = {r.name: r.reason for r in stage_status(load_config(_cfg(project, "w-key", engine="numpy")))}
    assert same["score:merged-Q8_0"] == "up-to-date"  # stating the default changes nothing
    cfg2 = load_config(_cfg(project, "w-key", engine="llama.cpp"))
    other = {r.name: r.reason for r in stage_status(cfg2)}
    assert other["reference"] == "settings-changed" and other["score:base"] == "waits-for:reference", other
    assert other["merge"] == other["quantize:Q8_0"] == "up-to-date"
    # Each score's own key names the engine too: a variant is rescored even where the reference
    # came out byte-identical, and the report (which names the engine) is reassembled.
    keyed = {s.name: s.settings.get("engine") for s in build_stages(cfg2) if s.kind in ("reference", "compare")}
    assert keyed == {"reference": "llama.cpp", "score:base": "llama.cpp", "score:merged-Q8_0": "llama.cpp", "compare": "llama.cpp"}


def test_adapters_llama_cpp_would_abort_on_are_refused_first(project, synth256, tmp_path):
    """llama.cpp asserts (the process aborts, no message) on a token_embd LoRA of a tied model; the
    engine checks every adapter as the numpy engine does before llama.cpp sees it."""
    from loraq.convert import convert_adapter
    from scripts import make_demo_adapter

    base = project / "base.gguf"
    make_demo_adapter.make_adapter(base, tmp_path / "embd", rank=4, targets=["embed_tokens"], layers=[])
    embd = tmp_path / "embd.gguf"
    convert_adapter(tmp_path / "embd", base, embd, outtype="f32")
    with pytest.raises(BadInput, match="tied embeddings"):
        check_adapter_targets(base, embd)
    own = tmp_path / "own.gguf"
    convert_adapter(project / "adapter", base, own, outtype="f16")
    check_adapter_targets(base, own)  # the project's own adapter is fine
    with pytest.raises(BadInput, match="do not fit the base tensor"):  # made for the 64-wide model
        check_adapter_targets(synth256, own)
