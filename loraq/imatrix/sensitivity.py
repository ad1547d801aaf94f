"""Per-tensor sensitivity: what a unit of quantization error in one tensor costs at the output,
measured with the engine on calibration text.

The size-targeted mix (quantize/mix.py) predicts each type's loss from the tensor's own
quantization error. Tensors differ by far more than their errors do in what that error costs: on
the demo's SmolLM2 fine-tune, a unit of squared error in blk.11 or blk.29 moves the output ~5× as
much as in the median layer, attn_v ~2× as much as attn_q, and the tied token_embd (lookup and
output head at once) is priced by nothing in the weights. Per-column imatrix weights rank columns
within a tensor, not tensors against each other.

So each tensor is probed on its own: its weights get a probe type's quantization error E (q4_0:
every 32-multiple row), the model runs from that tensor's block over the calibration chunks, and
the KL divergence of the output to the unperturbed model's is measured on each chunk's second half
(the positions compare scores). s = KLD / ‖E‖²_F is the tensor's cost per unit of squared error.
KLD is quadratic in small weight errors and different tensors' rounding errors are independent, so
Σ s·‖E_type‖²_F predicts a whole mix's KLD (demo: 0.0134 predicted, 0.0151 measured on held-out
text, where the imatrix-weighted error alone chose a mix at 0.040).

With the model a fine-tune was merged into (`base`), the probe's error is taken orthogonal to the
tensor's delta ΔW = merged − base: the part of a type's error along ΔW is erasure of the fine-tune,
which mix.py refuses outright (a grid the base weights lie on snaps the delta back), and s is the
price of the rest.

Cost: one run from the tensor's block per tensor (half a forward pass on average) over `chunks`
chunks; the reference hidden states at every block are kept (chunks·ctx·n_embd floats per layer),
and the blocks' float32 weights while they fit CACHE_BYTES (else each probe reads them again)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output, io_error
from ..errors import BadArguments, BadInput
from ..ggml_types import ggml_type
from ..gguf_io import open_gguf
from ..kernels import dequantize, quantize, read_f32
from ..llama.calibration import calibration_tokens
from ..llama.engine import Engine, LayerWeights, _Linear, chunk_tokens

PROBE = "q4_0"
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
CACHE_BYTES = 2 << 30  # float32 block weights kept in memory across probes (see measure_sensitivity)
MAX_FILE_BYTES = 16 << 20  # a sensitivity file: ~100 bytes per tensor
FORMAT = "loraq-sensitivity-1"


@dataclass
class Sensitivity:
    """Per tensor (KLD of the probe, ‖E‖²_F of the probe's error): `per_unit` is their ratio."""

    probe: str
    ctx: int
    chunks: int
    tensors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def per_unit(self, name: str) -> float | None:
        """KLD per unit of squared weight error, or None for a tensor that was not probed."""
        kld, sq = self.tensors.get(name, (0.0, 0.0))
        return kld / sq if sq > 0 else None

    def per_unit_all(self) -> dict[str, float]:
        """Every probed tensor's KLD per unit squared error (mix.target_mix's `sensitivity`)."""
        return {n: v for n in self.tensors if (v := self.per_unit(n)) is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "probe": self.probe,
            "ctx": self.ctx,
            "chunks": self.chunks,
            "tensors": {n: {"kld": k, "noise_sq": s} for n, (k, s) in sorted(self.tensors.items())},
        }


def write_sensitivity(path: Path | str, s: Sensitivity) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(s.to_json(), indent=1) + "\n", encoding="utf-8")
    return path


