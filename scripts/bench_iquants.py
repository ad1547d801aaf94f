"""Throughput of loraq's iq4_nl, iq4_xs, tq1_0, tq2_0 and grid-codebook (iq2_xxs ...) quantizers against libgguf (native ggml).

Quantizes the same real rows (SmolLM2 ffn_down tensors, 1536 wide, about 3.5M weights) with one
call each, checks that loraq and libgguf agree byte for byte, and prints Mweights/s and the
loraq/libgguf ratio. iq4_* run without and with an imatrix (random, activation-like). Both sides
run on one thread.
Usage: python scripts/bench_iquants.py [--weights N] [--repeat R]"""

from __future__ import annotations

import argparse

import numpy as np

from scripts.benchlib import best_time, smollm2

CASES = [("iq4_nl", False), ("iq4_nl", True), ("iq4_xs", False), ("iq4_xs", True), ("tq1_0", False), ("tq2_0", False)]
CASES += [("iq2_xxs", True)]  # iq2_xxs, iq2_xs: ggml asserts an imatrix
CASES += [("iq2_xs", True)]
CASES += [("iq3_xxs", False), ("iq3_xxs", True)]
CASES += [("iq2_s", False), ("iq2_s", True)]
CASES += [("iq3_s", False), ("iq3_s", True)]
CASES += [("iq1_s", True)]  # ggml asserts an imatrix
CASES += [("iq1_m", False), ("iq1_m", True)]  # libgguf's older ggml rounds iq1_m apart: DIFFER is expected


def load_rows(n_weights: int) -> np.ndarray:
    from loraq.gguf_io import open_gguf
    from loraq.kernels import read_f32

    f = open_gguf(smollm2())
    rows, total, layer = [], 0, 0
    while total < n_weights and f.has_tensor(f"blk.{layer}.ffn_down.weight"):
        w = read_f32(f, f.tensor(f"blk.{layer}.ffn_down.weight"))  # 576 x 1536
        rows.append(w)
        total += w.size
        layer += 1
    x = np.concatenate(rows)
    return np.ascontiguousarray(x[: -(-n_weights // x.shape[1])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=int, default=3_500_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import libgguf

    from loraq.ggml_types import ggml_type
    from loraq.kernels import quantize

    rows = load_rows(args.weights)
    n = rows.size
    rng = np.random.default_rng(0)
    imatrix = (rng.random(rows.shape[1]) * rng.lognormal(0, 1.5, rows.shape[1])).astype(np.float32)
    print(f"rows {rows.shape[0]} x {rows.shape[1]} = {n / 1e6:.2f}M weights (SmolLM2 ffn_down), best of {args.repeat}")
    print(f"{'type':8} {'imatrix':7} {'loraq':>8} {'libgguf':>8} {'ratio':>7}  bytes")
    for q, use_im in CASES:
        qid = ggml_type(q).id
        im = imatrix if use_im else None
        t_l, a = best_time(lambda q=q, im=im: quantize(rows, q, im), args.repeat)
        t_c, b = best_time(lambda qid=qid, im=im: libgguf.quantize_rows(rows, qid, im), args.repeat)
        same = np.array_equal(np.asarray(a).reshape(-1), np.asarray(b).view(np.uint8).reshape(-1))
        ml, mc = n / t_l / 1e6, n / t_c / 1e6
        print(f"{q:8} {'yes' if use_im else 'no':7} {ml:8.1f} {mc:8.1f} {ml / mc:6.2f}x  {'identical' if same else 'DIFFER'}")
    print("Mweights/s; ratio = loraq / libgguf (> 1: loraq faster)")


if __name__ == "__main__":
    main()
