"""`loraq quantize --imatrix` against llama.cpp (issue 10, must-show 1).

Oracles:
- the native `llama-quantize --imatrix <loraq's file>` (built by `python -m scripts.build_llama_tools`,
  dev only; found through $LORAQ_LLAMA_BIN or $LORAQ_CACHE/llama.cpp-build/bin, skipped with a
  reason when absent) writes the same bytes as `loraq quantize --imatrix` for Q4_K_M, Q3_K_M,
  IQ4_XS, Q2_K_S and Q4_0, from a GGUF and a .dat imatrix, on the real SmolLM2 F16 and on a
  synthetic model whose widths are multiples of 256; with --include-weights/--exclude-weights too.
  That checks the file reader, llama-quantize's division, the KVs and the driver at once.
- llama-cpp-python's `llama_model_quantize` (no native build needed) given the same per-column
  weights and the same KV overrides llama-quantize passes: the driver's use of the weights and
  the quantize.imatrix.* KVs as llama.cpp writes them.

The imatrix is random but shaped like a real one: log-normal mean squares with a few outlier
columns, every count a whole number of chunks."""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from loraq.cli import run_cli
from loraq.ggml_types import file_type
from loraq.gguf_io import open_gguf
from loraq.quantize.imatrix_file import (
    ImatrixData,
    ImatrixEntry,
    quant_weights,
    quantize_kvs,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from scripts.build_llama_tools import bin_dir, tool

FTYPES = ["Q4_K_M", "Q3_K_M", "IQ4_XS", "Q2_K_S", "Q4_0"]


def realistic_imatrix(model: Path, seed: int = 1, chunks: int = 10, chunk_size: int = 512) -> ImatrixData:
    """What llama-imatrix collects: every 2-D+ weight of a block (one matrix per expert)."""
    rng = np.random.default_rng(seed)
    entries = {}
    with open_gguf(model) as f:
        for t in f.tensors:
            if not t.name.startswith("blk.") or t.n_dims < 2:
                continue
            n_mat = t.ne[2] if len(t.ne) > 2 else 1
            mean = rng.lognormal(0.0, 1.0, (n_mat, t.ne[0])).astype(np.float32)
            mean[:, rng.integers(0, t.ne[0], 3)] *= 50  # a few outlier channels, as real activations have
            counts = np.full(n_mat, chunks * chunk_size, np.float32)
            entries[t.name] = ImatrixEntry((mean * counts[:, None]).astype(np.float32), counts)
    return ImatrixData(entries, chunks, chunk_size, ["calibration.txt"])


@pytest.fixture(scope="module")
def imatrices(synth256, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imat")
    data = realistic_imatrix(synth256)
    return {"gguf": write_imatrix_gguf(d / "synth.imatrix.gguf", data), "dat": write_imatrix_dat(d / "synth.imatrix.dat", data)}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _loraq(argv: list[str | Path]) -> None:
    code = run_cli(["quantize", *map(str, argv), "--threads", "2"])
    assert code == 0, f"loraq quantize {argv} exited {code}"


def _kvs(path: Path) -> dict[str, tuple[gguf.GGUFValueType, object]]:
    r = gguf.GGUFReader(str(path))
    return {f.name: (f.types[0], f.contents()) for f in r.fields.values() if f.name.startswith("quantize.")}


# ------------------------------------------------------------------------------------------------
# Without native tools
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # 9 s: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_imatrix_kvs_and_q2_k_s(synth256, imatrices, tmp_path, capsys):
    """Q2_K_S refuses to run without an imatrix and runs with one; the file records it as
    llama-quantize does (the --imatrix argument as typed, UINT32 counts, in this order)."""
    out = tmp_path / "q2ks.gguf"
    assert run_cli(["quantize", str(synth256), str(out), "Q2_K_S"]) == 2
    assert "needs an importance matrix" in capsys.readouterr().err and not out.exists()
    _loraq([synth256, out, "Q2_K_S", "--imatrix", imatrices["gguf"]])
    kvs = _kvs(out)
    assert list(kvs) == [
        "quantize.imatrix.file",
        "quantize.imatrix.dataset",
        "quantize.imatrix.entries_count",
        "quantize.imatrix.chunks_count",
    ]
    assert kvs["quantize.imatrix.file"] == (gguf.GGUFValueType.STRING, str(imatrices["gguf"]))
    assert kvs["quantize.imatrix.dataset"] == (gguf.GGUFValueType.STRING, "calibration.txt")
    assert kvs["quantize.imatrix.entries_count"] == (gguf.GGUFValueType.UINT32, 28)  # 4 layers × 7 matrices
    assert kvs["quantize.imatrix.chunks_count"] == (gguf.GGUFValueType.UINT32, 10)
    # the KVs come last, after general.quantization_version and general.file_type
    names = [f.name for f in gguf.GGUFReader(str(out)).fields.values()]
    assert names[-6:-4] == ["general.quantization_version", "general.file_type"]


def test_filters_that_leave_nothing_mean_no_imatrix(synth256, imatrices, tmp_path):
    plain, filtered = tmp_path / "plain.gguf", tmp_path / "filtered.gguf"
    _loraq([synth256, plain, "Q4_K_M"])
    _loraq([synth256, filtered, "Q4_K_M", "--imatrix", imatrices["dat"], "--include-weights", "no-such-tensor"])
    assert _sha(plain) == _sha(filtered)


def test_missing_entry_for_a_required_tensor_fails_cleanly(synth256, imatrices, tmp_path, capsys):
    out = tmp_path / "q2ks.gguf"
    code = run_cli(["quantize", str(synth256), str(out), "Q2_K_S", "--imatrix", str(imatrices["gguf"]), "--exclude-weights", "ffn_up"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "no entry for blk.0.ffn_up.weight" in err[0], err
    assert not out.exists()


def test_bad_imatrix_options(synth256, imatrices, tmp_path, capsys):
    imat = str(imatrices["gguf"])
    both = [
        "quantize",
        str(synth256),
        str(tmp_path / "o.gguf"),
        "Q4_0",
        "--imatrix",
        imat,
        "--include-weights",
        "a",
        "--exclude-weights",
        "b",
    ]
    assert run_cli(both) == 2 and "cannot be used together" in capsys.readouterr().err
    assert run_cli(["quantize", str(synth256), imat, "Q4_0", "--imatrix", imat]) == 2  # never over an input
    assert "imatrix" in capsys.readouterr().err and imatrices["gguf"].stat().st_size > 0
    assert run_cli(["quantize", str(synth256), str(tmp_path / "o.gguf"), "Q4_0", "--imatrix", str(synth256)]) == 4
    assert "no .in_sum2/.counts tensors" in capsys.readouterr().err


def _llama_model_quantize(inp: Path, out: Path, ftype: str, weights: dict[str, np.ndarray], kvs: list) -> None:
    """llama.cpp's quantizer given per-column weights and KV overrides exactly as llama-quantize
    builds them from a file (tools/quantize/quantize.cpp): strings as STR, counts as INT."""
    llama_cpp = pytest.importorskip("llama_cpp")
    keep = [np.ascontiguousarray(w, dtype=np.float32) for w in weights.values()]
    arr = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for i, (name, w) in enumerate(zip(weights, keep)):
        arr[i].name, arr[i].data, arr[i].size = name.encode(), w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), w.size
    ov = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
    for i, (key, vtype, value) in enumerate(kvs):
        ov[i].key = key.encode()
        if vtype == gguf.GGUFValueType.STRING:
            ov[i].tag, ov[i].value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value
        else:
            ov[i].tag, ov[i].value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = file_type(ftype).id, 2
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    params.kv_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


@pytest.mark.interop
@pytest.mark.parametrize("ftype", FTYPES)
def test_llama_model_quantize_given_the_same_weights(synth256, imatrices, tmp_path, ftype):
    data = read_imatrix(imatrices["gguf"], require_metadata=True)
    ours, theirs = tmp_path / "loraq.gguf", tmp_path / "llama.gguf"
    _loraq([synth256, ours, ftype, "--imatrix", imatrices["gguf"]])
    _llama_model_quantize(synth256, theirs, ftype, quant_weights(data), quantize_kvs(str(imatrices["gguf"]), data))
    assert _sha(ours) == _sha(theirs)


# ------------------------------------------------------------------------------------------------
# The native llama-quantize
# ------------------------------------------------------------------------------------------------
def _llama_quantize(args: list[str | Path]) -> None:
    exe = tool("llama-quantize")
    if exe is None:
        pytest.skip(f"llama-quantize is not built in {bin_dir()}; run `python -m scripts.build_llama_tools` (dev only)")
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"llama-quantize failed ({r.returncode}): {r.stderr[-2000:]}"


def _both(model: Path, imat: Path, ftype: str, tmp_path: Path, *flags: str) -> None:
    ours, theirs = tmp_path / f"loraq-{ftype}.gguf", tmp_path / f"llama-{ftype}.gguf"
    _llama_quantize(["--imatrix", imat, *flags, model, theirs, ftype, "2"])
    _loraq([model, ours, ftype, "--imatrix", imat, *flags])
    assert ours.stat().st_size == theirs.stat().st_size
    assert _sha(ours) == _sha(theirs), f"{ftype} with {imat.name} {flags}: files differ"


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
@pytest.mark.parametrize("ftype", FTYPES)
def test_synthetic_byte_identical_to_llama_quantize(synth256, imatrices, tmp_path, ftype, fmt):
    _both(synth256, imatrices[fmt], ftype, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize(
    "flags",
    [("--include-weights", "attn_"), ("--include-weights", "ffn_down", "--include-weights", "blk.1."), ("--exclude-weights", "attn_v")],
)
def test_weight_filters_byte_identical_to_llama_quantize(synth256, imatrices, tmp_path, flags):
    _both(synth256, imatrices["gguf"], "Q4_K_M", tmp_path, *flags)


@pytest.fixture(scope="module")
def smollm2_imatrices(smollm2_f16, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("smol-imat")
    data = realistic_imatrix(smollm2_f16, seed=2, chunks=7, chunk_size=256)
    return {"gguf": write_imatrix_gguf(d / "smol.imatrix.gguf", data), "dat": write_imatrix_dat(d / "smol.imatrix.dat", data)}


@pytest.mark.interop
@pytest.mark.real
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
@pytest.mark.parametrize("ftype", FTYPES)
def test_smollm2_byte_identical_to_llama_quantize(smollm2_f16, smollm2_imatrices, tmp_path, ftype, fmt):
    _both(smollm2_f16, smollm2_imatrices[fmt], ftype, tmp_path)
