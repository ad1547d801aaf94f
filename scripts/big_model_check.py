"""A 1.1B-parameter model on a small machine: merge, Q4_K_M and compare, each stage's peak memory.

    python -m scripts.big_model_check [--threads 2] [--max-rss-gb 1.5] [--keep]     (make big-check)

The model is TinyLlama-1.1B's shape (scripts/make_synthetic_model.py --preset tinyllama: 22 layers,
2048 wide, 32/4 heads, FFN 5632, 32000 tokens, F16, 2.2 GB) with a random rank-16 PEFT adapter
on every projection, both generated once into $LORAQ_CACHE/bench/big/ (never the repository).
The pipeline runs from a config in a temporary workdir beside them, one `loraq run --until STAGE`
process per stage (convert, merge, quantize:Q4_K_M, reference, score:base, score:merged-Q4_K_M,
compare; ctx 256, 4 chunks), so each stage's memory is measured on its own.

Memory: the kernel's high-water mark (VmHWM in /proc/PID/status) of every process of the stage
(quantize's workers included), read every 50 ms while it runs, and the largest sampled sum of
their resident sizes (VmRSS): the first is what one process peaked at, the second what the stage
held at once. Both must stay below --max-rss-gb (exit 1 otherwise). Time: each stage's seconds
from the run's --json events (the stage itself), the process's wall time (with Python's start and
input hashing), and for the engine passes the stage seconds per layer."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_LAYER = 22
CTX, CHUNKS = 256, 4
STAGES = ("convert", "merge", "quantize:Q4_K_M", "reference", "score:base", "score:merged-Q4_K_M", "compare")
ENGINE_STAGES = ("reference", "score:base", "score:merged-Q4_K_M")  # one forward pass over 4×256 tokens each


def cache_dir() -> Path:
    return Path(os.environ.get("LORAQ_CACHE", Path.home() / ".cache" / "loraq")).expanduser() / "bench" / "big"


def _python(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], env=env, check=True, **kw)


def inputs(cache: Path) -> tuple[Path, Path, Path]:
    """The model, the adapter and the evaluation text, generated once (each in a child process,
    through a temporary name, so a killed build is redone rather than half used)."""
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / "tinyllama-shape-f16.gguf"
    if not model.exists():
        t = time.perf_counter()
        smol = Path(os.environ.get("LORAQ_CACHE", Path.home() / ".cache" / "loraq")).expanduser() / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not smol.exists():
            _python("-m", "scripts.fetch_smollm2")
        _python("-m", "scripts.make_synthetic_model", str(model), "--tokenizer-from", str(smol), "--preset", "tinyllama")
        print(f"(built {model.name}, {model.stat().st_size / 1e9:.2f} GB, in {time.perf_counter() - t:.0f} s; cached)")
    adapter = cache / "tinyllama-shape-adapter-r16"
    if not (adapter / "adapter_model.safetensors").exists():
        tmp = cache / "tinyllama-shape-adapter-r16.part"
        shutil.rmtree(tmp, ignore_errors=True)
        _python("-m", "scripts.make_demo_adapter", str(model), str(tmp), "--rank", "16")
        shutil.rmtree(adapter, ignore_errors=True)
        tmp.rename(adapter)
    text = cache / "eval.txt"
    if not text.exists():
        gpl = Path("/usr/share/common-licenses/GPL-3")
        body = gpl.read_text() if gpl.is_file() else "The quick brown fox jumps over the lazy dog.\n" * 800
        text.write_text(body)
    return model, adapter, text


@dataclass
class Measured:
    stage: str
    wall_s: float
    stage_s: float
    hwm: int  # bytes: the largest VmHWM of any process of the stage
    tree_peak: int  # bytes: the largest sampled sum of VmRSS over the stage's processes
    n_procs: int


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/PID/task/*/children; a scan of /proc/*/stat where that is missing)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task") for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            kids = [c for c in _all_pids() if _ppid(c) == p]
        todo += kids
    return out


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def run_stage(cfg: Path, stage: str, threads: int) -> Measured:
    cmd = [sys.executable, "-m", "loraq", "run", str(cfg), "--until", stage, "--threads", str(threads), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        hwm: dict[int, int] = {}
        peak = 0
        while proc.poll() is None:
            total = 0
            for p in _tree(proc.pid):
                hwm[p] = max(hwm.get(p, 0), _status_kb(p, "VmHWM"))
                total += _status_kb(p, "VmRSS")
            peak = max(peak, total)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        events = [json.loads(line) for line in out if line.startswith("{")]
        if proc.returncode != 0:
            sys.exit(f"stage {stage} failed (exit {proc.returncode}): {err.read().strip()[-2000:]}")
    done = [e for e in events if e.get("event") == "stage_done" and e.get("stage") == stage]
    if not done:
        sys.exit(f"stage {stage} did not run (already up to date in a reused workdir?)")
    return Measured(stage, wall, float(done[0]["seconds"]), max(hwm.values(), default=0) * 1024, peak * 1024, len(hwm))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rss-gb", type=float, default=1.5, help="fail above this peak (10^9 bytes)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (merged F16 and Q4_K_M files, report)")
    a = ap.parse_args()
    cache = cache_dir()
    model, adapter, text = inputs(cache)
    print(f"model {model} ({model.stat().st_size / 1e9:.2f} GB), adapter {adapter.name}, {a.threads} threads")
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    try:
        cfg = work / "big.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "name": "big-model-check",
                    "workdir": str(work / "wd"),
                    "base": str(model),
                    "adapters": [{"path": str(adapter)}],
                    "quantize": {"types": ["Q4_K_M"]},
                    "compare": {"text": str(text), "ctx": CTX, "chunks": CHUNKS, "runtime_lora": False},
                }
            )
        )  # JSON is YAML
        rows = []
        for s in STAGES:
            m = run_stage(cfg, s, a.threads)
            rows.append(m)
            per_layer = f"  {m.stage_s / N_LAYER:6.2f} s/layer" if s in ENGINE_STAGES else ""
            print(
                f"{s:22s} stage {m.stage_s:7.1f} s  wall {m.wall_s:7.1f} s  peak RSS {m.hwm / 2**20:7.0f} MiB (one process)"
                f"  {m.tree_peak / 2**20:7.0f} MiB (all {m.n_procs} processes, sampled){per_layer}",
                flush=True,
            )
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    limit = a.max_rss_gb * 1e9
    worst = max(rows, key=lambda r: max(r.hwm, r.tree_peak))
    print(
        f"\nworst stage: {worst.stage}, {max(worst.hwm, worst.tree_peak) / 1e9:.2f} GB "
        f"(limit {a.max_rss_gb} GB); model {model.stat().st_size / 1e9:.2f} GB; compare "
        f"{sum(r.stage_s for r in rows if r.stage in ENGINE_STAGES) / (len(ENGINE_STAGES) * N_LAYER):.2f} s per layer per pass "
        f"({CHUNKS}×{CTX} tokens)"
    )
    if max(worst.hwm, worst.tree_peak) > limit:
        sys.exit(1)


if __name__ == "__main__":
    main()
