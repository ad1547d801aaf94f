"""Shared fixtures and harnesses: the real SmolLM2 model, an F16 base made from it, a synthetic
model whose widths are multiples of 256 (built once per test session in a temporary folder),
llama-cpp-python, and llama.cpp's own quantizer as an oracle.

The test-data generators live in the `scripts` package (`from scripts import make_demo_adapter`);
pytest puts the repository root on sys.path (pyproject: [tool.pytest.ini_options] pythonpath)."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from scripts import fetch_smollm2, make_synthetic_model

ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions, GitLab and others); there a missing input is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need(ok: bool, why: str) -> None:
    """Skip the test when `ok` is false, or fail it in CI, where everything must run."""
    if not ok:
        if in_ci():
            pytest.fail(f"{why} (CI=true: missing inputs fail instead of skipping)", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="session")
def smollm2_q4_1() -> Path:
    """SmolLM2-135M-Instruct Q4_1 in $LORAQ_CACHE (default ~/.cache/loraq), as fetched by
    `make test` / `python -m scripts.fetch_smollm2`. The one place tests find the real model."""
    p = fetch_smollm2.smollm2_path()
    need(p.exists(), f"SmolLM2 not cached at {p}; run `make test` (it fetches it) or `.venv/bin/python -m scripts.fetch_smollm2`")
    return p


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_q4_1, tmp_path_factory) -> Path:
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-f16.gguf"
    quantize_model(smollm2_q4_1, out, "F16", QuantizeOptions(allow_requantize=True, threads=2))
    return out


@pytest.fixture(scope="session")
def synth256(smollm2_q4_1, tmp_path_factory) -> Path:
    """4 layers, n_embd 256, n_ff 768, 4 heads / 2 kv heads, tied embeddings, F16."""
    return make_synthetic_model.make_model(tmp_path_factory.mktemp("synth") / "synth256-f16.gguf", smollm2_q4_1)


@pytest.fixture(scope="session")
def llama_cpp() -> ModuleType:
    """llama-cpp-python (`make test-interop` installs it); tests that need it skip without it."""
    return pytest.importorskip("llama_cpp")


def llama_quantize(inp: Path, out: Path, ftype_id: int) -> None:
    """llama.cpp's own quantizer (byte-identical to llama-quantize), the oracle for whole files."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_id
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
