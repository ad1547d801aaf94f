"""Shared fixtures: the real SmolLM2 model, an F16 base made from it, and a synthetic model whose
widths are multiples of 256. Built once per test session in a temporary folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def smollm2_q4_1() -> Path:
    fetch = load_script("fetch_smollm2")
    p = fetch.smollm2_path()
    if not p.exists():
        pytest.skip(f"SmolLM2 not cached at {p}; run `make test` (it fetches it) or scripts/fetch_smollm2.py")
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
    mk = load_script("make_synthetic_model")
    return mk.make_model(tmp_path_factory.mktemp("synth") / "synth256-f16.gguf", smollm2_q4_1)


def llama_quantize(inp: Path, out: Path, ftype_id: int) -> None:
    """llama.cpp's own quantizer (byte-identical to llama-quantize), the oracle for whole files."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_id
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
