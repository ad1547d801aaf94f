"""Oracle tests for loraq's grid-codebook quantizers: iq2_xxs, iq2_xs, iq3_xxs, iq2_s, iq3_s, iq1_s,
iq1_m.

The oracle is libgguf (ggml's own `ggml_quantize_chunk`); every block must be byte-identical.
iq3_xxs, iq2_s, iq3_s and iq1_m run with and without an imatrix (ggml: weights x², σ²/4 + x² for
iq2_s, without one). ggml asserts an imatrix
for iq2_xxs, iq2_xs and iq1_s (llama-quantize never quantizes to them without one); loraq refuses too,
with a one-line error, rather than copying libgguf's stand-in (the rows' own column mean of x²).
The whole-file test checks the IQ2_XXS / IQ2_XS ftype rules against llama.cpp's
`llama_model_quantize` given the same imatrix."""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache, partial
from pathlib import Path

import numpy as np
import pytest

libgguf = pytest.importorskip("libgguf")

from loraq.errors import BadArguments  # noqa: E402
from loraq.kernels import iqgrid, quantize, read_f32  # noqa: E402
from oracle import F32, assert_same, oracle, random_imatrix  # noqa: E402

TYPES = ["iq2_xxs", "iq2_xs", "iq3_xxs", "iq2_s", "iq3_s", "iq1_s", "iq1_m"]
PLAIN = {"iq3_xxs", "iq2_s", "iq3_s", "iq1_m"}  # also defined without an imatrix
_rim = partial(random_imatrix, dead=slice(64, 96))


# iq1_m: libgguf carries an older ggml whose split search sums each candidate split element by
# element; llama.cpp 0.3.36 (what llama-quantize writes, and loraq follows) uses prefix sums per
# half-block, so their float roundings differ. Its blocks are checked against llama.cpp's own
# libggml-base (llama-cpp-python), through ggml_quantize_chunk.
LLAMA_GGML = {"iq1_m"}


@cache
def _llama_ggml() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def tiered(slow: tuple[str, ...] = ()) -> list[object]:
    """TYPES as test parameters: iq1_m, whose oracle is llama.cpp's ggml, in the interop tier (the
    one with llama-cpp-python installed: elsewhere it could only skip); the types in `slow` in the
    slow tier (their cases take 15-23 s with two workers, against a 5-minute make test)."""
    return [
        pytest.param(t, marks=pytest.mark.interop) if t in LLAMA_GGML else pytest.param(t, marks=pytest.mark.slow) if t in slow else t
        for t in TYPES
    ]


