"""Throughput of loraq's legacy quantizers against libgguf (native ggml) and gguf-py (numpy).

Quantizes the same real rows (SmolLM2 ffn tensors, about 5M weights) to q8_0, q4_0, q4_1, q5_0
and q5_1 without an imatrix, checks that all three agree byte for byte, and prints Mweights/s.
Usage: python scripts/bench_quant.py [--weights N] [--repeat R]"""

from __future__ import annotations

import argparse

import numpy as np

from scripts.benchlib import best_time, smollm2

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def load_rows(n_weights: int) -> np.ndarray:
    from loraq.gguf_io import open_gguf
    from loraq.kernels import read_f32

    f = open_gguf(smollm2())
    rows, total, layer = [], 0, 0
    while total < n_weights:
        for part in ("ffn_up", "ffn_gate", "ffn_down"):
            name = f"blk.{layer}.{part}.weight"
            if not f.has_tensor(name) or total >= n_weights:
                continue
            w = read_f32(f, f.tensor(name))
            if w.shape[1] != 576:  # keep one row width so rows stack
                continue
            rows.append(w)
            total += w.size
        layer += 1
    return np.ascontiguousarray(np.concatenate(rows)[: -(-n_weights // 576)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=int, default=5_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import libgguf
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    from loraq.ggml_types import ggml_type
    from loraq.kernels import quantize

    rows = load_rows(args.weights)
    n = rows.size
    print(f"rows {rows.shape[0]} x {rows.shape[1]} = {n / 1e6:.2f}M weights (SmolLM2 ffn), best of {args.repeat}")
    head = ["loraq", "libgguf", "gguf-py"]
    print(f"{'type':6} " + " ".join(f"{h:>8}" for h in head) + f"   {'loraq/gguf-py':>13} {'loraq/libgguf':>13}  bytes")
    for q in TYPES:
        qid = ggml_type(q).id
        t_l, a = best_time(lambda q=q: quantize(rows, q), args.repeat)
        t_c, b = best_time(lambda qid=qid: libgguf.quantize_rows(rows, qid), args.repeat)
        t_p, c = best_time(lambda qid=qid: gguf_quantize(rows, GGMLQuantizationType(qid)), args.repeat)
        same = np.array_equal(a, b) and np.array_equal(a, np.asarray(c).view(np.uint8).reshape(a.shape))
        m = lambda t: n / t / 1e6  # noqa: E731
        print(
            f"{q:6} {m(t_l):8.1f} {m(t_c):8.1f} {m(t_p):8.1f}   {t_p / t_l:13.2f} {t_c / t_l:13.2f}  " + ("identical" if same else "DIFFER")
        )
    print("(Mweights/s; libgguf = one native libgguf.quantize_rows call; gguf-py = gguf.quants.quantize)")


if __name__ == "__main__":
    main()
