"""Shared pieces of the bench scripts: the real model and a best-of-N timer."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Per-thread comparisons: libgguf uses every core unless told otherwise (set before it is imported).
os.environ.setdefault("LIBGGUF_NUM_THREADS", "1")

from scripts import fetch_smollm2

ROOT = Path(__file__).resolve().parents[1]


def smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched into loraq's cache if needed."""
    return fetch_smollm2.fetch()


def best_time(fn, repeat: int) -> tuple[float, object]:
    """The fastest of `repeat` wall-clock runs of fn(), and its result."""
    best, res = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def cpu_model() -> str:
    """The CPU's model name and its widest x86 vector extension (/proc/cpuinfo; else the platform's
    machine name): ratios differ between machine kinds, e.g. numba's kernels on AVX2 and AVX-512."""
    import platform

    name, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines()[:64]:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    simd = next((f.upper() for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags), "")
    return f"{name}, {simd.replace('AVX512F', 'AVX-512')}" if simd else name