def _number(path: Path, what: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise BadInput(f"{path}: {what} must be a finite number >= 0, got {str(v)[:40]}")
    return float(v)


def read_sensitivity(path: Path | str) -> Sensitivity:
    """A file written by write_sensitivity; anything else is one line of BadInput."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BadInput(f"{path}: {size} bytes; a sensitivity file is at most {MAX_FILE_BYTES}")
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"{path} is not a sensitivity file (JSON: {str(exc)[:80]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), dict):
        raise BadInput(f"{path} is not a sensitivity file (expected format {FORMAT!r} written by loraq)")
    out = Sensitivity(
        str(doc.get("probe", PROBE))[:16], int(_number(path, "ctx", doc.get("ctx", 0))), int(_number(path, "chunks", doc.get("chunks", 0)))
    )
    for name, v in doc["tensors"].items():
        if not isinstance(v, dict) or len(name) > 256:
            raise BadInput(f"{path}: entry {str(name)[:60]!r} must be an object with kld and noise_sq")
        out.tensors[name] = (_number(path, f"{name}.kld", v.get("kld")), _number(path, f"{name}.noise_sq", v.get("noise_sq")))
    return out


def _kind(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) == 4 and parts[0] == "blk" and parts[2] in KINDS and parts[3] == "weight" else None


def _linear_of(lw: LayerWeights, kind: str) -> _Linear:
    if kind in ("attn_q", "attn_k", "attn_v"):
        if len(lw.qkv) != 3:
            raise BadArguments("a fused attn_qkv model: probe attn_qkv instead of q/k/v")
        return lw.qkv[("attn_q", "attn_k", "attn_v").index(kind)]
    return {"attn_output": lw.attn_output, "ffn_gate": lw.ffn_gate, "ffn_up": lw.ffn_up, "ffn_down": lw.ffn_down}[kind]


def probe_error(w: np.ndarray, probe: str, delta: np.ndarray | None) -> np.ndarray:
    """The probe type's error on `w` (rows × ne0), orthogonal to `delta` when given (module doc)."""
    t = ggml_type(probe)
    e = dequantize(quantize(w, t, None), t, w.shape) - w
    if delta is not None:
        dd = float(np.einsum("ij,ij->", delta, delta, dtype=np.float64))
        if dd > 0:
            a = float(np.einsum("ij,ij->", e, delta, dtype=np.float64)) / dd
            e -= np.float32(a) * delta
    return e


def measure_sensitivity(
    model: Path | str,
    text: Path | str,
    names: Sequence[str] | None = None,
    *,
    base: Path | str | None = None,
    ctx: int = 256,
    chunks: int = 2,
    probe: str = PROBE,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """Probe each tensor of `names` (default: every block matrix and token_embd/output) of
    `model` on `chunks` chunks of `ctx` tokens of `text`; `base` is the model before the merge."""
    if ctx < 2 or chunks < 1:
        raise BadArguments(f"ctx must be at least 2 and chunks at least 1, got {ctx} and {chunks}")
    cal = calibration_tokens(model, text, chunks * ctx + 1)
    if len(cal.tokens) < ctx:
        raise BadArguments(f"{text} has {len(cal.tokens)} tokens, fewer than one chunk of ctx={ctx}")
    toks = chunk_tokens(cal.tokens, ctx, chunks, bos=cal.bos).astype(np.int64)
    eng = Engine(model, emulate_activations=False, threads=threads)
    if eng._loras:
        raise BadArguments("measure the merged model, without runtime adapters")
    pt = ggml_type(probe)
    out = Sensitivity(probe, ctx, len(toks))
    keep = slice(ctx // 2, ctx)
    with open_gguf(model) as g, open_gguf(base) if base is not None else contextlib.nullcontext() as gb:
        L = eng.hp.n_layer
        if names is None:
            names = [f"blk.{i}.{k}.weight" for i in range(L) for k in KINDS if g.has_tensor(f"blk.{i}.{k}.weight")]
            names += [n for n in ("token_embd.weight", "output.weight") if g.has_tensor(n)]
        names = [n for n in names if g.has_tensor(n) and g.tensor(n).ne[0] % pt.block == 0 and len(g.tensor(n).ne) == 2]
        # every block's float32 weights stay in memory when they fit CACHE_BYTES (SmolLM2: 0.4 GB);
        # past that each probe reads the blocks it runs again, so memory stays one block
        f32 = sum(4 * t.n_elements for t in g.tensors if t.name.startswith("blk."))
        cached = [eng._layer(g, i) for i in range(L)] if f32 <= CACHE_BYTES else None

        def layer(il: int) -> LayerWeights:
            return cached[il] if cached is not None else eng._layer(g, il)

        ff = eng._vector(g, "rope_freqs.weight") if g.has_tensor("rope_freqs.weight") else None
        cos, sin = eng._rope_cache(ctx, ff)
        norm, head = eng._output(g)

        def run_from(il0: int, h: np.ndarray, first: LayerWeights | None = None) -> np.ndarray:
            for il in range(il0, L):
                lw = first if first is not None and il == il0 else layer(il)
                h = eng._block(lw, h, cos, sin, keep if il == L - 1 else None)
            return h

        def log_probs(h: np.ndarray) -> np.ndarray:
            lg = head(eng._rms_norm(h.reshape(-1, h.shape[-1]), norm), False)
            lg -= lg.max(axis=1, keepdims=True)
            lg -= np.log(np.exp(lg).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
            return lg

        h = eng._embed(g, toks)
        inputs = []
        for il in range(L):
            inputs.append(h)
            h = eng._block(layer(il), h, cos, sin, keep if il == L - 1 else None)
        h_last = h
        ref = log_probs(h)
        p_ref = np.exp(ref)
        ent = (p_ref * ref).sum(axis=1, dtype=np.float64)

        def kld(h: np.ndarray) -> float:
            lp = log_probs(h)
            return float(np.mean(ent - (p_ref * lp).sum(axis=1, dtype=np.float64)))

        for k, name in enumerate(names):
            t = g.tensor(name)
            w = read_f32(g, t).reshape(-1, t.ne[0])
            delta = None
            if gb is not None and gb.has_tensor(name) and gb.tensor(name).ne == t.ne:
                delta = w - read_f32(gb, gb.tensor(name)).reshape(w.shape)
            e = probe_error(w, probe, delta)
            sq = float(np.einsum("ij,ij->", e, e, dtype=np.float64))
            if name in ("token_embd.weight", "output.weight"):
                wq = w + e
                old = head.w
                if name == "output.weight" or eng.tied:
                    head.w = wq
                try:
                    if name == "token_embd.weight":  # the lookup feeds every block
                        value = kld(run_from(0, np.ascontiguousarray(wq[toks], dtype=np.float32)))
                    else:  # only the head reads output.weight
                        value = kld(h_last)
                finally:
                    head.w = old
            else:
                il, kind = int(name.split(".")[1]), _kind(name)
                if kind is None:
                    continue
                lw = layer(il)
                lin = _linear_of(lw, kind)
                saved = lin.w.copy()
                lin.w[...] = w + e  # in place: q/k/v may be views of one stacked matrix
                try:
                    value = kld(run_from(il, inputs[il].copy(), lw))
                finally:
                    lin.w[...] = saved
            out.tensors[name] = (max(0.0, value), sq)
            if progress is not None:
                progress(k + 1, len(names))
    return out


__all__ = ["Sensitivity", "measure_sensitivity", "probe_error", "read_sensitivity", "write_sensitivity"]
