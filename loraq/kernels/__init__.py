"""Row quantizers and dequantizers for ggml block types.

`quantize(rows, qtype, imatrix)` takes float32 rows of shape (n_rows, n_per_row) and returns the
blocks as uint8 of shape (n_rows, row_bytes), byte-identical to ggml's `ggml_quantize_chunk`
(docs/llama-cpp.md §5). KERNELS says which kernel serves each type; `_run` feeds it chunks of blocks."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from ..errors import BadArguments
from ..ggml_types import GGMLType, ggml_type
from ..gguf_io import GGUFFile, TensorInfo
from . import fp, iquants, kquants, legacy, ternary

CHUNK = 1 << 18  # elements per chunk: 1 MiB float32 temporaries stay cache-friendly and reuse the
# heap instead of fresh mmap pages (4x faster than 4 MiB chunks)
SUPER = 16  # chunks per joint phase: the sequential make_q3_quants / make_qp_quants refinements
# run once per 4M weights, amortizing numpy's per-call overhead


class Kernel(NamedTuple):
    """How one type's blocks become bytes. `first(x, qw)` gets a chunk of blocks x (m, block) and
    the imatrix slice of each block (m, block) or None; with `rows`, whole rows x (r, n_per_row)
    and the imatrix itself (σ² spans a row). Without `joint` it returns the bytes (m, nbytes);
    with it, a state: `joint(states)` then runs once over up to SUPER chunks and `last(state)`
    returns the bytes."""

    first: Callable[..., Any]
    joint: Callable[[list[Any]], list[Any]] | None = None
    last: Callable[[Any], np.ndarray] | None = None
    rows: bool = False


def _imat_k(sub: int, nmax: int, factor2: bool, nq: int, last: Callable[[Any], np.ndarray]) -> Kernel:
    return Kernel(partial(kquants.imat_search, sub=sub, nmax=nmax, factor2=factor2), partial(kquants.imat_scales, nq=nq), last)


def _grid(name: str, xb: np.ndarray, qwb: np.ndarray | None) -> np.ndarray:
    """The grid-codebook kernels (iqgrid), imported on first use: they load numba."""
    from . import iqgrid

    fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray] = getattr(iqgrid, name)
    return fn(xb, qwb)


# ggml type name -> (kernel without an imatrix, kernel with one; None: the type ignores it)
KERNELS: dict[str, tuple[Kernel, Kernel | None]] = {
    "f32": (Kernel(fp.f32), None),
    "f16": (Kernel(fp.f16), None),
    "bf16": (Kernel(fp.bf16), None),
    "q8_0": (Kernel(legacy.q8_0), None),
    "q4_0": (Kernel(legacy.q4_0), Kernel(legacy.q4_0_imat, rows=True)),
    "q4_1": (Kernel(legacy.q4_1), Kernel(legacy.q4_1_imat, rows=True)),
    "q5_0": (Kernel(legacy.q5_0), Kernel(legacy.q5_0_imat, rows=True)),
    "q5_1": (Kernel(legacy.q5_1), Kernel(legacy.q5_1_imat, rows=True)),
    "q2_K": (Kernel(kquants.q2_K), _imat_k(16, 3, False, 15, kquants.q2_K_imat_pack)),
    "q3_K": (Kernel(kquants.q3_K_search, kquants.q3_K_refine, kquants.q3_K_pack), Kernel(kquants.q3_K_imat)),
    "q4_K": (
        Kernel(partial(kquants.q45_K, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, five=False)),
        _imat_k(32, 15, True, 63, partial(kquants.q45_K_imat_pack, nmax=15, five=False)),
    ),
    "q5_K": (
        Kernel(partial(kquants.q45_K, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15, five=True)),
        _imat_k(32, 31, True, 63, partial(kquants.q45_K_imat_pack, nmax=31, five=True)),
    ),
    "q6_K": (Kernel(kquants.q6_K), Kernel(kquants.q6_K)),
    "iq4_nl": (Kernel(iquants.iq4_nl), Kernel(iquants.iq4_nl)),
    "iq4_xs": (Kernel(iquants.iq4_xs), Kernel(iquants.iq4_xs)),
    "iq2_xxs": (Kernel(partial(_grid, "iq2_xxs")), Kernel(partial(_grid, "iq2_xxs"))),
    "iq2_xs": (Kernel(partial(_grid, "iq2_xs")), Kernel(partial(_grid, "iq2_xs"))),
    "iq3_xxs": (Kernel(partial(_grid, "iq3_xxs")), Kernel(partial(_grid, "iq3_xxs"))),
    "iq2_s": (Kernel(partial(_grid, "iq2_s")), Kernel(partial(_grid, "iq2_s"))),
    "iq3_s": (Kernel(partial(_grid, "iq3_s")), Kernel(partial(_grid, "iq3_s"))),
    "iq1_s": (Kernel(partial(_grid, "iq1_s")), Kernel(partial(_grid, "iq1_s"))),
    "iq1_m": (Kernel(partial(_grid, "iq1_m")), Kernel(partial(_grid, "iq1_m"))),
    "tq1_0": (Kernel(ternary.tq1_0), None),
    "tq2_0": (Kernel(ternary.tq2_0), None),
}


# Types ggml quantizes only with an importance matrix (ggml_quantize_requires_imatrix: it asserts
# one; libgguf substitutes the tensor's own column mean of x², which no llama.cpp tool does)
NEEDS_IMATRIX = frozenset({"iq2_xxs", "iq2_xs", "iq1_s"})


def can_quantize(qtype: GGMLType | str) -> bool:
    return ggml_type(qtype).name in KERNELS


def quantize(rows: np.ndarray, qtype: GGMLType | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    t = ggml_type(qtype)
    if t.name not in KERNELS:
        raise BadArguments(f"loraq cannot quantize to {t.name} yet")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % t.block:
        raise ValueError(f"{t.name} needs 2-D rows whose length is a multiple of {t.block}, got {rows.shape}")
    if imatrix is None and t.name in NEEDS_IMATRIX:
        raise BadArguments(f"{t.name} needs an importance matrix (ggml refuses to quantize it without one)")
    if imatrix is not None:  # kernels receive a contiguous float32 vector of one weight per column
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != rows.shape[1]:
            raise ValueError(f"imatrix has {imatrix.shape[0]} values, rows have {rows.shape[1]}")
    plain, with_imatrix = KERNELS[t.name]
    if imatrix is None or with_imatrix is None:
        return _run(rows, None, t, plain)
    return _run(rows, imatrix, t, with_imatrix)


def _run(rows: np.ndarray, imatrix: np.ndarray | None, t: GGMLType, kern: Kernel) -> np.ndarray:
    n, k = rows.shape
    per_row = k // t.block
    xb = rows.reshape(-1, t.block)
    nb = xb.shape[0]
    qwb = None if imatrix is None else imatrix.reshape(per_row, t.block)
    out = np.empty((nb, t.nbytes), dtype=np.uint8)
    step = max(1, CHUNK // k) * per_row if kern.rows else max(1, CHUNK // t.block)
    group = step * SUPER if kern.joint else step
    # inf/NaN intermediates (subnormal or overflowing block ranges) are expected and handled as C
    # handles them; keep numpy quiet about them
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        for g0 in range(0, nb, group):
            spans = [(b0, min(nb, b0 + step)) for b0 in range(g0, min(nb, g0 + group), step)]
            if kern.rows:
                states = [kern.first(xb[b0:b1].reshape(-1, k), imatrix) for b0, b1 in spans]
            else:  # the imatrix restarts with every row
                states = [kern.first(xb[b0:b1], None if qwb is None else qwb[np.arange(b0, b1) % per_row]) for b0, b1 in spans]
            if kern.joint is not None:
                states = kern.joint(states)
            for (b0, b1), st in zip(spans, states):
                out[b0:b1] = st if kern.last is None else kern.last(st)
    return out.reshape(n, per_row * t.nbytes)


def dequantize(raw: np.ndarray, qtype: GGMLType | str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored bytes -> float32 array of numpy `shape` (…, ne[0]); exact, as ggml's to_float."""
    t = ggml_type(qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if t.name == "f32":
        return raw.view(np.float32).reshape(shape)
    if t.name == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if t.name == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    flat = raw.reshape(-1, t.row_bytes(shape[-1]))
    return gguf_dequantize(flat, GGMLQuantizationType(t.id)).astype(np.float32, copy=False).reshape(shape)


def read_f32(f: GGUFFile, t: TensorInfo) -> np.ndarray:
    """A tensor of an open GGUF dequantized to float32, numpy shape (…, ne[0])."""
    return dequantize(f.read_raw(t), t.type, t.shape)
