"""Read a GGUF LoRA adapter (or a PEFT folder, converted first) as llama.cpp's loader sees it.

Checks follow llama_adapter_lora_init (docs/llama-cpp.md §3.1), with two deliberate differences: quantized
(Q8_0) adapter tensors are accepted (dequantized exactly), and a LoRA tensor with no counterpart
in the base is an error rather than silently ignored, so nothing of the fine-tune is lost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import scratch_dir
from ..convert import convert_adapter
from ..convert.lora_gguf import TargetMap, permute_rows, plan_modules
from ..convert.peft import load_peft_adapter
from ..errors import BadArguments, BadInput
from ..ggml_types import ggml_type
from ..gguf_io import GGUFFile, open_gguf
from ..kernels import read_f32


@dataclass
class LoraPair:
    a: np.ndarray  # numpy (r, in); for token_embd (n_vocab, r), as stored
    b: np.ndarray  # numpy (out, r)
    peft_scale: float | None = None  # read from a PEFT folder: PEFT's own scale, used instead of alpha/r

    @property
    def rank(self) -> int:
        return self.b.shape[-1]  # lora_b.ne[0]


@dataclass
class LoraAdapter:
    path: Path
    alpha: float
    pairs: dict[str, LoraPair]  # base tensor name -> pair
    # From a PEFT folder only (what a GGUF LoRA cannot hold), keyed by base tensor name, in the base's
    # numpy orientation with q/k rows permuted like the base; an lm_head on a tied base is "output.weight".
    magnitudes: dict[str, np.ndarray] = field(default_factory=dict)  # DoRA m: per output row (token_embd: per column)
    full: dict[str, np.ndarray] = field(default_factory=dict)  # modules_to_save: the whole new tensor
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # trainable tokens: (row ids, new rows)
    tokenizer_dir: Path | None = None  # the PEFT folder, for a grown vocabulary's tokenizer files
    tied_output: bool = False  # the base ties output to token_embd and this adapter changes one but not the other

    def scale(self, name: str, user_scale: float) -> float:
        """llama.cpp's get_scale: user·alpha/rank when alpha ≠ 0, else just user (no 1/r);
        for a pair read from a PEFT folder, user·PEFT's scale (alpha/r or alpha/√r, patterns applied)."""
        p = self.pairs[name]
        if p.peft_scale is not None:
            return user_scale * p.peft_scale
        return user_scale * self.alpha / p.rank if self.alpha != 0 else user_scale

    def touches(self, name: str, untied: bool = False) -> bool:
        """Whether this adapter changes base tensor `name`; with `untied` (output.weight written for a
        base that ties it), trainable token rows of the embeddings count for the head too, as PEFT ties them."""
        if name in self.pairs or name in self.full or name in self.rows:
            return True
        return name == "output.weight" and untied and "token_embd.weight" in self.rows

    def delta(self, name: str) -> np.ndarray:
        """B·A in float64, in the base tensor's numpy orientation."""
        p = self.pairs[name]
        a, b = p.a.astype(np.float64), p.b.astype(np.float64)
        if name == "token_embd.weight":
            return a @ b.T  # lora_a is stored transposed: rows are indexed by token id
        return b @ a


def load_adapter(path: Path | str, base: GGUFFile, merge: bool = False) -> LoraAdapter:
    """A GGUF LoRA file, or a PEFT adapter folder read directly.

    merge=False (runtime use, e.g. the engine): a PEFT folder must be one llama.cpp can run, else the
    converter's one-line refusal naming the merged path. merge=True: DoRA magnitudes,
    modules_to_save weights, trainable token rows and an lm_head LoRA on a tied base are read too."""
    path = Path(path)
    if path.is_dir():
        if not merge:
            with scratch_dir() as tmp:  # named with our pid: a kill -9 leaves it for the next run to remove
                gguf_path = tmp / "adapter-f32.gguf"
                convert_adapter(path, base.path, gguf_path, outtype="f32")
                return _read_gguf_adapter(gguf_path, base, shown=path)
        return read_peft_for_merge(path, base)
    if not path.exists():
        raise BadArguments(f"adapter not found: {path}")
    return _read_gguf_adapter(path, base, shown=path)


def read_peft_for_merge(path: Path, base: GGUFFile) -> LoraAdapter:
    """A PEFT folder as the merge applies it: B·A pairs with PEFT's exact scale (no fold into B,
    no f32 rounding), plus the parts only a merge can apply, each mapped to its base tensor."""
    peft = load_peft_adapter(path, merge=True)
    alpha, plan = plan_modules(peft, base, ggml_type("f32"), merge=True)
    tm = TargetMap(base)
    pairs: dict[str, LoraPair] = {}
    for p in plan:
        m = p.module
        a, b = peft.read(m.key_a), peft.read(m.key_b)
        if m.embedding:  # as a GGUF LoRA stores it: rows indexed by token id
            a = np.ascontiguousarray(a.T)
        if p.heads is not None:
            b = permute_rows(b, p.heads)
        pairs[p.target] = LoraPair(a, b, m.scale)
    out = LoraAdapter(path, alpha, pairs, tokenizer_dir=path)
    parts = peft.parts
    for name, key in parts.magnitudes.items():
        target = next(p.target for p in plan if p.module.name == name)
        ne = _ne(tm, name, key)
        mag = peft.read(key).astype(np.float64)
        # PEFT normalises per output feature: W's rows (out, in); an Embedding's columns (n_embd)
        want = ne[0] if target == "token_embd.weight" else ne[1]
        if mag.shape != (want,):
            raise BadInput(f"`{key}` has {mag.shape[0]} values; DoRA on `{target}` needs one per output feature ({want})")
        heads = tm.heads(target, want, key)
        out.magnitudes[target] = permute_rows(mag, heads) if heads is not None else mag
    for name, key in parts.full.items():
        target, ne = tm.target(name, key, merge=True)
        x = peft.read(key)
        if x.shape[1] != ne[0] or x.shape[0] < ne[1] or (x.shape[0] != ne[1] and target not in VOCAB_TENSORS):
            raise BadInput(
                f"`{key}` (modules_to_save) has shape {list(x.shape)}, but `{target}` has ne {list(ne)}; is the adapter for another model?"
            )
        heads = tm.heads(target, x.shape[0], key)
        out.full[target] = permute_rows(x, heads) if heads is not None else x
    for name, (ids, key) in parts.tokens.items():
        target, ne = tm.target(name, key, merge=True)
        if target not in VOCAB_TENSORS:
            raise BadInput(f"`{key}`: trainable tokens on `{target}` are not supported; loraq merges them into token_embd and output")
        x = peft.read(key)
        if x.shape[1] != ne[0]:
            raise BadInput(f"`{key}` has rows of {x.shape[1]} values, but `{target}` rows have {ne[0]}; is the adapter for another model?")
        out.rows[target] = (np.asarray(ids, dtype=np.int64), x)
    out.tied_output = tm.tied and ("output.weight" in pairs or "output.weight" in out.full or "token_embd.weight" in out.full)
    return out


VOCAB_TENSORS = ("token_embd.weight", "output.weight")  # one row per token: a grown vocabulary grows them


def _ne(tm: TargetMap, name: str, key: str) -> tuple[int, ...]:
    return tm.target(name, key, merge=True)[1]


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
