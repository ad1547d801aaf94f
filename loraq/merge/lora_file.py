"""Read a GGUF LoRA adapter (or a PEFT folder, converted first) as llama.cpp's loader sees it.

Checks follow llama_adapter_lora_init (docs/llama-cpp.md §3.1), with two deliberate differences: quantized
(Q8_0) adapter tensors are accepted (dequantized exactly), and a LoRA tensor with no counterpart
in the base is an error rather than silently ignored, so nothing of the fine-tune is lost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import scratch_dir
from ..convert import convert_adapter
from ..errors import BadArguments, BadInput
from ..gguf_io import GGUFFile, open_gguf
from ..kernels import read_f32


@dataclass
class LoraPair:
    a: np.ndarray  # numpy (r, in); for token_embd (n_vocab, r), as stored
    b: np.ndarray  # numpy (out, r)

    @property
    def rank(self) -> int:
        return self.b.shape[-1]  # lora_b.ne[0]


@dataclass
class LoraAdapter:
    path: Path
    alpha: float
    pairs: dict[str, LoraPair]  # base tensor name -> pair

    def scale(self, name: str, user_scale: float) -> float:
        """llama.cpp's get_scale: user·alpha/rank when alpha ≠ 0, else just user (no 1/r)."""
        r = self.pairs[name].rank
        return user_scale * self.alpha / r if self.alpha != 0 else user_scale

    def delta(self, name: str) -> np.ndarray:
        """B·A in float64, in the base tensor's numpy orientation."""
        p = self.pairs[name]
        a, b = p.a.astype(np.float64), p.b.astype(np.float64)
        if name == "token_embd.weight":
            return a @ b.T  # lora_a is stored transposed: rows are indexed by token id
        return b @ a


def load_adapter(path: Path | str, base: GGUFFile) -> LoraAdapter:
    """A GGUF LoRA file, or a PEFT adapter folder (converted against `base` first)."""
    path = Path(path)
    if path.is_dir():
        with scratch_dir() as tmp:  # named with our pid: a kill -9 leaves it for the next run to remove
            gguf_path = tmp / "adapter-f32.gguf"
            convert_adapter(path, base.path, gguf_path, outtype="f32")
            return _read_gguf_adapter(gguf_path, base, shown=path)
    if not path.exists():
        raise BadArguments(f"adapter not found: {path}")
    return _read_gguf_adapter(path, base, shown=path)


def _read_gguf_adapter(path: Path, base: GGUFFile, shown: Path) -> LoraAdapter:
    with open_gguf(path) as f:
        # typed as llama.cpp's getters assert them (docs/llama-cpp.md §9): a wrong type is a BadInput
        gtype = f.get_str("general.type")
        if gtype != "adapter" or f.get_str("adapter.type") != "lora":
            raise BadInput(f"{shown} is not a GGUF LoRA adapter (general.type={gtype!r}); convert a PEFT folder with 'loraq convert'")
        if f.arch != base.arch:
            raise BadInput(f"{shown} is a LoRA for architecture '{f.arch}', but the base is '{base.arch}'")
        alpha = f.get_float("adapter.lora.alpha", 0.0, f32_only=True) or 0.0
        halves: dict[str, dict[str, np.ndarray]] = {}
        for t in f.tensors:
            if t.name.endswith("_norm.weight"):
                continue  # llama.cpp ignores norm tensors in adapters, at runtime and in export-lora
            stem, dot, part = t.name.rpartition(".")
            if not dot or part not in ("lora_a", "lora_b"):
                raise BadInput(f"{shown}: tensor '{t.name}' has an unexpected suffix (expected .lora_a or .lora_b)")
            x = read_f32(f, t)
            if not np.isfinite(x).all():
                raise BadInput(f"{shown}: tensor {t.name} contains NaN or Inf")
            halves.setdefault(stem, {})[part] = x
    pairs = {}
    for name, h in halves.items():
        if len(h) != 2:
            raise BadInput(f"{shown}: tensor {name} is missing either lora_a or lora_b")
        if not base.has_tensor(name):
            raise BadInput(f"{shown}: LoRA tensor {name} has no counterpart in the base model; is this adapter for another model?")
        bt = base.tensor(name)
        a, b = h["lora_a"], h["lora_b"]
        if name == "token_embd.weight":
            ok = bt.ne[0] == b.shape[0] and bt.ne[1] == a.shape[0] and a.shape[1] == b.shape[1]
        else:
            ok = a.shape[1] == bt.ne[0] and b.shape[0] == bt.ne[1] and a.shape[0] == b.shape[1]
        if a.ndim != 2 or b.ndim != 2 or not ok:
            raise BadInput(
                f"{shown}: LoRA for {name} has shapes A{a.shape}·B{b.shape} that do not fit the base tensor (ne {list(bt.ne)}); is this adapter for another model?"
            )
        pairs[name] = LoraPair(a, b)
    if not pairs:
        raise BadInput(f"{shown} holds no LoRA tensors")
    return LoraAdapter(path, alpha, pairs)
