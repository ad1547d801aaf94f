"""loraq's speed and memory against its peers, measured in one run on the same data (`make bench`).

    python -m scripts.bench [--weights N] [--repeat R] [--skip-large]

1. Legacy quantizer throughput (Mweights/s): loraq vs libgguf (ggml's native reference
   quantizers) vs gguf-py (numpy), on the same real SmolLM2 rows (scripts/bench_quant.py), then
   scripts/bench_kquants.py and scripts/bench_iquants.py when they exist.
2. Merge of the demo (SmolLM2 F16 base + rank-16 demo adapter): seconds and peak RSS, in a child.
3. Quantizing a ≈505 MB synthetic F16 model to Q8_0 and Q4_0: loraq (2 threads) vs llama.cpp's
   quantizer (llama-cpp-python's llama_model_quantize, nthread 2), each measurement in a fresh
   child process that reports its own peak RSS (getrusage RUSAGE_SELF ru_maxrss).

Inputs are cached under $LORAQ_CACHE (default ~/.cache/loraq)/bench so reruns do not rebuild them;
temporary outputs go to a temporary folder that is removed at the end. No timing is asserted
(docs/design.md rule 5): the report is numbers and ratios."""

from __future__ import annotations

import os

# Per-thread comparisons: libgguf uses every core unless told otherwise.
os.environ.setdefault("LIBGGUF_NUM_THREADS", "1")

import argparse
import datetime
import importlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from loraq.pipeline.checkpoint import sha256_file
from scripts import fetch_smollm2, make_demo_adapter, make_synthetic_model
from scripts.benchlib import cpu_model

ROOT = Path(__file__).resolve().parents[1]

SYNTH = dict(n_embd=1024, n_ff=2816, n_layer=18, n_head=16, n_head_kv=4)


def load_script(name: str) -> ModuleType | None:
    """The module scripts.<name>, or None when scripts/<name>.py does not exist."""
    if not (ROOT / "scripts" / f"{name}.py").exists():
        return None
    return importlib.import_module(f"scripts.{name}")


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 92 - len(title)), flush=True)


def mib(kib: int) -> str:
    return f"{kib / 1024:7.1f} MiB"


def version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(pkg)
    except PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------------------
