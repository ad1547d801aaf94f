"""The tiny pipeline project that the pipeline, deliver, signal and I/O tests run: a 2-layer,
64-wide model on SmolLM2's vocabulary, a rank-4 PEFT adapter and a short evaluation text. The
bytes depend only on the SmolLM2 file, not on the folder, so two projects give identical runs."""

from __future__ import annotations

from pathlib import Path

from scripts import make_demo_adapter as mk_adapter
from scripts import make_synthetic_model as mk_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 60


def make_tiny_project(d: Path, smollm2_q4_1: Path) -> Path:
    """base.gguf, adapter/ (PEFT) and eval.txt in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    mk_model.make_model(d / "base.gguf", smollm2_q4_1, n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=2)
    mk_adapter.make_adapter(d / "base.gguf", d / "adapter", rank=4, seed=0)
    (d / "eval.txt").write_text(TEXT)
    return d
