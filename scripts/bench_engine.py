"""loraq's numpy engine against llama.cpp on the same model and tokens (plain text report).

    python -m scripts.bench_engine [--ctx 256] [--chunks 8] [--threads 2] [--repeat 2]

1. Throughput (tokens/s) on SmolLM2-135M F16 (made from the Q4_1 with loraq, cached under
   $LORAQ_CACHE/bench like scripts/bench.py's inputs): loraq's Engine vs llama.cpp
   (llama-cpp-python, F32 KV cache, n_batch = n_ctx, logits for every position), the same
   n_chunks × n_ctx tokens, each chunk evaluated from position 0. Best of --repeat runs, each
   engine in its own fresh child process so neither warms the other's caches.
2. Agreement of the two on those tokens (KLD mean, max |Δlogit|, same top).
3. The compare stage against native llama-perplexity (when built: $LORAQ_LLAMA_BIN, else
   $LORAQ_CACHE/llama.cpp-build/bin): scoring SmolLM2 Q4_K_M and Q8_0 (quantized by loraq from the
   F16, byte-identical to llama-quantize's) against one F16 reference file (written by
   llama-perplexity --kl-divergence-base, not timed), same text, ctx, chunks and threads.
   llama-perplexity --kl-divergence is timed as a whole process (what a user waits for); loraq as
   `compare.stage.score` (engine + KLD statistics), and its engine alone with every position's
   logits. The runs are interleaved, peer then loraq, --rounds times; medians are reported, so a
   busy machine slows both sides alike.
4. Peak RSS of loraq's engine on synthetic models (n_embd 256, n_ff 768) with 4 and 8 layers,
   each in a fresh child process (getrusage ru_maxrss and VmHWM).

No timing is asserted (docs/design.md rule 5)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts import fetch_smollm2, make_synthetic_model

ROOT = Path(__file__).resolve().parents[1]
# real English text that does not change while the repo does: these stdlib modules' docstrings
STDLIB_TEXT = ("re", "argparse", "subprocess", "pickle", "tarfile", "decimal", "typing", "logging")

_CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
args = json.loads({args!r})
toks = np.load(args["tokens"])
{body}
hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), 0)
print("@@RESULT " + json.dumps({{"seconds": best, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": hwm}}))
"""

_LORAQ = """
from loraq.llama.engine import Engine
best = None
for _ in range(args["repeat"]):
    eng = Engine(args["model"], threads=args["threads"])
    keep = args.get("logits")
    out = np.empty((*toks.shape, eng.n_vocab), dtype=np.float32) if keep else None
    t0 = time.perf_counter()
    # "scored": logits only where compare scores them (the second half of each chunk, §8.1)
    rows = slice(toks.shape[1] // 2, toks.shape[1] - 1) if args.get("scored") else None
    eng.run(toks, (lambda i, lg: out.__setitem__(i, lg)) if keep else (lambda i, lg: None), rows=rows)
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
if keep:
    np.save(keep, out)
"""

_LLAMA = """
import llama_cpp
n_ctx = toks.shape[1]
llm = llama_cpp.Llama(model_path=args["model"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                      n_threads=args["threads"], type_k=0, type_v=0)
best = None
out = np.empty((*toks.shape, llm.n_vocab()), dtype=np.float32)
for _ in range(args["repeat"]):
    t0 = time.perf_counter()
    for i, row in enumerate(toks):
        llm.reset()
        llm.eval(row.tolist())
        out[i] = llm.scores[: llm.n_tokens]
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
if args.get("logits"):
    np.save(args["logits"], out)
"""

_SCORE = """
from loraq.compare.kld_file import ReferenceFile
from loraq.compare.stage import Candidate, score
from pathlib import Path
t0 = time.perf_counter()
with ReferenceFile(args["reference"]) as ref:
    r = score(ref, Candidate("x", "merged", "x", Path(args["model"])), args["threads"], args["kv_cache"])
best = time.perf_counter() - t0
print("@@KLD", r.kld_mean)
"""