# Child processes: each measurement in a fresh interpreter that reports its own peak RSS
# ------------------------------------------------------------------------------------------------
_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
{setup}
t0 = time.perf_counter()
{body}
dt = time.perf_counter() - t0
hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), 0)
print("@@RESULT " + json.dumps({{"seconds": dt, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": hwm,
                                 "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""

# Linux carries the forking process's RSS into a child's ru_maxrss (it is recorded at exec from
# the copied address space), so a child forked from this process, which holds the throughput
# rows, would report at least our RSS. A small intermediate Python does the fork instead.
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"


def child(setup: str, body: str) -> dict:
    """Run `setup` (imports, not timed) then `body` (timed) in a fresh Python; its seconds and peak RSS."""
    code = _CHILD.format(root=str(ROOT), setup=setup, body=body)
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, code], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"child failed (rc {proc.returncode}): {tail}")
    return json.loads(line.removeprefix("@@RESULT "))


# ------------------------------------------------------------------------------------------------
# Inputs, cached
# ------------------------------------------------------------------------------------------------
def bench_cache() -> Path:
    d = fetch_smollm2.cache_dir() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_q4_1() -> Path:
    return fetch_smollm2.fetch()


def demo_inputs(cache: Path) -> tuple[Path, Path]:
    """SmolLM2 F16 (made from the Q4_1 with loraq, as `make demo` does) and the rank-16 demo adapter."""
    from loraq.quantize.driver import QuantizeOptions, quantize_model

    base = cache / "smollm2-f16.gguf"
    if not base.exists():
        quantize_model(smollm2_q4_1(), base, "F16", QuantizeOptions(allow_requantize=True, threads=2))
    adapter = cache / "demo-adapter-r16"
    if not (adapter / "adapter_model.safetensors").exists():
        tmp = cache / "demo-adapter-r16.part"
        shutil.rmtree(tmp, ignore_errors=True)
        make_demo_adapter.make_adapter(base, tmp, rank=16, seed=0)
        shutil.rmtree(adapter, ignore_errors=True)
        tmp.rename(adapter)
    return base, adapter


def synthetic_model(cache: Path) -> Path:
    p = cache / "synth-{n_embd}x{n_layer}-ff{n_ff}-f16.gguf".format(**SYNTH)
    if not p.exists():  # make_model writes through a temporary name: a cached file is complete
        t = time.perf_counter()
        make_synthetic_model.make_model(p, smollm2_q4_1(), **SYNTH)
        print(f"(built {p.name} in {time.perf_counter() - t:.0f} s; cached for reruns)")
    return p


# ------------------------------------------------------------------------------------------------
# 1. Quantizer throughput
# ------------------------------------------------------------------------------------------------
def run_script_main(name: str, argv: list[str]) -> None:
    mod = load_script(name)
    if mod is None:
        print(f"scripts/{name}.py: not present, skipped")
        return
    if not hasattr(mod, "main"):
        print(f"scripts/{name}.py has no main(), skipped")
        return
    old = sys.argv
    sys.argv = [f"{name}.py", *argv]
    try:
        mod.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            print(f"scripts/{name}.py exited with {exc.code}")
    except Exception as exc:
        print(f"scripts/{name}.py failed: {type(exc).__name__}: {exc}")
    finally:
        sys.argv = old
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# 2. Merge
# ------------------------------------------------------------------------------------------------
def bench_merge(base: Path, adapter: Path, tmp: Path) -> None:
    out = tmp / "merged-f16.gguf"
    setup = "from pathlib import Path\nfrom loraq.merge import AdapterSpec, merge_model"
    base_rss = child(setup, "pass")
    r = child(setup, f"res = merge_model(Path({str(base)!r}), [AdapterSpec(Path({str(adapter)!r}), 1.0)], Path({str(out)!r}), 'f16')")
    size = out.stat().st_size
    out.unlink()
    print(f"base {base.name} ({base.stat().st_size / 2**20:.0f} MiB) + {adapter.name} (PEFT, rank 16, all 7 projections x 30 layers)")
    print(
        f"merge_model (convert + merge, f16 out, {size / 2**20:.0f} MiB): {r['seconds']:6.2f} s   peak RSS {mib(r['maxrss_kib'])}"
        f"   (child after imports only: {mib(base_rss['maxrss_kib'])})"
    )


# ------------------------------------------------------------------------------------------------
# 3. Quantizing a large file: loraq vs llama.cpp
# ------------------------------------------------------------------------------------------------
def _secs(results: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in results)


def bench_large(model: Path, tmp: Path, rounds: int = 1, types: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_K_M"), scaling: bool = True) -> None:
    """Each type quantized by loraq then llama.cpp, `rounds` times interleaved (medians printed:
    the machine's other load slows both sides alike); then loraq's thread scaling."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:
        llama_ok = f"llama-cpp-python unavailable ({type(exc).__name__}: {exc}); install with `make test-interop`"
    else:
        llama_ok = ""
    from loraq.ggml_types import file_type

    print(
        f"input {model.name}: {model.stat().st_size / 1e6:.0f} MB, "
        + ", ".join(f"{k} {v}" for k, v in SYNTH.items())
        + "; 2 threads each; one fresh child per measurement"
    )
    l_setup = "from pathlib import Path\nfrom loraq.quantize.driver import QuantizeOptions, quantize_model"
    # Read the input once so that both sides find it in the page cache: else the first timed child,
    # loraq's, pays the disk reads alone (measured +0.3-0.5 s on Q8_0 from a cold cache).
    with open(model, "rb") as f:
        while f.read(1 << 24):
            pass
    c_setup = "import ctypes\nimport llama_cpp\nllama_cpp.llama_backend_init()"
    l_idle = child(l_setup, "pass")
    # The first quantize after an install or an edit compiles numba's kernels (K types, q8_0/q4_0, the fp16 cast) into its
    # on-disk cache (~5 s, once); warm it outside the timed runs, as any earlier run would have (F16 -> Q8_0 and Q4_0 have their own kernels).
    child(
        l_setup,
        "import numpy as np\nfrom loraq.kernels import jit, legacy, quantize\njit.f16_to_f32(np.ones(8, np.uint16))\n"
        "legacy.q8_0_from_f16(np.ones(32, np.uint16))\nlegacy.q4_0_from_f16(np.ones(32, np.uint16))\n"
        "for t in ('q4_K', 'q6_K', 'q8_0', 'q4_0'): quantize(np.ones((1, 256), np.float32), t)",
    )
    c_idle = child(c_setup, "pass") if not llama_ok else None
    print(
        f"child RSS after imports only: loraq {mib(l_idle['maxrss_kib'])}" + (f", llama.cpp {mib(c_idle['maxrss_kib'])}" if c_idle else "")
    )
    print(f"{'type':6} {'loraq s':>8} {'llama s':>8} {'time l/c':>9}   {'loraq RSS':>11} {'llama RSS':>11} {'RSS l/c':>8}   output")
    for t in types:
        ours, theirs = tmp / f"loraq-{t}.gguf", tmp / f"llama-{t}.gguf"
        lrs, crs, same = [], [], True
        for _ in range(rounds):
            lr = child(l_setup, f"quantize_model(Path({str(model)!r}), Path({str(ours)!r}), {t!r}, QuantizeOptions(threads=2))")
            # loraq quantizes in 2 threads (numba installed) or 2 worker processes: count the parent
            # plus 2x the largest worker process, if any
            lr["maxrss_kib"] += 2 * lr.get("workers_kib", 0)
            lrs.append(lr)
            if llama_ok:
                continue
            body = (
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                f"p.ftype = {file_type(t).id}\np.nthread = 2\n"
                f"rc = llama_cpp.llama_model_quantize({str(model).encode()!r}, {str(theirs).encode()!r}, ctypes.byref(p))\n"
                "assert rc == 0, rc"
            )
            crs.append(child(c_setup, body))
            same = same and sha256_file(ours) == sha256_file(theirs)
            theirs.unlink()
        size = ours.stat().st_size
        ours.unlink()
        ls, lm = statistics.median(r["seconds"] for r in lrs), max(r["maxrss_kib"] for r in lrs)
        if llama_ok:
            print(f"{t:6} {ls:8.2f} {'-':>8} {'-':>9}   {mib(lm):>11} {'-':>11} {'-':>8}   {size / 1e6:.0f} MB")
            continue
        cs, cm = statistics.median(r["seconds"] for r in crs), max(r["maxrss_kib"] for r in crs)
        print(
            f"{t:6} {ls:8.2f} {cs:8.2f} {ls / cs:9.2f}   {mib(lm):>11} {mib(cm):>11} {lm / cm:8.2f}   "
            f"{size / 1e6:.0f} MB, {'byte-identical' if same else 'DIFFER'}"
            + (f"   (rounds, s: loraq {_secs(lrs)}; llama {_secs(crs)})" if rounds > 1 else "")
        )
    if not scaling:
        return
    # Thread scaling: the same K-type model quantized with 1 and with 2 threads.
    one = tmp / "loraq-1t.gguf"
    r1 = child(l_setup, f"quantize_model(Path({str(model)!r}), Path({str(one)!r}), 'Q4_K_M', QuantizeOptions(threads=1))")
    one.unlink()
    r2 = child(l_setup, f"quantize_model(Path({str(model)!r}), Path({str(one)!r}), 'Q4_K_M', QuantizeOptions(threads=2))")
    one.unlink()
    print(f"Q4_K_M loraq 1 thread {r1['seconds']:.2f} s, 2 threads {r2['seconds']:.2f} s: speed-up {r1['seconds'] / r2['seconds']:.2f}x")
    if llama_ok:
        print(llama_ok)
    print(
        "(seconds: the quantize call alone, imports excluded; RSS: the child's peak, imports included, plus 2x the"
        " largest worker process for loraq (none with numba: threads);"
        " l/c = loraq / llama.cpp, lower is better for loraq)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=int, default=5_000_000, help="weights per quantizer throughput run")
    ap.add_argument("--repeat", type=int, default=3, help="best of R for throughput")
    ap.add_argument("--skip-large", action="store_true", help="skip section 3 (the 505 MB model)")
    args = ap.parse_args()

    import numpy as np

    t_all = time.perf_counter()
    print(f"loraq bench  {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {cpu_model()}; {platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} CPUs "
        f"(affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}), "
        f"Python {platform.python_version()}"
    )
    print(
        f"numpy {np.__version__}, gguf {version('gguf')}, libgguf {version('libgguf')}, "
        f"llama-cpp-python {version('llama_cpp_python')}, loraq {version('loraq')}"
    )

    cache = bench_cache()
    with tempfile.TemporaryDirectory(prefix="loraq-bench-", dir=cache) as tmpdir:
        tmp = Path(tmpdir)

        section("1. legacy quantizers: loraq vs libgguf (native) vs gguf-py (numpy), same real rows")
        run_script_main("bench_quant", ["--weights", str(args.weights), "--repeat", str(args.repeat)])
        for name in ("bench_kquants", "bench_iquants"):
            section(f"1b. scripts/{name}.py")
            run_script_main(name, [])

        section("2. merge: SmolLM2 F16 + rank-16 demo adapter (loraq.merge.merge_model, fresh child)")
        base, adapter = demo_inputs(cache)
        bench_merge(base, adapter, tmp)

        if not args.skip_large:
            section("3. quantize a 505 MB synthetic F16 model (Q8_0, Q4_0, Q4_K_M): loraq vs llama.cpp, 2 threads each")
            bench_large(synthetic_model(cache), tmp)

        section("4. compare engine: tokens/s vs llama.cpp (same F16 SmolLM2, tokens, ctx, threads); peak RSS vs depth")
        run_script_main("bench_engine", [])
        section("5. imatrix collection: tokens/s vs llama-imatrix (same F16 SmolLM2, text, ctx, threads)")
        run_script_main("bench_imatrix", [])

        section("4b. compare.engine numpy vs llama.cpp, as the compare stage runs them: tokens/s, KLD/PPL agreement")
        run_script_main("bench_compare_engines", [])

    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
