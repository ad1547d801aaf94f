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
