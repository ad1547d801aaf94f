"""compare.engine numpy vs llama.cpp, as the compare stage runs them (plain text report).

    python -m scripts.bench_compare_engines [--ctx 256] [--chunks 8] [--threads 2]

On SmolLM2-135M (F16 made from the Q4_1 with loraq, and the rank-16 demo adapter, cached under
$LORAQ_CACHE/bench like scripts/bench.py's inputs) and the same n_chunks × n_ctx tokens of the GPL
v3 text, each engine builds its own reference (F16 + adapter at runtime) and scores merged-Q4_K_M,
merged-Q8_0 and runtime-Q4_K_M (base Q4_K_M + F16 GGUF adapter), through compare.stage's
build_reference / score_variant with the same threads. Printed: each pass's tokens/s for both
engines, then each variant's KLD mean and PPL from both and their difference (the interop test's
bounds: |ΔKLD| < 0.002, PPL within 1 %). A last line scores merged-Q4_K_M with llama.cpp's repacked
CPU kernels (use_extra_bufts, llama-perplexity's default), which the engine leaves off for parity.
With --floor, the per-position agreement behind those differences: KLD(llama.cpp ‖ numpy) of the
logits of the base Q4_K_M with and without the runtime LoRA, and the numpy engine against itself
with its input embeddings moved by one ulp (the noise floor of a Q8_K-rounded model).

No timing is asserted (docs/design.md rule 5)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

GPL = Path("/usr/share/common-licenses/GPL-3")
ENGINES = ("numpy", "llama.cpp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--floor", action="store_true", help="also the per-position logit agreement (base Q4_K_M ± LoRA, 1-ulp floor)")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (pip install 'loraq[llama-cpp]'): skipped")
        return
    if not GPL.exists():
        print(f"{GPL} (Debian base-files) is not installed: skipped")
        return

    from loraq.compare.kld_file import ReferenceFile
    from loraq.compare.metrics import KLDAccumulator
    from loraq.compare.stage import Candidate, build_reference, score_variant, scored
    from loraq.convert import convert_adapter
    from loraq.llama.llama_cpp_engine import LlamaCppEngine
    from loraq.merge import AdapterSpec, merge_model
    from loraq.quantize.driver import QuantizeOptions, quantize_many
    from scripts.bench import bench_cache, demo_inputs

    cache = bench_cache()
    base, peft = demo_inputs(cache)
    ctx, chunks, threads = args.ctx, args.chunks, args.threads
    n_tok = ctx * chunks
    print(f"SmolLM2-135M F16 + rank-16 demo adapter, {chunks} chunks × {ctx} tokens of {GPL}, {threads} threads")
    with tempfile.TemporaryDirectory(prefix="loraq-bench-engines-", dir=cache) as tmpdir:
        tmp = Path(tmpdir)
        t = time.perf_counter()
        lora = tmp / "adapter-f16.gguf"  # the runtime candidates' adapter, as `loraq run` converts it
        convert_adapter(peft, base, lora, outtype="f16")
        lora32 = tmp / "adapter-f32.gguf"  # the reference's: the PEFT weights unrounded
        convert_adapter(peft, base, lora32, outtype="f32")
        merged = tmp / "merged-f16.gguf"
        merge_model(base, [AdapterSpec(lora32, 1.0)], merged)
        quantize_many(
            merged, [("Q4_K_M", tmp / "merged-Q4_K_M.gguf"), ("Q8_0", tmp / "merged-Q8_0.gguf")], QuantizeOptions(threads=threads)
        )
        quantize_many(base, [("Q4_K_M", tmp / "base-Q4_K_M.gguf")], QuantizeOptions(threads=threads))
        print(f"(inputs: merge and quantize in {time.perf_counter() - t:.0f} s)")
        cands = [
            Candidate("merged-Q4_K_M", "merged", "Q4_K_M", tmp / "merged-Q4_K_M.gguf"),
            Candidate("merged-Q8_0", "merged", "Q8_0", tmp / "merged-Q8_0.gguf"),
            Candidate("runtime-Q4_K_M", "runtime_lora", "Q4_K_M", tmp / "base-Q4_K_M.gguf", [(lora, 1.0)]),
        ]
        secs: dict[str, dict[str, float]] = {e: {} for e in ENGINES}
        stats: dict[str, dict[str, tuple[float, float]]] = {e: {} for e in ENGINES}
        for eng in ENGINES:
            ref = tmp / f"reference-{eng}.kld"
            t = time.perf_counter()
            meta = build_reference(base, [(lora32, 1.0)], GPL, ctx, chunks, ref, threads, engine=eng)
            secs[eng]["reference (F16 + LoRA)"] = time.perf_counter() - t
            stats[eng]["reference"] = (float("nan"), meta["ppl"])
            with ReferenceFile(ref) as rf:
                for c in cands:
                    t = time.perf_counter()
                    s = score_variant(rf, c, threads, engine=eng)
                    secs[eng][c.name] = time.perf_counter() - t
                    stats[eng][c.name] = (s.stats.kld_mean, s.stats.ppl)
            sys.stdout.flush()

        print(f"\n{'pass':24} {'numpy s':>8} {'tok/s':>7}   {'llama.cpp s':>11} {'tok/s':>7}   {'llama.cpp/numpy':>15}")
        for name in secs["numpy"]:
            a, b = secs["numpy"][name], secs["llama.cpp"][name]
            print(f"{name:24} {a:8.2f} {n_tok / a:7.0f}   {b:11.2f} {n_tok / b:7.0f}   {a / b:14.2f}x")
        print(f"\n{'variant':16} {'KLD numpy':>10} {'KLD llama':>10} {'|ΔKLD|':>9}   {'PPL numpy':>10} {'PPL llama':>10} {'ΔPPL %':>7}")
        for name in stats["numpy"]:
            (ka, pa), (kb, pb) = stats["numpy"][name], stats["llama.cpp"][name]
            kcol = f"{ka:10.5f} {kb:10.5f} {abs(ka - kb):9.5f}" if name != "reference" else f"{'–':>10} {'–':>10} {'–':>9}"
            print(f"{name:16} {kcol}   {pa:10.4f} {pb:10.4f} {100 * (pb / pa - 1):+7.3f}")

        # llama.cpp's repacked CPU kernels (what llama-perplexity runs by default): speed and the KLD shift.
        c = cands[0]
        with ReferenceFile(tmp / "reference-llama.cpp.kld") as rf:
            tokens = rf.tokens.reshape(rf.n_chunk, rf.n_ctx).copy()  # as evaluated: SmolLM2 adds no BOS
            acc = KLDAccumulator(rf)
            t = time.perf_counter()
            with LlamaCppEngine(c.model, threads=threads, repack=True) as e:
                e.run(tokens, acc.add_chunk, rows=scored(rf.n_ctx))
            dt = time.perf_counter() - t
        r = acc.result()
        print(
            f"\n{c.name} on llama.cpp with repacked kernels: {dt:.2f} s, {n_tok / dt:.0f} tok/s; "
            f"KLD {r.kld_mean:.5f} (vs {stats['llama.cpp'][c.name][0]:.5f} without repacking), PPL {r.ppl:.4f}"
        )

        if args.floor:
            floor(tmp / "base-Q4_K_M.gguf", lora, rf.tokens.reshape(rf.n_chunk, rf.n_ctx)[:2].copy(), threads)


def floor(model: Path, lora: Path, toks, threads: int) -> None:
    """Per-position KLD between the engines' logits on `toks`, and the numpy engine's own 1-ulp floor."""
    import numpy as np

    from loraq.compare.stage import scored
    from loraq.llama.engine import Engine
    from loraq.llama.llama_cpp_engine import LlamaCppEngine

    rows = scored(toks.shape[1])

    def logits(eng) -> np.ndarray:
        out: dict[int, np.ndarray] = {}
        eng.run(toks, lambda i, lg: out.__setitem__(i, np.asarray(lg, np.float64)), rows=rows)
        return np.stack([out[i] for i in range(len(toks))])

    def kld(p: np.ndarray, q: np.ndarray) -> float:
        lp = p - p.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        lq = q - q.max(-1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        return float((np.exp(lp) * (lp - lq)).sum(-1).mean())

    print(f"\nper-position KLD(llama.cpp ‖ numpy), {model.name}, {len(toks)} chunks:")
    for name, ads in (("base", []), ("base + runtime LoRA", [(lora, 1.0)])):
        with LlamaCppEngine(model, ads, threads=threads) as e:
            want = logits(e)
        print(f"  {name:22} {kld(want, logits(Engine(model, ads, threads=threads))):.4f}")
    eng = Engine(model, threads=threads)
    a = logits(eng)
    embed = eng._embed
    eng._embed = lambda g, t: np.nextafter(embed(g, t), np.float32(np.inf)).astype(np.float32)  # type: ignore[method-assign,assignment]
    print(f"  numpy vs numpy, embeddings moved 1 ulp: {kld(a, logits(eng)):.4f} (the floor)")


if __name__ == "__main__":
    main()
