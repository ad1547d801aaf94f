"""Throughput of loraq's K quantizers (q2_K..q6_K, with and without an imatrix) against libgguf.

Quantizes the same rows (SmolLM2 ffn_down tensors plus random normal rows, ~3.5M weights, all
1536 wide) with loraq and with libgguf's native ggml kernels, checks that the bytes are
identical, and prints Mweights/s and the ratio loraq/libgguf.

Per-thread comparison: libgguf.quantize_rows spreads one call over all cores unless
LIBGGUF_NUM_THREADS is set, so this script sets it to 1. Speeds are measured on CPU time
(time.process_time), which a busy shared machine disturbs far less than wall time; --wall
switches to wall-clock time. Best of --repeat runs, loraq and libgguf interleaved.
Usage: python scripts/bench_kquants.py [--layers N] [--random-rows R] [--repeat R] [--wall] [--types q3_K,...]"""

from __future__ import annotations

import os

os.environ["LIBGGUF_NUM_THREADS"] = "1"  # before libgguf is imported: one native thread

import argparse
import time

import numpy as np

from scripts.benchlib import smollm2

TYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]


def load_rows(layers: int, random_rows: int) -> np.ndarray:
    from loraq.gguf_io import open_gguf
    from loraq.kernels import read_f32

    f = open_gguf(smollm2())
    parts = [read_f32(f, f.tensor(f"blk.{i}.ffn_down.weight")) for i in range(layers)]  # 576 x 1536 each
    rng = np.random.default_rng(0)
    parts.append((rng.standard_normal((random_rows, 1536)) * 0.05).astype(np.float32))
    return np.ascontiguousarray(np.concatenate(parts))


def activation_imatrix(n: int) -> np.ndarray:
    """Mean squared activations look log-normal, with a few dead columns."""
    rng = np.random.default_rng(1)
    im = rng.lognormal(0, 1.0, n).astype(np.float32)
    im[rng.random(n) < 0.02] = 0
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3, help="SmolLM2 ffn_down tensors (0.88M weights each)")
    ap.add_argument("--random-rows", type=int, default=576)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated subset of " + ",".join(TYPES))
    args = ap.parse_args()

    import libgguf

    from loraq.ggml_types import ggml_type
    from loraq.kernels import quantize

    clock = time.perf_counter if args.wall else time.process_time
    rows = load_rows(args.layers, args.random_rows)
    im = activation_imatrix(rows.shape[1])
    n = rows.size
    print(
        f"rows {rows.shape[0]} x {rows.shape[1]} = {n / 1e6:.2f}M weights ({args.layers} SmolLM2 ffn_down + "
        f"{args.random_rows} random rows); {'wall' if args.wall else 'CPU'} time, best of {args.repeat}"
    )
    print(f"{'type':6} {'imatrix':7} {'loraq':>8} {'libgguf':>8} {'ratio':>6}  bytes")
    for q in args.types.split(","):
        qid = ggml_type(q).id
        for imx in (None, im):
            t_l = t_c = float("inf")
            for _ in range(args.repeat):
                t0 = clock()
                a = quantize(rows, q, imx)
                t1 = clock()
                b = np.asarray(libgguf.quantize_rows(rows, qid, imx)).view(np.uint8)
                t2 = clock()
                t_l, t_c = min(t_l, t1 - t0), min(t_c, t2 - t1)
            same = np.array_equal(a.reshape(-1), b.reshape(-1))
            print(
                f"{q:6} {'yes' if imx is not None else 'no':7} {n / t_l / 1e6:8.1f} {n / t_c / 1e6:8.1f} "
                f"{t_c / t_l:6.2f}  {'identical' if same else 'DIFFER'}"
            )
    print("(Mweights/s per thread; ratio = loraq speed / libgguf speed, >= 1 means loraq is faster)")


if __name__ == "__main__":
    main()
