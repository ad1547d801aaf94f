"""Importance-matrix collection speed: `loraq imatrix` against llama.cpp's `llama-imatrix`.

    python -m scripts.bench_imatrix [--ctx 256] [--chunks 8] [--threads 2] [--repeat 1]

The same model (SmolLM2-135M F16, made from the Q4_1 with loraq and cached under
$LORAQ_CACHE/bench, as scripts/bench.py's inputs), the same text (/usr/share/common-licenses/GPL-3
when present, else English docstrings of stdlib modules), the same ctx, chunks and threads. Each
tool runs as the command a user types, in its own process, and is timed on the wall clock from
start to exit (model load, tokenization and the file write included); tokens/s = chunks·ctx / s,
best of --repeat. llama-imatrix gets --no-ppl: loraq does not compute the text's perplexity.
llama-imatrix is found in $LORAQ_LLAMA_BIN or $LORAQ_CACHE/llama.cpp-build/bin
(python -m scripts.build_llama_tools); without it only loraq's figure is printed.

No timing is asserted (docs/design.md rule 5)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts import build_llama_tools, fetch_smollm2

ROOT = Path(__file__).resolve().parents[1]
GPL3 = Path("/usr/share/common-licenses/GPL-3")
STDLIB_TEXT = ("re", "argparse", "subprocess", "pickle", "tarfile", "decimal", "typing", "logging")


def model_path() -> Path:
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    base = fetch_smollm2.cache_dir() / "bench" / "smollm2-f16.gguf"
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        quantize_model(fetch_smollm2.fetch(), base, "F16", QuantizeOptions(allow_requantize=True, threads=2))
    return base


def text_path(tmp: Path) -> Path:
    if GPL3.is_file():
        return GPL3
    import importlib

    p = tmp / "stdlib-docs.txt"
    p.write_text("\n\n".join(importlib.import_module(m).__doc__ or "" for m in STDLIB_TEXT), encoding="utf-8")
    return p


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} exited {res.returncode}: {res.stderr.strip()[-400:]}")
    return dt


def bench_imatrix(ctx: int = 256, chunks: int = 8, threads: int = 2, repeat: int = 1) -> dict[str, float]:
    """Print and return {"loraq_tok_s", "llama_tok_s", "ratio"} (the last two absent without the tool)."""
    model = model_path()
    n = ctx * chunks
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="loraq-bench-imatrix-") as d:
        tmp = Path(d)
        text = text_path(tmp)
        print(f"model {model.name}, text {text} , ctx {ctx}, chunks {chunks} ({n} tokens), {threads} threads, best of {repeat}")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        ours = [sys.executable, "-m", "loraq", "imatrix", str(model), "-f", str(text), "-o", str(tmp / "loraq.gguf")]
        ours += ["-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
        lq = min(_timed(ours, env) for _ in range(repeat))
        out["loraq_tok_s"] = n / lq
        print(f"loraq imatrix (numpy engine): {lq:7.2f} s  {n / lq:8.1f} tok/s")
        tool = build_llama_tools.tool("llama-imatrix")
        if tool is None:
            print(f"llama-imatrix: not built in {build_llama_tools.bin_dir()} (python -m scripts.build_llama_tools); no ratio")
            return out
        theirs = [str(tool), "-m", str(model), "-f", str(text), "-o", str(tmp / "llama.gguf"), "-c", str(ctx)]
        theirs += ["--chunks", str(chunks), "-t", str(threads), "--no-ppl"]
        ll = min(_timed(theirs) for _ in range(repeat))
        out["llama_tok_s"] = n / ll
        out["ratio"] = ll / lq
        print(f"llama-imatrix (llama.cpp):    {ll:7.2f} s  {n / ll:8.1f} tok/s")
        print(f"ratio loraq/llama-imatrix tok/s: {ll / lq:.2f}  (target >= 0.8)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    bench_imatrix(a.ctx, a.chunks, a.threads, a.repeat)


if __name__ == "__main__":
    main()