_SCORE_OLD = _SCORE.replace(', args["kv_cache"])', ")")

# A child forked from a big parent inherits its RSS in ru_maxrss; a small launcher forks instead.
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"


def child(body: str, root: Path = ROOT, **args) -> dict:
    code = _CHILD.format(root=str(root), args=json.dumps(args), body=body)
    env = dict(os.environ)
    if args.get("threads"):
        env["OPENBLAS_NUM_THREADS"] = str(args["threads"])  # numpy's BLAS, for the loraq child
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, code], check=False, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"child failed (rc {proc.returncode}): {tail}")
    res = json.loads(line.removeprefix("@@RESULT "))
    kld = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@KLD ")), None)
    if kld:
        res["kld"] = float(kld.split()[1])
    return res


def llama_bin() -> Path | None:
    """The folder of native llama.cpp tools, if built ($LORAQ_LLAMA_BIN, else the cache's build)."""
    d = Path(os.environ.get("LORAQ_LLAMA_BIN") or fetch_smollm2.cache_dir() / "llama.cpp-build" / "bin")
    return d if (d / "llama-perplexity").is_file() else None


def quantized(cache: Path, f16: Path, qtype: str) -> Path:
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    out = cache / f"smollm2-{qtype}.gguf"
    if not out.exists():
        quantize_model(f16, out, qtype, QuantizeOptions(threads=2))
    return out


