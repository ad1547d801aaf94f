"""`loraq inspect`: what is inside a GGUF, as plain data for the CLI to render."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .gguf_io import open_gguf


@dataclass
class Description:
    kvs: list[tuple[str, str]]
    tensors: list[tuple[str, tuple[int, ...], str, int]]
    histogram: dict[str, int]
    n_weights: int
    data_bytes: int

    @property
    def bpw(self) -> float:
        return 8.0 * self.data_bytes / max(1, self.n_weights)


def _show(v) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:8])
        return f"[{head}{', …' if len(v) > 8 else ''}] ({len(v)} items)"
    s = str(v)
    return s if len(s) <= 200 else s[:200] + f"… ({len(s)} chars)"


def describe(path: Path | str) -> Description:
    with open_gguf(path) as f:
        kvs = [(k, _show(kv.value)) for k, kv in f.kvs.items()]
        tensors = [(t.name, t.ne, t.type.name, t.nbytes) for t in f.tensors]
        hist = Counter(t.type.name for t in f.tensors)
        return Description(kvs, tensors, dict(hist.most_common()), sum(t.n_elements for t in f.tensors), sum(t.nbytes for t in f.tensors))
