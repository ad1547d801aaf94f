"""The block oracle shared by the kernel tests: libgguf (ggml's own `ggml_quantize_chunk`), and
the harness around it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from loraq.ggml_types import ggml_type
from loraq.kernels import quantize

libgguf = pytest.importorskip("libgguf")
F32 = np.float32


def oracle(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    return np.asarray(libgguf.quantize_rows(rows, ggml_type(qtype).id, imatrix)).view(np.uint8)


def assert_same(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None = None, what: str = "") -> None:
    """loraq's blocks equal ggml's; on failure, the share of identical blocks and the first bad one."""
    rows = np.ascontiguousarray(rows, dtype=F32)
    got = quantize(rows, qtype, imatrix)
    want = oracle(rows, qtype, imatrix).reshape(got.shape)
    if np.array_equal(got, want):
        return
    t = ggml_type(qtype)
    g, w = got.reshape(-1, t.nbytes), want.reshape(-1, t.nbytes)
    bad = np.nonzero((g != w).any(axis=1))[0]
    b = bad[0]
    pytest.fail(
        f"{qtype} {what} imatrix={imatrix is not None}: {100 * (1 - len(bad) / len(g)):.4f}% of "
        f"{len(g)} blocks identical ({len(bad)} differ); first block {b}, differing bytes "
        f"{np.nonzero(g[b] != w[b])[0][:16].tolist()}\nloraq {g[b].tobytes().hex()}\nggml  "
        f"{w[b].tobytes().hex()}\nx[:64]={rows.reshape(-1, t.block)[b][:64].tolist()}"
    )


def random_imatrix(n: int, seed: int, zeros: bool = False, dead: slice | None = None) -> np.ndarray:
    """Positive per-column weights like a real imatrix's mean x²; `zeros` adds columns no token
    activated, and `dead` a whole range of them (a block whose weights sum to 0)."""
    rng = np.random.default_rng(seed)
    im = (rng.random(n) * rng.lognormal(0, 1.5, n)).astype(F32)
    if zeros:
        im[rng.random(n) < 0.1] = 0
        if dead is not None and dead.stop <= n:
            im[dead] = 0
    return im


def assert_layouts(blocks: list[np.ndarray], qtype: str, imatrices: Callable[[int], list[np.ndarray | None]]) -> None:
    """Adversarial blocks each in its own row, all in one row, and that row rotated by a third of
    the blocks (so each block meets other neighbours, chunk edges and imatrix columns);
    `imatrices(n_per_row)` gives the imatrix cases to try for each."""
    n, size = len(blocks), blocks[0].size
    alone = np.stack(blocks)
    together = np.concatenate(blocks)[None, :]
    rotated = np.roll(together, -size * (n // 3), axis=1)
    for rows, what in [(alone, "block per row"), (together, "one row"), (rotated, "rotated row")]:
        for im in imatrices(rows.shape[1]):
            assert_same(rows, qtype, im, what)


def seq_sum(t: np.ndarray) -> np.ndarray:
    """The C loop `s = 0; for (i) s += t[i];` over axis 1, one float32 add at a time."""
    acc = np.zeros_like(t[:, 0])
    for j in range(t.shape[1]):
        acc += t[:, j]
    return acc