def perplexity(tool: Path, threads: int, ctx: int, chunks: int, *args: str) -> tuple[float, float, str]:
    """(process seconds, prompt-eval seconds from llama's own timer, output) of one llama-perplexity run."""
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(tool), "-t", str(threads), "-c", str(ctx), "--chunks", str(chunks), *args], capture_output=True, text=True, check=False
    )
    dt = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed (rc {p.returncode}): {out.strip().splitlines()[-1:]}")
    m = re.search(r"prompt eval time =\s*([0-9.]+) ms", out)
    if m:
        return dt, float(m.group(1)) / 1000, out
    # builds that print no perf lines by default (--perf is off): its timer of the first pass,
    # times the passes (all chunks fit one pass at the bench's sizes)
    per = re.search(r"([0-9.]+) seconds per pass", out)
    n = re.search(r"over (\d+) chunks, n_ctx=\d+, batch_size=\d+, n_seq=(\d+)", out)
    if per and n:
        return dt, float(per.group(1)) * -(-int(n.group(1)) // max(1, int(n.group(2)))), out
    return dt, float("nan"), out


def versus_perplexity(tool: Path, f16: Path, text: Path, tmp: Path, a: argparse.Namespace) -> None:
    import numpy as np

    from loraq.pipeline.config import CompareConfig

    kv = CompareConfig.model_fields["kv_cache"].default  # the compare stage as it runs by default
    cache = f16.parent
    n = a.ctx * a.chunks
    ref = tmp / "reference.kld"
    if a.reference:  # a reference file kept from an earlier run with the same text, ctx and chunks
        ref = a.reference
    else:
        perplexity(tool, a.threads, a.ctx, a.chunks, "-m", str(f16), "-f", str(text), "--kl-divergence-base", str(ref))
    with open(ref, "rb") as f:  # the tokens llama-perplexity evaluated, for the all-logits run
        f.seek(20)
        toks = np.frombuffer(f.read(4 * n), dtype="<i4").reshape(a.chunks, a.ctx).copy()
    from loraq.gguf_io import open_gguf

    with open_gguf(f16) as g:
        if g.get("tokenizer.ggml.add_bos_token", False):
            toks[:, 0] = int(g.get("tokenizer.ggml.bos_token_id"))
    np.save(tmp / "ptoks.npy", toks)
    print(
        f"\n== compare stage vs llama-perplexity {tool}: SmolLM2 {a.chunks} chunks × n_ctx {a.ctx} = {n} tokens, "
        f"{a.threads} threads, interleaved, median of {a.rounds}"
    )
    # llama.cpp's threads wait for each other at every op: other work on the cores slows it far more
    # than loraq (2x on a machine with load 4 on 2 cores), so a ratio only means something quiet
    print(f"(load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} cpus)")
    for qtype in ("Q4_K_M", "Q8_0"):
        model = quantized(cache, f16, qtype)
        peer, peer_eval, mine, mine_all, old, kl = [], [], [], [], [], {}
        for _ in range(a.rounds):
            dt, ev, out = perplexity(
                tool, a.threads, a.ctx, a.chunks, "-m", str(model), "--kl-divergence-base", str(ref), "--kl-divergence"
            )
            peer.append(dt)
            peer_eval.append(ev)
            m = re.search(r"Mean\s+KLD:\s+([-0-9.e]+)", out)
            kl["llama"] = float(m.group(1)) if m else float("nan")
            r = child(_SCORE, reference=str(ref), model=str(model), threads=a.threads, kv_cache=kv, tokens=str(tmp / "ptoks.npy"))
            mine.append(r["seconds"])
            kl["loraq"] = r.get("kld", float("nan"))
            mine_all.append(child(_LORAQ, model=str(model), threads=a.threads, repeat=1, tokens=str(tmp / "ptoks.npy"))["seconds"])
            if a.before:  # an older checkout's compare stage, in the same rounds (it has no kv_cache: f32)
                old.append(
                    child(
                        _SCORE_OLD, root=a.before, reference=str(ref), model=str(model), threads=a.threads, tokens=str(tmp / "ptoks.npy")
                    )["seconds"]
                )
        p, e, q, qa = (statistics.median(v) for v in (peer, peer_eval, mine, mine_all))
        print(f"{qtype:7s} llama-perplexity --kl-divergence: {p:6.2f} s {n / p:7.1f} tok/s (its prompt eval {e:.2f} s)")
        print(f"{qtype:7s} loraq compare score (kv {kv}):     {q:6.2f} s {n / q:7.1f} tok/s   ratio {p / q:.2f}")
        print(f"{qtype:7s} loraq engine, every logit:         {qa:6.2f} s {n / qa:7.1f} tok/s   ratio {p / qa:.2f}")
        if old:
            o = statistics.median(old)
            print(f"{qtype:7s} before ({a.before}): {o:6.2f} s {n / o:7.1f} tok/s   ratio {p / o:.2f}")
        print(f"{qtype:7s} KLD(F16 ‖ {qtype}): llama-perplexity {kl['llama']:.6f}, loraq {kl['loraq']:.6f}")
        print(f"        (rounds, s: peer {', '.join(f'{x:.1f}' for x in peer)}; loraq {', '.join(f'{x:.1f}' for x in mine)})")
        print(f"        (load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")


def smollm2_f16(cache: Path) -> Path:
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    base = cache / "smollm2-f16.gguf"
    if not base.exists():
        q41 = fetch_smollm2.fetch()
        quantize_model(q41, base, "F16", QuantizeOptions(allow_requantize=True, threads=2))
    return base


def text_tokens(model: Path, n: int):
    import llama_cpp
    import numpy as np

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    text = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in STDLIB_TEXT)
    toks = vocab.tokenize(text.encode(), add_bos=False)
    while len(toks) < n:
        toks = toks + toks
    from loraq.gguf_io import open_gguf

    with open_gguf(model) as g:  # llama-perplexity puts BOS first in each chunk only if the vocab adds it
        adds_bos = bool(g.get("tokenizer.ggml.add_bos_token", False))
    return np.asarray(toks[:n], dtype=np.int32), vocab.token_bos() if adds_bos else None