def llama_ggml_blocks(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk from the llama.cpp that llama-cpp-python ships."""
    from loraq.ggml_types import ggml_type

    lib = _llama_ggml()
    if lib is None:
        pytest.skip("llama-cpp-python (interop extra) is not installed: no llama.cpp ggml to compare with")
    t = ggml_type(qtype)
    rows = np.ascontiguousarray(rows, dtype=F32)
    out = np.zeros(rows.shape[0] * t.row_bytes(rows.shape[1]), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=F32)
    lib.ggml_quantize_chunk(
        t.id, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None if im is None else im.ctypes.data
    )
    return out.reshape(rows.shape[0], -1)


def check(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None, what: str) -> None:
    if qtype not in LLAMA_GGML:
        assert_same(rows, qtype, imatrix, what)
        return
    got = quantize(rows, qtype, imatrix)
    want = llama_ggml_blocks(rows, qtype, imatrix)
    bad = np.nonzero((got.reshape(-1, 56) != want.reshape(-1, 56)).any(axis=1))[0]
    assert len(bad) == 0, f"{qtype} {what} imatrix={imatrix is not None}: {len(bad)} of {got.size // 56} blocks differ, first {bad[0]}"


def check_layouts(blocks: list[np.ndarray], qtype: str, imatrices) -> None:  # type: ignore[no-untyped-def]
    """oracle.assert_layouts with check(): each block in its own row, all in one row, rotated."""
    n, size = len(blocks), blocks[0].size
    together = np.concatenate(blocks)[None, :]
    for rows, what in [
        (np.stack(blocks), "block per row"),
        (together, "one row"),
        (np.roll(together, -size * (n // 3), axis=1), "rotated"),
    ]:
        for im in imatrices(rows.shape[1]):
            check(rows, qtype, im, what)


def imatrix_cases(qtype: str, k: int, seed: int) -> list[np.ndarray | None]:
    ims: list[np.ndarray | None] = [_rim(k, seed), _rim(k, seed + 1, zeros=True)]
    return ([None] if qtype in PLAIN else []) + ims


# ------------------------------------------------------------------ random and real rows


@pytest.mark.parametrize("qtype", tiered(slow=("iq1_s",)))
def test_random_normal(qtype):
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((12, 1024)).astype(F32)
    rows *= np.logspace(-6, 4, 12, dtype=F32)[:, None]  # very different row scales
    rows[5, 256:512] = 0  # a zero super-block inside a row
    rows[6, 32:64] = 0  # a zero sub-block inside a non-zero super-block
    rows[7, 512:768] *= F32(1e-3)  # a quiet super-block next to loud ones
    rows[8] = rng.standard_t(2, 1024).astype(F32)  # heavy tails: outlier-driven scales
    for im in imatrix_cases(qtype, 1024, 8):
        check(rows, qtype, im, "random normal")


@pytest.mark.parametrize("qtype", tiered(slow=("iq1_s",)))
def test_odd_shapes(qtype):
    """One super-block, and rows long enough to span several chunks."""
    rng = np.random.default_rng(9)
    small = rng.standard_normal((1, 256)).astype(F32)
    long = rng.standard_normal((2, 300_032)).astype(F32)  # 1172 super-blocks per row
    for rows, what in [(small, "1 block"), (long, "2 long rows")]:
        for im in imatrix_cases(qtype, rows.shape[1], 3)[:2]:
            check(rows, qtype, im, what)


@pytest.fixture(scope="module")
def real_rows(smollm2_q4_1) -> dict[str, np.ndarray]:
    from loraq.gguf_io import open_gguf

    f = open_gguf(smollm2_q4_1)
    return {
        "ffn_down.0": read_f32(f, f.tensor("blk.0.ffn_down.weight")),  # 576 x 1536
        "ffn_down.20": read_f32(f, f.tensor("blk.20.ffn_down.weight"))[:192],
    }


@pytest.mark.real
@pytest.mark.parametrize("qtype", tiered(slow=("iq2_xs", "iq3_xxs")))
def test_real_weights(qtype, real_rows):
    for i, (name, rows) in enumerate(real_rows.items()):
        # an activation-like imatrix, and the rows' own mean x² (what a real imatrix resembles)
        ims = imatrix_cases(qtype, rows.shape[1], 100 + i) + [np.mean(rows * rows, axis=0, dtype=F32)]
        for im in ims:
            check(rows, qtype, im, name)


# ------------------------------------------------------------------ adversarial blocks


def _superblocks() -> list[np.ndarray]:
    """256-element blocks built to hit the branches of the search."""
    rng = np.random.default_rng(11)
    b = []
    z = np.zeros(256, F32)
    b.append(z.copy())  # all zero: d = 0 and no bytes at all
    nz = z.copy()
    nz[::7] = -0.0
    b.append(nz)  # signed zeros: -0.0 >= 0, no flips
    part = rng.standard_normal(256).astype(F32)
    part[64:96] = 0
    part[160:192] = 1e-16  # below GROUP_MAX_EPS (and the 1e-8 of iq3_xxs)
    part[192:224] = 5e-9  # between the two epsilons
    b.append(part)  # dead sub-blocks inside a live super-block
    b.append(np.full(256, 0.37, F32))  # constant: every group on one lattice point
    b.append(np.full(256, -1234.5, F32))  # constant negative: even parity, 8 flips per group
    one_neg = np.full(256, 2.0, F32)
    one_neg[::8] = -2.0  # odd parity in every group, all w*x² equal: the first element is flipped
    b.append(one_neg)
    out = (rng.standard_normal(256) * 1e-3).astype(F32)
    out[17] = 1e4
    b.append(out)  # one huge outlier: all other groups collapse to the smallest point
    out2 = out.copy()
    out2[200] = -3e5  # past fp16 range once divided by 31? no: d = max/31 stays finite
    b.append(out2)
    b.append(np.where(np.arange(256) % 2, 65504, -65504).astype(F32))  # ±max f16, alternating
    b.append(np.where(np.arange(256) % 3, 1.0, -1.0).astype(F32))  # mixed parities
    b.append((rng.standard_normal(256) * 1e-40).astype(F32))  # subnormal (below the epsilons)
    b.append((rng.standard_normal(256) * 1e-7).astype(F32))  # just above iq3_xxs' epsilon
    b.append((rng.standard_normal(256) * 3e-15).astype(F32))  # around GROUP_MAX_EPS
    # lattice points themselves at unit scale: the rounding (x/s - 1)/2 lands on .5 ties
    b.append(np.resize(np.array([1, 3, 5, 7, 9, 11, 13, 15, 2, 4, 6, 8], F32), 256))
    b.append(np.resize(np.array([1, 3, 5, 1, 3, 5, 1, 1, 3, 3, 5, 5, 1, 5, 3], F32), 256))
    # points off every codebook: many groups need the neighbour search
    far = np.resize(np.array([5, 5, 5, 5, 5, 5, 5, 5, 1, 5, 1, 5, 1, 5, 1, 5], F32), 256)
    b.append(far * (1 + rng.random(256).astype(F32) * F32(0.01)))
    sparse = z.copy()
    sparse[rng.choice(256, 12, replace=False)] = rng.standard_normal(12).astype(F32) * 10
    b.append(sparse)  # mostly zero groups with a single live element
    # ties for iq1_s's sort of x: repeated values, signed zeros among them
    b.append(np.resize(np.array([0.5, -0.5, 0.5, 0.0, -0.0, 1.0, -1.0, 0.5], F32), 256))
    b.append(np.round(rng.standard_normal(256) * 2).astype(F32))
    heavy = rng.standard_t(1.5, 256).astype(F32)
    b.append(heavy)
    b.append(-heavy)
    return b


@pytest.mark.parametrize("qtype", tiered())
def test_adversarial_blocks(qtype):
    check_layouts(_superblocks(), qtype, lambda k: imatrix_cases(qtype, k, 5))


@pytest.mark.parametrize("qtype", tiered())
def test_imatrix_edge_values(qtype):
    """All-zero imatrix (every sumq2 = 0), tiny and huge importances, importance zero exactly on the
    outliers, and sub-blocks whose importance is zero."""
    rng = np.random.default_rng(21)
    rows = rng.standard_normal((8, 512)).astype(F32)
    rows[:, ::37] *= 50
    cases = [
        np.zeros(512, F32),
        np.full(512, 1e-30, F32),
        np.full(512, 1e30, F32),
        np.where(np.arange(512) % 37 == 0, 0, 1).astype(F32),
        np.where(np.arange(512) % 37 == 0, 1e6, 1e-6).astype(F32),
        np.where((np.arange(512) // 16) % 3 == 0, 0, 1).astype(F32),
    ]
    for i, im in enumerate(cases):
        check(rows, qtype, im, f"imatrix case {i}")


@pytest.mark.parametrize("qtype", ["iq2_xxs", "iq2_xs", "iq1_s"])
def test_refuses_without_an_imatrix(qtype):
    rows = np.ones((1, 256), F32)
    with pytest.raises(BadArguments, match="needs an importance matrix"):
        quantize(rows, qtype)


def test_libgguf_without_an_imatrix_uses_the_column_mean():
    """What libgguf does where ggml asserts (so loraq's refusal is a choice, not a gap): it is
    loraq's output given the rows' column mean of x² as the imatrix."""
    rows = np.random.default_rng(2).standard_normal((4, 512)).astype(F32)
    for q in ("iq2_xxs", "iq2_xs", "iq1_s"):
        want = oracle(rows, q, None).reshape(-1)
        got = quantize(rows, q, np.mean(rows * rows, axis=0, dtype=F32)).reshape(-1)
        assert np.array_equal(got, want), q


@pytest.mark.interop  # needs llama-cpp-python's ggml
def test_iq1_m_libgguf_differs_only_by_rounding():
    """Documents why iq1_m has another oracle: on unit-scale rows libgguf's older split search
    agrees with llama.cpp's, so the two ggml versions differ only where their sums round apart."""
    rows = np.random.default_rng(0).standard_normal((16, 1024)).astype(F32)
    im = _rim(1024, 1)
    assert np.array_equal(oracle(rows, "iq1_m", im).reshape(-1), llama_ggml_blocks(rows, "iq1_m", im).reshape(-1))


@pytest.mark.parametrize("qtype", ["iq2_xs", "iq3_xxs", "iq2_s", "iq3_s", "iq1_s"])
def test_llama_cpp_ggml_agrees(qtype):
    """The other types: llama.cpp 0.3.36's ggml and libgguf write the same blocks (so the libgguf
    oracle stands for llama-quantize)."""
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((8, 512)) * np.logspace(-3, 3, 8)[:, None]).astype(F32)
    im = _rim(512, 2)
    assert np.array_equal(quantize(rows, qtype, im).reshape(-1), llama_ggml_blocks(rows, qtype, im).reshape(-1))


# ------------------------------------------------------------------ codebook tables


def test_neighbour_lists_are_ggml_shaped():
    """Independent of the quantizer: every reachable off-grid point has a non-empty list of codebook
    entries, sorted by (distance, index), covering exactly its nwant nearest distances (2; 1 for
    iq2_s's 1024 entries, 3 for iq3_s and iq1_s)."""
    cases = [
        ("iq2_xxs", 2, 2, 2),
        ("iq2_xs", 2, 2, 2),
        ("iq3_xxs", 3, 7, 2),
        ("iq2_s", 2, 2, 1),
        ("iq3_s", 3, 7, 3),
        ("iq1_s", 2, 2, 3),
        ("iq1_m", 2, 2, 3),
    ]
    for q, bits, top, nwant in cases:
        g = iqgrid.grid(q)
        n = g.pos.shape[1]
        rng = np.random.default_rng(0)
        for u in rng.integers(0, 1 << (bits * n), 300):
            lv = (u >> (np.arange(n) * bits)) & ((1 << bits) - 1)
            if (lv > top).any() or g.kmap[u] >= 0:
                continue
            start = -int(g.kmap[u]) - 1
            cnt = int(g.neigh[start])
            idx = g.neigh[start + 1 : start + 1 + cnt].astype(int)
            d2 = ((g.pos.astype(int) - (2 * lv + 1)) ** 2).sum(axis=1)
            dist = sorted(set(d2.tolist()))[:nwant]
            want = sorted((d, j) for j, d in enumerate(d2.tolist()) if d in dist)
            assert [(int(d2[j]), j) for j in idx] == want


# ------------------------------------------------------------------ whole files


@pytest.fixture(scope="module")
def synth_imatrix(synth256, tmp_path_factory):
    from loraq.quantize.imatrix_file import write_imatrix_gguf
    from test_quantize_imatrix import realistic_imatrix

    return write_imatrix_gguf(tmp_path_factory.mktemp("iq-imat") / "synth.imatrix.gguf", realistic_imatrix(synth256))


def _same_file_as_llama(model, imat, ftype, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("llama_cpp")
    from loraq.quantize.imatrix_file import quant_weights, quantize_kvs, read_imatrix
    from test_quantize_imatrix import _llama_model_quantize, _loraq, _sha

    data = read_imatrix(imat, require_metadata=True)
    ours, theirs = tmp_path / "loraq.gguf", tmp_path / "llama.gguf"
    _loraq([model, ours, ftype, "--imatrix", imat])
    _llama_model_quantize(model, theirs, ftype, quant_weights(data), quantize_kvs(str(imat), data))
    assert _sha(ours) == _sha(theirs)


@pytest.mark.interop
@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M"])
def test_file_equals_llama_model_quantize(synth256, synth_imatrix, tmp_path, ftype):
    """The ftype's rules (R1, R3, R4 and the IQ3 lines of R5-R12) and kernels together, against
    llama.cpp given the same imatrix. synth256 has n_gqa = 2 and tied embeddings."""
    _same_file_as_llama(synth256, synth_imatrix, ftype, tmp_path)


@pytest.fixture(scope="module")
def odd_models(smollm2_q4_1, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A GQA model with n_gqa = 4 and an 8-expert MoE with untied embeddings (the n_gqa / n_expert
    lines of the rules, R3's token_embd), each with its imatrix (per expert for the MoE)."""
    from loraq.quantize.imatrix_file import write_imatrix_gguf
    from scripts import make_synthetic_model as mk
    from test_quantize_imatrix import realistic_imatrix

    d = tmp_path_factory.mktemp("iq-models")
    gqa = mk.make_model(d / "gqa4.gguf", smollm2_q4_1, n_embd=256, n_ff=512, n_layer=8, n_head=8, n_head_kv=2, seed=3)
    moe = mk.make_model(
        d / "moe8.gguf", smollm2_q4_1, n_embd=256, n_ff=256, n_layer=4, n_head=4, n_head_kv=4, n_expert=8, tied=False, seed=4
    )
    return {name: (m, write_imatrix_gguf(d / f"{name}.imatrix.gguf", realistic_imatrix(m))) for name, m in (("gqa4", gqa), ("moe8", moe))}


@pytest.mark.interop
@pytest.mark.parametrize("model", ["gqa4", "moe8"])
@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_M", "IQ1_M"])
def test_other_shapes_equal_llama_model_quantize(odd_models, tmp_path, model, ftype):
    m, imat = odd_models[model]
    _same_file_as_llama(m, imat, ftype, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("ftype", ["IQ3_S", "IQ3_M", "IQ3_XS"])
def test_file_without_imatrix_equals_llama(synth256, tmp_path, ftype, capsys):
    """IQ3_S and IQ3_M need no imatrix (iq3_s, q4_K...). IQ3_XS does (attn_k/attn_q are iq3_xxs):
    both refuse it."""
    from conftest import llama_quantize
    from loraq.cli import run_cli
    from loraq.ggml_types import file_type
    from loraq.quantize.rules import NEEDS_IMATRIX_FTYPES
    from test_quantize_imatrix import _loraq, _sha

    ours, theirs = tmp_path / "loraq.gguf", tmp_path / "llama.gguf"
    if ftype in NEEDS_IMATRIX_FTYPES:
        assert run_cli(["quantize", str(synth256), str(ours), ftype]) == 2
        assert "needs an importance matrix" in capsys.readouterr().err and not ours.exists()
        with pytest.raises(AssertionError, match="llama_model_quantize failed"):
            llama_quantize(synth256, theirs, file_type(ftype).id)
        return
    _loraq([synth256, ours, ftype])
    llama_quantize(synth256, theirs, file_type(ftype).id)
    assert _sha(ours) == _sha(theirs)


@pytest.mark.interop
@pytest.mark.real
@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ3_XXS"])
def test_smollm2_equals_llama_model_quantize(smollm2_f16, tmp_path, ftype):
    """The real model: 576-wide tensors take the shape fallback (iq4_nl), ffn_down (1536) the IQ
    types."""
    from loraq.quantize.imatrix_file import write_imatrix_gguf
    from test_quantize_imatrix import realistic_imatrix

    imat = write_imatrix_gguf(tmp_path / "smol.imatrix.gguf", realistic_imatrix(smollm2_f16, seed=2, chunks=7, chunk_size=256))
    _same_file_as_llama(smollm2_f16, imat, ftype, tmp_path)
