"""Whole-file quantization against the oracle: every tensor loraq quantizes must equal
`libgguf.quantize_rows` (ggml's reference quantizers, native) on the same rows and type.

Runs on the real SmolLM2 (widths 576/1536: shape fallbacks everywhere) and on a synthetic model
whose widths are multiples of 256 (K types on every tensor), with and without per-column
imatrix weights. Types whose kernels are not implemented are skipped, not faked."""

from __future__ import annotations

import gguf
import libgguf
import numpy as np
import pytest

from loraq.ggml_types import file_type
from loraq.gguf_io import open_gguf
from loraq.kernels import can_quantize
from loraq.quantize.driver import QuantizeOptions, plan_quantize, quantize_model


def _rows(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    x = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.F16:
        x = x.view(np.float16).astype(np.float32)
    elif t.tensor_type == gguf.GGMLQuantizationType.F32:
        x = x.astype(np.float32)
    else:
        raise AssertionError(f"unexpected input type {t.tensor_type}")
    return x.reshape(-1, int(t.shape[0]))


def _imatrix(path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    with open_gguf(path) as f:
        return {t.name: rng.gamma(0.5, 2.0, t.ne[0]).astype(np.float32) for t in f.tensors if t.n_dims >= 2}


def _check_file(src_path, ftype: str, tmp_path, imatrix=None) -> int:
    with open_gguf(src_path) as f:
        plan, _ = plan_quantize(f, file_type(ftype), QuantizeOptions(imatrix=imatrix), dry_run=True)
    missing = sorted({e.dst.name for e in plan if not can_quantize(e.dst)})
    if missing:
        pytest.skip(f"{ftype} needs kernels not implemented yet: {missing}")
    out = tmp_path / f"{ftype}.gguf"
    quantize_model(src_path, out, ftype, QuantizeOptions(imatrix=imatrix, threads=2))
    src, got = gguf.GGUFReader(str(src_path)), gguf.GGUFReader(str(out))
    n_checked = 0
    for t in got.tensors:
        qt = int(t.tensor_type)
        if qt in (0, 1, 30):
            continue
        x = _rows(src, t.name)
        w = None if imatrix is None else imatrix.get(t.name)
        want = np.asarray(libgguf.quantize_rows(x, qt, imatrix=w)).view(np.uint8).reshape(-1)
        have = np.asarray(t.data).view(np.uint8).reshape(-1)
        if not np.array_equal(want, have):
            bs = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qt)][1]
            same = (want.reshape(-1, bs) == have.reshape(-1, bs)).all(1).mean()
            raise AssertionError(f"{t.name} ({t.tensor_type.name}): {same:.4%} of blocks identical")
        n_checked += 1
    assert n_checked > 0
    return n_checked


LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KTYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]


# The real model's whole files are the slow tier (each is a full SmolLM2 quantize plus libgguf on
# every tensor); the synthetic model below covers every type in make test.
@pytest.mark.slow
@pytest.mark.parametrize("ftype", LEGACY + ["Q4_K_M", "Q6_K", "IQ4_XS"])
def test_smollm2_every_tensor_matches_libgguf(smollm2_f16, tmp_path, ftype):
    assert _check_file(smollm2_f16, ftype, tmp_path) >= 210


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_1", "Q4_K_M"])
def test_smollm2_with_imatrix_matches_libgguf(smollm2_f16, tmp_path, ftype):
    assert _check_file(smollm2_f16, ftype, tmp_path, imatrix=_imatrix(smollm2_f16)) >= 210


# make test checks one type of each kernel family on the synthetic model (the kernels' own tests
# cover every type row by row); make test-slow checks the rest.
FAST = {"Q8_0", "Q4_K_M", "IQ4_XS"}


def _tier(types: list[str], fast: set[str]) -> list:
    return [pytest.param(t, marks=() if t in fast else pytest.mark.slow) for t in types]


@pytest.mark.parametrize("ftype", _tier(LEGACY + KTYPES, FAST))
def test_synthetic_256_every_tensor_matches_libgguf(synth256, tmp_path, ftype):
    _check_file(synth256, ftype, tmp_path)


@pytest.mark.parametrize("ftype", _tier(["Q4_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"], {"Q4_K_M"}))
def test_synthetic_256_with_imatrix_matches_libgguf(synth256, tmp_path, ftype):
    _check_file(synth256, ftype, tmp_path, imatrix=_imatrix(synth256))