def agreement(p_path: Path, q_path: Path) -> str:
    import numpy as np

    p, q = np.load(p_path, mmap_mode="r"), np.load(q_path, mmap_mode="r")
    klds, same, dmax = [], [], 0.0
    for a, b in zip(p, q):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        la = a - a.max(-1, keepdims=True)
        la -= np.log(np.exp(la).sum(-1, keepdims=True))
        lb = b - b.max(-1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
        klds.append((np.exp(la) * (la - lb)).sum(-1))
        same.append(a.argmax(-1) == b.argmax(-1))
        dmax = max(dmax, float(np.abs(a - b).max()))
    return f"KLD(llama.cpp ‖ loraq) mean {np.concatenate(klds).mean():.3g}, max |Δlogit| {dmax:.3g}, same top {np.concatenate(same).mean():.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds against llama-perplexity (median)")
    ap.add_argument("--before", type=Path, help="an older loraq checkout whose compare stage joins the llama-perplexity rounds")
    ap.add_argument("--reference", type=Path, help="reuse this llama-perplexity base file (same text, ctx, chunks)")
    ap.add_argument("--only-perplexity", action="store_true", help="only the comparison with native llama-perplexity")
    a = ap.parse_args()

    import numpy as np

    from loraq.llama.engine import chunk_tokens

    cache = fetch_smollm2.cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    print(
        f"loraq engine bench — {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, numpy {np.__version__}"
    )
    model = smollm2_f16(cache)
    with tempfile.TemporaryDirectory(prefix="loraq-bench-engine-") as tmp:
        tmp = Path(tmp)
        tool = llama_bin()
        if tool is not None:
            text = tmp / "text.txt"
            body = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in STDLIB_TEXT)
            text.write_text(body * 4)
            versus_perplexity(tool / "llama-perplexity", model, text, tmp, a)
        else:
            print("\n(native llama-perplexity not built: set LORAQ_LLAMA_BIN; the comparison with it is skipped)")
        if a.only_perplexity:
            return
        flat, bos = text_tokens(model, a.ctx * a.chunks)
        toks = chunk_tokens(flat, a.ctx, a.chunks, bos=bos)
        np.save(tmp / "toks.npy", toks)
        n = toks.size
        print(f"\n== throughput: SmolLM2-135M F16, {a.chunks} chunks × n_ctx {a.ctx} = {n} tokens, {a.threads} threads, best of {a.repeat}")
        common = {"tokens": str(tmp / "toks.npy"), "model": str(model), "threads": a.threads, "repeat": a.repeat}
        ll = child(_LLAMA, logits=str(tmp / "llama.npy"), **common)
        lq = child(_LORAQ, logits=str(tmp / "loraq.npy"), **common)
        print(f"llama.cpp (llama-cpp-python): {ll['seconds']:7.2f} s  {n / ll['seconds']:8.1f} tok/s")
        print(f"loraq engine (numpy):         {lq['seconds']:7.2f} s  {n / lq['seconds']:8.1f} tok/s")
        print(f"ratio loraq/llama.cpp tok/s:  {ll['seconds'] / lq['seconds']:.2f}  (every position's logits, as llama.cpp computes them)")
        ls = child(_LORAQ, scored=True, **common)
        print(
            f"loraq as the compare stage runs it (logits of scored positions only): {ls['seconds']:.2f} s  "
            f"{n / ls['seconds']:.1f} tok/s, ratio {ll['seconds'] / ls['seconds']:.2f}"
        )
        print(agreement(tmp / "llama.npy", tmp / "loraq.npy"))

        print("\n== peak RSS of loraq's engine: synthetic n_embd 256, n_ff 768, tied, F16; 2 chunks × 64 tokens")
        q41 = fetch_smollm2.fetch()
        small = np.random.default_rng(0).integers(0, 49152, size=(2, 64)).astype(np.int32)
        np.save(tmp / "small.npy", small)
        for n_layer in (4, 8):
            m = make_synthetic_model.make_model(tmp / f"synth-{n_layer}.gguf", q41, n_embd=256, n_ff=768, n_layer=n_layer)
            r = child(_LORAQ, tokens=str(tmp / "small.npy"), model=str(m), threads=a.threads, repeat=1)
            print(
                f"{n_layer} layers: peak RSS {r['maxrss_kib'] / 1024:7.1f} MiB (VmHWM {r['vmhwm_kib'] / 1024:.1f} MiB), {r['seconds']:.2f} s"
            )


if __name__ == "__main__":
    main()
