"""A float32 numpy forward pass that computes the logits llama.cpp's CPU backend computes.

Architectures: llama (SmolLM2, Mistral, Llama 2/3 incl. rope_freqs), qwen2 (q/k/v bias) and qwen3
(per-head q/k RMSNorm). The model math follows llama.cpp's graph builders (src/models/llama.cpp,
qwen2.cpp, qwen3.cpp; llama-graph.cpp build_norm / build_qkv / build_attn / build_ffn /
build_lora_mm / build_inp_embd) and ggml's CPU ops (rms_norm with a double sum, rope's cached
theta recurrence, soft_max_ext with scale then mask, SwiGLU as silu(gate)·up).

Streaming (docs/design.md ground rule 2): `Engine.run` embeds every chunk (dequantizing only the
token_embd rows it needs), then loads ONE layer's weights (float32, through dequant.py, whole
tensors at once), pushes all chunks' hidden states through it, frees it and moves on; the output
matrix comes last and is applied per chunk. Chunks go through a layer in groups whose widest
activation is ~32 MiB: each projection is one GEMM over the group's rows instead of one per chunk
(about twice the BLAS throughput at 256 rows), the attention is a few stacked matmuls per group,
and a query block skips the keys it cannot see. With `threads` > 1 (and at least that many chunks)
the groups are split between that many worker threads, each running single-threaded BLAS, so that
numpy's elementwise work uses every core too, not only the GEMMs (a SmolLM2 compare on 2 cores:
two groups of 4×256 rows); the layer's weights are dequantized in the same threads, and each
chunk's output projection too, the callbacks still one at a time in chunk order.
The last layer computes only the positions whose logits are wanted (its k and v need every
position, its attention output and feed-forward do not). Peak memory is the hidden states
(n_chunks·n_ctx·n_embd floats) plus the largest of one layer's float32 weights and the float32
output matrix (plus a group's activations and one chunk's logits): it does not grow with the
number of layers. Adapters' A/B matrices are held
whole (a rank-16 adapter is ~3 % of SmolLM2). The next layer is not prefetched: that saved ~1 % on 2 cores and would double the weights held.

Numerics (docs/llama-cpp.md §3.3): ggml's CPU mul_mat first converts the activations to the weight type's
`vec_dot_type`. With `emulate_activations=True` (the default) the engine does the same before
each matmul: F16 weights see F16-rounded activations, BF16 weights BF16-rounded ones, Q4_0 / Q5_0
/ Q8_0 / IQ4_NL see Q8_0-quantized activations (Q4_1 / Q5_1 too, though their Q8_1 also carries a
separately rounded block sum that is not emulated), K-quants and the other IQ types see
Q8_K-quantized activations; F16/Q8_0 LoRA A and B matrices likewise. Measured against llama.cpp
(tests/test_engine.py, scripts/bench_engine.py, 2 cores, AVX-512):
* F32 SmolLM2: KLD 1.5e-11 either way — the op semantics are exact.
* F16, one layer: KLD 7e-7 -> 7e-8 with emulation; a 4-layer synthetic model 3e-7 -> 1.5e-7.
* F16 SmolLM2 (30 layers): ~2e-6 either way. That is the model's own floor: perturbing loraq's
  input embeddings by 1e-7 (relative) moves its logits by the same KLD ~2e-6.
* Q4_0 SmolLM2: ~5e-3 either way, again the floor (Q8_0 rounding turns ulp differences into whole
  quantization steps); but the quantity `compare` reports, KLD(F16 ‖ Q4_0), is 1.7 % low without
  emulation and 0.4 % low with it (llama.cpp 0.3024, loraq 0.2973 / 0.3012).
Emulation costs ~10 % of the run time (Q8_0 blocks, and F16 rounding done on the float32 bit
pattern: round_f16); it stays on for every weight type. `emulate_activations=False` gives plain
float32 semantics. BLAS results depend on a row's place in a GEMM at the ulp level, so a chunk's
logits depend (that little, and deterministically) on the chunks grouped with it; emulation can
turn such an ulp into a quantization step, as above, which is the floor these figures measure.

The KV cache is F32 by default (llama.cpp with type_k=type_v=F32). `kv_type="f16"` emulates
llama.cpp's default F16 cache (K, V rounded to F16; Q and the softmax rounded to F16 for the two
attention matmuls), for comparisons with a stock llama-perplexity run.

Chunks follow llama-perplexity (docs/llama-cpp.md §8.1): each chunk is evaluated on its own from position
0 with a causal mask; replacing the first token by BOS is the caller's job (see `chunk_tokens`)."""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import BadArguments, BadInput
from ..ggml_types import GGMLType
from ..gguf_io import GGUFFile, TensorInfo, open_gguf
from ..kernels import dequantize, jit
from ..merge.lora_file import load_adapter
from .dequant import dequantize_tensor

ARCHS = ("llama", "qwen2", "qwen3")
_NEOX = ("qwen2", "qwen3")  # llama.cpp's llama_model_rope_type: NEOX; llama is NORM (adjacent pairs)

# ggml-cpu type_traits_cpu[type].vec_dot_type: how activations are converted before a mul_mat
_Q8_0_DOT = {"q4_0", "q5_0", "q8_0", "iq4_nl", "q4_1", "q5_1", "q8_1", "mxfp4"}
_Q8_K_DOT = {f"q{i}_K" for i in range(2, 7)} | {
    "iq2_xxs",
    "iq2_xs",
    "iq3_xxs",
    "iq1_s",
    "iq3_s",
    "iq2_s",
    "iq4_xs",
    "iq1_m",
    "tq1_0",
    "tq2_0",
}


def vec_dot_kind(t: GGMLType) -> str:
    """The activation format ggml's CPU mul_mat uses for weights of type t: f32, f16, bf16, q8_0 or q8_k."""
    if t.name in ("f32", "f16", "bf16"):
        return t.name
    if t.name in _Q8_0_DOT:
        return "q8_0"
    if t.name in _Q8_K_DOT:
        return "q8_k"
    raise BadInput(f"the engine has no matmul rule for tensor type {t.name}")


def round_f16(x: np.ndarray) -> np.ndarray:
    """x.astype(float16).astype(float32), bit for bit, at ~2.5x the speed of numpy's casts.

    Normal F16 range: round the float32 to 11 significant bits, nearest even, on its bit pattern
    (add 0xFFF plus the lowest kept bit, clear the low 13 bits; a carry moves into the exponent as
    it should). Below 2^-14 F16 is subnormal, a fixed step of 2^-24: rint(x·2^24)·2^-24, exact in
    float32. From 65520 up the F16 is ±inf; NaN stays NaN. Compiled when numba is there (the
    same steps in two vectorized loops, ~5x)."""
    fast = jit.round_f16(x)
    if fast is not None:
        return fast
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    out = ((u + (np.uint32(0xFFF) + ((u >> 13) & 1))) & np.uint32(0xFFFFE000)).view(np.float32)
    ax = np.abs(x)
    small = ax < np.float32(2.0**-14)
    if small.any():
        out[small] = np.rint(x[small] * np.float32(2.0**24)) * np.float32(2.0**-24)
    big = ~(ax < np.float32(65520))
    if big.any():
        xb = x[big]
        out[big] = np.where(np.isnan(xb), xb, np.copysign(np.float32(np.inf), xb))
    return out


def round_activations(x: np.ndarray, kind: str) -> np.ndarray:
    """x (rows, k) float32 as ggml's from_float(vec_dot_type) then to_float would give it back."""
    if kind == "f32":
        return x
    if kind == "f16":
        return round_f16(x)
    if kind == "bf16":  # ggml_fp32_to_bf16: round to nearest even on the top 16 bits
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        r = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)).view(np.float32)
        return r
    n, k = x.shape
    if kind == "q8_0":  # quantize_row_q8_0 (AVX): id = 127/amax, round to nearest even, d stored as F16
        if k % 32:
            return x
        fast = jit.q8_0_activations(x)  # the same arithmetic in one pass (~4x), when numba is there
        if fast is not None:
            return fast
        b = x.reshape(n, k // 32, 32)
        t = np.abs(b)  # the one full-size temporary: |x|, then x·id, then the result
        amax = t.max(axis=2, keepdims=True)
        d = (amax / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        np.multiply(b, inv, out=t)
        np.rint(t, out=t)
        t *= d.astype(np.float16).astype(np.float32)
        return t.reshape(n, k)
    if kind == "q8_k":  # quantize_row_q8_K_ref: iscale = -127/max (signed max), nearest_int, d = 1/iscale (f32)
        if k % 256:
            return x
        fast = jit.q8_k_activations(x)
        if fast is not None:
            return fast
        b = x.reshape(n, k // 256, 256)
        t = np.abs(b)
        idx = t.argmax(axis=2)[..., None]  # first index of the largest |x|, as the C loop's '>'
        mx = np.take_along_axis(b, idx, axis=2)
        with np.errstate(divide="ignore"):
            iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
            d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
        np.multiply(b, iscale, out=t)
        np.rint(t, out=t)
        np.minimum(t, np.float32(127), out=t)
        t *= d
        return t.reshape(n, k)
    raise ValueError(kind)


@dataclass
class _Lora:
    a: np.ndarray  # (r, in)
    b: np.ndarray  # (out, r)
    scale: float
    a_kind: str
    b_kind: str


# observer(tensor name, float32 input rows) sees every weight matmul's input before any rounding
Observer = Callable[[str, np.ndarray], None]


@runtime_checkable
class GroupObserver(Protocol):
    """An observer that worker threads may feed at once (see Engine._workers). Before each chunk
    group goes through a layer, the thread that runs it calls begin_group(group, n_groups); every
    call until its next begin_group is about that group, and each weight's input comes once per
    group. So the observer can keep per-group results and fold them in group order, which makes
    its output independent of which thread ran what."""

    def begin_group(self, group: int, n_groups: int) -> None: ...

    def __call__(self, name: str, x: np.ndarray) -> None: ...


@dataclass
class _Linear:
    """y = W·x (+ Σ scale·B·(A·x)) (+ bias), as build_lora_mm followed by the optional bias add."""

    w: np.ndarray  # (out, in) float32
    kind: str  # vec_dot kind of w
    bias: np.ndarray | None = None
    loras: list[_Lora] = field(default_factory=list)
    name: str = ""  # the GGUF tensor name, for the observer
    observer: Observer | None = None

    def __call__(self, x: np.ndarray, emulate: bool, rounded: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """`rounded` caches x's conversions by kind when several weights read the same x (q/k/v, gate/up)."""
        rounded = {} if rounded is None else rounded
        if self.observer is not None:
            self.observer(self.name, x)
        y = _converted(x, self.kind, emulate, rounded) @ self.w.T
        self.finish(x, y, emulate, rounded)
        return y

    def finish(self, x: np.ndarray, y: np.ndarray, emulate: bool, rounded: dict[str, np.ndarray]) -> None:
        """Add the LoRAs and the bias to y = W·x, in place (y may be a view of a fused product)."""
        obs = self.observer
        for lo in self.loras:
            if obs is not None:  # build_lora_mm's mul_mat(a, x), whose src0 llama.cpp names "<W>.lora_a"
                obs(self.name + ".lora_a", x)
            ax = _converted(x, lo.a_kind, emulate, rounded) @ lo.a.T
            if obs is not None:  # and mul_mat(b, a·x): B sees A·x before the scale
                obs(self.name + ".lora_b", ax)
            if emulate:
                ax = round_activations(ax, lo.b_kind)
            y += np.float32(lo.scale) * (ax @ lo.b.T)
        if self.bias is not None:
            y += self.bias


def _converted(x: np.ndarray, kind: str, emulate: bool, rounded: dict[str, np.ndarray]) -> np.ndarray:
    """x as a matmul with weights of vec_dot kind `kind` sees it, cached in `rounded`."""
    if not emulate or kind == "f32":
        return x
    if kind not in rounded:
        rounded[kind] = round_activations(x, kind)
    return rounded[kind]


@dataclass
class LayerWeights:
    """One block's float32 weights, as build_norm / build_qkv / build_attn / build_ffn read them."""

    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: tuple[_Linear, ...]  # (attn_qkv,) fused: one matmul, then views; else (attn_q, attn_k, attn_v)
    attn_output: _Linear
    ffn_gate: _Linear
    ffn_up: _Linear
    ffn_down: _Linear
    qk_norm: tuple[np.ndarray, np.ndarray] | None  # qwen3's per-head RMSNorm weights of q and k
    # separate q, k, v of one vec_dot kind: their weights stacked, qkv's w are views of it, and one
    # GEMM computes all three (one 576x960 product instead of three is ~15 % faster on SmolLM2;
    # every output element is the same dot product, so the values are identical)
    qkv_w: np.ndarray | None = None
    # ffn_gate and ffn_up likewise (gate rows first): one 2·n_ff-wide GEMM, ~7 % faster than two
    gate_up_w: np.ndarray | None = None


@dataclass(frozen=True)
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    eps: float
    freq_base: float
    freq_scale: float
    neox: bool


def _hparams(g: GGUFFile) -> HParams:
    arch = g.arch
    if arch not in ARCHS:
        raise BadInput(f"{g.path}: architecture '{arch}' is not supported by loraq's engine (supported: {', '.join(ARCHS)})")

    def need(key: str) -> int:
        v = g.arch_int(key)
        if v is None:
            raise BadInput(f"{g.path}: missing metadata {arch}.{key}")
        if v < 1:
            raise BadInput(f"{g.path}: metadata {arch}.{key} is {v}; it must be at least 1")
        return v

    n_layer, n_embd, n_head = need("block_count"), need("embedding_length"), need("attention.head_count")
    if (g.arch_int("expert_count") or 0) > 0:
        raise BadInput(f"{g.path}: mixture-of-experts models are not supported by loraq's engine yet")
    if not g.has_tensor("token_embd.weight"):
        raise BadInput(f"{g.path}: missing tensor token_embd.weight")
    n_head_kv = g.arch_int("attention.head_count_kv", n_head)
    hk = g.arch_int("attention.key_length", n_embd // n_head)
    hv = g.arch_int("attention.value_length", n_embd // n_head)
    n_rot = g.arch_int("rope.dimension_count", hk)
    if hk != hv or n_rot != hk:
        raise BadInput(f"{g.path}: head sizes k={hk}, v={hv}, rope={n_rot} must be equal for {arch}")
    scaling = g.get_str(f"{arch}.rope.scaling.type", "linear")
    factor = g.get_float(f"{arch}.rope.scaling.factor", g.get_float(f"{arch}.rope.scale_linear", 0.0)) or 0.0
    if scaling not in ("linear", "none"):
        raise BadInput(f"{g.path}: rope scaling '{scaling}' is not supported by loraq's engine (only linear)")
    freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
    eps = g.get_float(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise BadInput(f"{g.path}: missing metadata {arch}.attention.layer_norm_rms_epsilon")
    return HParams(
        arch=arch,
        n_vocab=g.tensor("token_embd.weight").ne[1],
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=hk,
        head_dim_v=hv,
        n_rot=n_rot,
        eps=eps,
        freq_base=g.get_float(f"{arch}.rope.freq_base", 10000.0) or 10000.0,
        freq_scale=freq_scale,
        neox=arch in _NEOX,
    )


def retain_freed_memory() -> bool:
    """Best effort (glibc): keep freed blocks in the heap instead of returning them to the kernel.

    glibc serves big allocations with mmap and gives them back on free, so every numpy temporary
    of a block's arithmetic starts as fresh pages, each faulted in on first touch. In this VM that
    made an elementwise op 10-20x slower than its arithmetic (Q8_0 dequantization of 16 Ki blocks:
    9-12 ms -> 0.5-0.8 ms). Raising the mmap and trim thresholds lets the next temporary reuse
    the pages of the last. The peak is unchanged (the same arrays are alive at once); what goes is
    giving memory back to the system between two chunks, which a run of the engine doesn't need."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def set_blas_threads(n: int) -> bool:
    """Best effort: set numpy's OpenBLAS thread count (numpy wheels bundle scipy-openblas)."""
    if n <= 0:
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    libs = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    done = False
    for lib in libs:
        try:
            h = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(h, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def chunk_tokens(tokens: Sequence[int] | np.ndarray, n_ctx: int, n_chunks: int | None = None, bos: int | None = None) -> np.ndarray:
    """Split a token stream into (n_chunks, n_ctx) as llama-perplexity does: whole chunks only,
    and the first token of each chunk replaced by `bos` when the vocab adds BOS (§8.1)."""
    t = np.asarray(tokens, dtype=np.int32).ravel()
    avail = len(t) // n_ctx
    n = avail if n_chunks is None else min(n_chunks, avail)
    if n < 1:
        raise BadArguments(f"need at least {n_ctx} tokens for one chunk of n_ctx={n_ctx}, got {len(t)}")
    out = t[: n * n_ctx].reshape(n, n_ctx).copy()
    if bos is not None:
        out[:, 0] = bos
    return out


class Engine:
    """Logits of a llama/qwen2/qwen3 GGUF model, optionally with runtime LoRA adapters.

    engine = Engine("model.gguf", adapters=[("adapter.gguf", 1.0)])
    engine.run(tokens_int32_of_shape_(n_chunks, n_ctx), lambda i, logits: ...)
    """

    def __init__(
        self,
        model_path: Path | str,
        adapters: Sequence[tuple[Path | str, float]] = (),
        threads: int = 0,
        emulate_activations: bool = True,
        kv_type: str = "f32",
        observer: Observer | None = None,
    ):
        if kv_type not in ("f32", "f16"):
            raise BadArguments(f"kv_type must be 'f32' or 'f16', got {kv_type!r}")
        jit.preload_engine_kernels()  # numba's one-time start-up runs while the header is parsed
        self.path = Path(model_path)
        self.emulate = emulate_activations
        self.kv_type = kv_type
        self.observer = observer  # sees each weight matmul's input (loraq.imatrix); None costs nothing
        self.threads = threads
        if threads > 0:
            set_blas_threads(threads)
        retain_freed_memory()
        # the header is parsed once (a vocabulary of 49k strings is ~40 ms); `with` closes only the
        # file descriptor, which the next read opens again
        self._gguf = open_gguf(self.path)
        with self._gguf as g:
            self.hp = _hparams(g)
            self.tied = not g.has_tensor("output.weight")
            self._loras = self._load_adapters(g, adapters)

    @property
    def n_vocab(self) -> int:
        return self.hp.n_vocab

    # -- adapters -------------------------------------------------------------------------------
    def _load_adapters(self, g: GGUFFile, adapters: Sequence[tuple[Path | str, float]]) -> dict[str, list[_Lora]]:
        used = {"token_embd.weight", "output.weight" if not self.tied else "token_embd.weight"}
        for i in range(self.hp.n_layer):
            for n in ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                used.add(f"blk.{i}.{n}.weight")
        out: dict[str, list[_Lora]] = {}
        for path, user_scale in adapters:
            if float(user_scale) == 0.0:
                continue  # llama_set_adapters_lora drops adapters with scale 0
            ad = load_adapter(path, g)  # BadInput for tensors missing from the model or misshapen
            types: dict[str, GGMLType] = {}
            if Path(path).is_file():
                with open_gguf(path) as f:
                    types = {t.name: t.type for t in f.tensors}
            for name, pair in ad.pairs.items():
                if name not in used:
                    raise BadInput(
                        f"{path}: LoRA on {name}, which llama.cpp's {self.hp.arch} graph does not apply at runtime "
                        "(it would be silently without effect): merge it instead (loraq merge)"
                    )
                if name == "token_embd.weight" and self.tied:
                    raise BadInput(
                        f"{path}: LoRA on token_embd.weight of a model with tied embeddings; llama.cpp would also apply it to "
                        "the output projection and abort (docs/llama-cpp.md §3.3): merge it instead (loraq merge)"
                    )
                at, bt = types.get(name + ".lora_a"), types.get(name + ".lora_b")
                kinds = (vec_dot_kind(at) if at else "f32", vec_dot_kind(bt) if bt else "f32")
                a, b = pair.a.astype(np.float32), pair.b.astype(np.float32)
                if name == "token_embd.weight":  # a (n_vocab, r) indexed by token, b (n_embd, r)
                    kinds = ("f32", kinds[1])
                out.setdefault(name, []).append(_Lora(a, b, ad.scale(name, float(user_scale)), *kinds))
        return out

    # -- weights --------------------------------------------------------------------------------
    def _linear(self, g: GGUFFile, name: str, pre: dict[str, np.ndarray] | None = None) -> _Linear:
        if not g.has_tensor(name):
            raise BadInput(f"{self.path}: missing tensor {name}")
        t = g.tensor(name)
        w = pre.pop(name) if pre and name in pre else _read_f32(g, t)
        if w.ndim != 2:
            raise BadInput(f"{self.path}: tensor {name} is {w.ndim}-D; the engine handles dense 2-D weights only (no MoE)")
        bias_name = name[: -len(".weight")] + ".bias"
        bias = _read_f32(g, g.tensor(bias_name)).reshape(-1) if g.has_tensor(bias_name) else None
        return _Linear(w, vec_dot_kind(t.type), bias, self._loras.get(name, []), name, self.observer)

    def _vector(self, g: GGUFFile, name: str, pre: dict[str, np.ndarray] | None = None) -> np.ndarray:
        if not g.has_tensor(name):
            raise BadInput(f"{self.path}: missing tensor {name}")
        return (pre.pop(name) if pre and name in pre else _read_f32(g, g.tensor(name))).reshape(-1)

    def _layer(self, g: GGUFFile, il: int, pool: ThreadPoolExecutor | None = None) -> LayerWeights:
        """Block il's weights; with a pool, its big matrices are dequantized in the pool's threads
        (largest first), so that the cores the blocks share are not left to one thread. q, k, v
        (and gate, up) of one vec_dot kind and width are dequantized straight into one stacked
        matrix (see LayerWeights.qkv_w), not copied there afterwards."""
        p = f"blk.{il}."
        mats = {t.name: t for t in g.tensors if t.name.startswith(p) and len(t.ne) == 2}
        into: dict[str, np.ndarray] = {}
        fused: dict[str, np.ndarray] = {}
        for key, parts in (("qkv", ("attn_q", "attn_k", "attn_v")), ("gate_up", ("ffn_gate", "ffn_up"))):
            ts = [mats[p + n + ".weight"] for n in parts if p + n + ".weight" in mats]
            if len(ts) != len(parts) or len({(vec_dot_kind(t.type), t.ne[0]) for t in ts}) != 1:
                continue
            stack = np.empty((sum(t.ne[1] for t in ts), ts[0].ne[0]), dtype=np.float32)
            at = 0
            for t in ts:
                into[t.name] = stack[at : at + t.ne[1]]
                at += t.ne[1]
            fused[key] = stack
        big = sorted(mats.values(), key=lambda t: -t.n_elements)

        def read(t: TensorInfo) -> np.ndarray:
            return _read_f32(g, t, into.get(t.name))

        pre = dict(zip((t.name for t in big), (pool.map(read, big) if pool is not None else map(read, big)), strict=True))
        lw = LayerWeights(
            attn_norm=self._vector(g, p + "attn_norm.weight"),
            ffn_norm=self._vector(g, p + "ffn_norm.weight"),
            qkv=tuple(
                self._linear(g, p + n + ".weight", pre)
                for n in (("attn_qkv",) if g.has_tensor(p + "attn_qkv.weight") else ("attn_q", "attn_k", "attn_v"))
            ),
            attn_output=self._linear(g, p + "attn_output.weight", pre),
            ffn_gate=self._linear(g, p + "ffn_gate.weight", pre),
            ffn_up=self._linear(g, p + "ffn_up.weight", pre),
            ffn_down=self._linear(g, p + "ffn_down.weight", pre),
            qk_norm=(
                (self._vector(g, p + "attn_q_norm.weight"), self._vector(g, p + "attn_k_norm.weight")) if self.hp.arch == "qwen3" else None
            ),
            qkv_w=fused.get("qkv"),
            gate_up_w=fused.get("gate_up"),
        )
        return lw

    def _output(self, g: GGUFFile, pool: ThreadPoolExecutor | None = None, workers: int = 1) -> tuple[np.ndarray, _Linear]:
        """The output norm and projection; with a pool, the matrix (SmolLM2's is 113 MB of float32,
        0.1 s on one core, most of it the first touch of fresh pages) is dequantized by its threads,
        each a band of rows."""
        norm = self._vector(g, "output_norm.weight")
        name = "token_embd.weight" if self.tied else "output.weight"
        pre = None
        t = g.tensor(name) if g.has_tensor(name) else None
        if pool is not None and workers > 1 and t is not None and len(t.ne) == 2:
            rows, row_bytes = t.ne[1], t.nbytes // t.ne[1]
            w = np.empty((rows, t.ne[0]), dtype=np.float32)
            raw = g.read_raw(t)
            cuts = [rows * i // workers for i in range(workers + 1)]

            def band(ab: tuple[int, int]) -> None:
                a, b = ab
                dequantize_tensor(raw[a * row_bytes : b * row_bytes], t.type, (b - a, t.ne[0]), w[a:b])

            list(pool.map(band, itertools.pairwise(cuts)))
            pre = {name: w}
        out = self._linear(g, name, pre)
        if self.tied:  # the lm_head LoRA is looked up by name: token_embd LoRAs were refused above
            out.loras = []
        return norm, out

    def _embed(self, g: GGUFFile, tokens: np.ndarray) -> np.ndarray:
        """get_rows(token_embd, tokens) (+ token_embd LoRA), dequantizing only the rows used."""
        t = g.tensor("token_embd.weight")
        raw = g.read_raw(t).reshape(t.ne[1], -1)
        uniq, inv = np.unique(tokens.ravel(), return_inverse=True)
        rows = dequantize(raw[uniq], t.type, (len(uniq), t.ne[0]))
        del raw
        x = rows[inv].reshape(*tokens.shape, t.ne[0])
        for lo in self._loras.get("token_embd.weight", []):
            ax = lo.a[tokens.ravel()]  # get_rows(A, tokens): (n, r)
            if self.emulate:
                ax = round_activations(ax, lo.b_kind)
            x += (np.float32(lo.scale) * (ax @ lo.b.T)).reshape(x.shape)
        return np.ascontiguousarray(x, dtype=np.float32)

    # -- math -----------------------------------------------------------------------------------
    def _rms_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """ggml_rms_norm (sum of squares in double) then ggml_mul by the weight."""
        n = x.shape[-1]
        sq = x * x
        mean = (np.add.reduce(sq, axis=-1, dtype=np.float64, keepdims=True) / n).astype(np.float32)
        scale = np.float32(1) / np.sqrt(mean + np.float32(self.hp.eps))
        sq = np.multiply(x, scale, out=sq)
        sq *= w
        return sq

    def _rope_cache(self, n_ctx: int, freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin (n_ctx, n_rot/2) as ggml_rope_cache_init: theta_i = p·theta_scale^i by repeated f32 multiply."""
        hp = self.hp
        half = hp.n_rot // 2
        theta_scale = np.float32(math.pow(float(np.float32(hp.freq_base)), float(np.float32(-2.0) / np.float32(hp.n_rot))))
        th: np.ndarray = np.empty((n_ctx, half), dtype=np.float32)
        th[:, 0] = np.arange(n_ctx, dtype=np.float32)
        for i in range(1, half):
            th[:, i] = th[:, i - 1] * theta_scale
        if freq_factors is not None:
            th = th / freq_factors[:half].astype(np.float32)
        th = (np.float32(hp.freq_scale) * th).astype(np.float32)
        return np.cos(th.astype(np.float64)).astype(np.float32), np.sin(th.astype(np.float64)).astype(np.float32)

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x (G, T, H, D): NORM rotates adjacent pairs (0,1),(2,3)…; NEOX rotates (i, i+n_rot/2)."""
        n_rot = self.hp.n_rot
        fast = jit.rope(x, cos, sin, n_rot, self.hp.neox)  # the same arithmetic in one pass (~3x)
        if fast is not None:
            return fast
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(x)
        if n_rot < x.shape[-1]:
            out[..., n_rot:] = x[..., n_rot:]
        if self.hp.neox:
            x0, x1 = x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot]
            out[..., : n_rot // 2] = x0 * c - x1 * s
            out[..., n_rot // 2 : n_rot] = x0 * s + x1 * c
        else:
            x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = x0 * c - x1 * s
            out[..., 1:n_rot:2] = x0 * s + x1 * c
        return out

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """q (G, Tq, H, D) at positions `pos` (ascending), k/v (G, T, Hkv, D) for G chunks -> (G, Tq, H·D).
        Causal; soft_max_ext(kq·scale + mask) with the sum in double as ggml's; q head h reads kv
        head h // (H / Hkv) (ggml_mul_mat broadcast)."""
        G, Tq, H, D = q.shape
        T, Hkv = k.shape[1], k.shape[2]
        grp = H // Hkv
        scale = np.float32(1.0 / math.sqrt(D))  # 1.0f/sqrtf(float(n_embd_head))
        if self.kv_type == "f16":  # F16 cache; kq = mul_mat(k, q) then sees q as F16
            k, v, q = round_f16(k), round_f16(v), round_f16(q)
        # (chunk, kv head) pairs, each a contiguous matrix so that every product is one BLAS call;
        # the q heads of one group are stacked so that they share that call.
        qh = np.ascontiguousarray(q.reshape(G, Tq, Hkv, grp, D).transpose(0, 2, 3, 1, 4)).reshape(G * Hkv, grp * Tq, D)
        kh = np.ascontiguousarray(k.transpose(0, 2, 3, 1)).reshape(G * Hkv, D, T)
        vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).reshape(G * Hkv, T, D)
        # Causal: a query block needs the keys up to its last position only (ggml computes the masked
        # scores too; they become exp(-inf) = 0 either way, so skipping them changes no sum). Four
        # blocks compute 5/8 of the full score matrix, two 3/4.
        n_blocks = 1 if Tq < 128 else 2 if Tq < 256 else 4
        cuts = [Tq * i // n_blocks for i in range(n_blocks + 1)]
        blocks = list(itertools.pairwise(cuts))
        # a power-of-two scale (head size 64, 256) is exact on q: one pass over q, not the scores
        folded = math.frexp(float(scale))[0] == 0.5
        if folded:
            qh = qh * scale
        out = np.empty((G * Hkv, grp, Tq, D), dtype=np.float32)
        qg = qh.reshape(G * Hkv, grp, Tq, D)
        for b0, b1 in blocks:
            nk = int(pos[b1 - 1]) + 1  # keys 0 .. last query position of the block
            # only keys past the block's first position can be masked: the mask covers those
            m0 = min(nk, int(pos[b0]) + 1)
            mask = np.where(np.arange(m0, nk)[None, :] > pos[b0:b1, None], np.float32(-np.inf), np.float32(0))
            nb = b1 - b0
            step = max(1, (1 << 24) // (grp * nb * nk))  # pairs per batch: score blocks of at most 64 MiB
            for h0 in range(0, G * Hkv, step):
                h1 = min(G * Hkv, h0 + step)
                qb = qg[h0:h1, :, b0:b1] if len(blocks) > 1 else qh[h0:h1]
                s = np.matmul(qb.reshape(h1 - h0, grp * nb, D), kh[h0:h1, :, :nk]).reshape(h1 - h0, grp, nb, nk)
                if not folded:
                    s *= scale
                s[..., m0:] += mask
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s *= (1.0 / np.add.reduce(s, axis=-1, dtype=np.float64, keepdims=True)).astype(np.float32)
                if self.kv_type == "f16":  # kqv = mul_mat(v, kq): F16 V converts kq to F16
                    s = round_f16(s)
                out[h0:h1, :, b0:b1] = np.matmul(s.reshape(h1 - h0, grp * nb, nk), vh[h0:h1, :nk]).reshape(h1 - h0, grp, nb, D)
        return out.reshape(G, Hkv, grp, Tq, D).transpose(0, 3, 1, 2, 4).reshape(G, Tq, H * D)

    def _block(self, lw: LayerWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, keep: slice | None = None) -> np.ndarray:
        """One block over G chunks at once, x (G, T, n_embd): every matmul sees all G·T rows.
        With `keep`, only those positions' outputs are computed (the last layer: the rest are
        never read), though every position's k and v still are."""
        hp, em = self.hp, self.emulate
        G, T, E = x.shape
        cur = self._rms_norm(x, lw.attn_norm).reshape(G * T, E)
        nq, nk = hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k
        rx: dict[str, np.ndarray] = {}
        if len(lw.qkv) == 1:
            qkv = lw.qkv[0](cur, em)
            q, k, v = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
        elif lw.qkv_w is not None:
            for lin in lw.qkv:
                if lin.observer is not None:
                    lin.observer(lin.name, cur)
            qkv = _converted(cur, lw.qkv[0].kind, em, rx) @ lw.qkv_w.T
            q, k, v = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
            for lin, part in zip(lw.qkv, (q, k, v)):
                lin.finish(cur, part, em, rx)
        else:
            q, k, v = (lin(cur, em, rx) for lin in lw.qkv)
        del cur, rx
        q = q.reshape(G, T, hp.n_head, hp.head_dim_k)
        k = k.reshape(G, T, hp.n_head_kv, hp.head_dim_k)
        v = v.reshape(G, T, hp.n_head_kv, hp.head_dim_v)
        if lw.qk_norm is not None:
            q = self._rms_norm(q, lw.qk_norm[0])
            k = self._rms_norm(k, lw.qk_norm[1])
        if keep is not None:
            q = q[:, keep]
            q = self._rope(q, cos[keep], sin[keep])
            x = x[:, keep]
        else:
            q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        att = self._attention(q, k, v, np.arange(T)[keep] if keep is not None else np.arange(T))
        Tq = att.shape[1]
        ffn_inp = lw.attn_output(att.reshape(G * Tq, -1), em)
        ffn_inp += x.reshape(G * Tq, E)
        del att, q, k, v
        cur = self._rms_norm(ffn_inp, lw.ffn_norm)
        rx = {}
        if lw.gate_up_w is not None:
            for lin in (lw.ffn_up, lw.ffn_gate):
                if lin.observer is not None:
                    lin.observer(lin.name, cur)
            gu = _converted(cur, lw.ffn_gate.kind, em, rx) @ lw.gate_up_w.T
            n_ff = lw.ffn_gate.w.shape[0]
            gate, up = gu[:, :n_ff], gu[:, n_ff:]
            lw.ffn_up.finish(cur, up, em, rx)
            lw.ffn_gate.finish(cur, gate, em, rx)
        else:
            up = lw.ffn_up(cur, em, rx)
            gate = lw.ffn_gate(cur, em, rx)
        del cur, rx
        # swiglu: silu(gate) * up, silu(x) = x / (1 + exp(-x)), in place on gate
        with np.errstate(over="ignore"):
            act = np.negative(gate)
            np.exp(act, out=act)
            act += np.float32(1)
            np.divide(gate, act, out=act)
            act *= up
        del up, gate
        out = lw.ffn_down(act, em)
        out += ffn_inp
        return out.reshape(G, Tq, E)

    # -- driver ---------------------------------------------------------------------------------
    def run(self, tokens: np.ndarray, on_logits: Callable[[int, np.ndarray], None] | None, rows: slice | None = None) -> None:
        """Evaluate each row of `tokens` (n_chunks, n_ctx) independently from position 0 and call
        on_logits(chunk_index, logits float32 (n_ctx, n_vocab)) for every chunk, in order.

        `rows` limits the logits to those positions (e.g. the scored half of a chunk): the output
        projection is a fifth of a small model's work and unscored positions need none of it, nor
        the last layer's attention output and feed-forward. `on_logits=None` skips the output
        projection altogether (an observer that needs only the blocks' matmul inputs)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise BadArguments(f"tokens must be an integer array of shape (n_chunks, n_ctx), got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.hp.n_vocab):
            raise BadInput(f"token ids must lie in [0, {self.hp.n_vocab}); got {tokens.min()}..{tokens.max()}")
        tokens = tokens.astype(np.int64)
        n_chunks, n_ctx = tokens.shape
        keep = None
        if rows is not None:
            start, stop, step = rows.indices(n_ctx)
            keep = slice(start, stop) if step == 1 and stop > start else None
        with self._gguf as g:
            width = n_ctx * self._widest(g)  # a chunk's widest activation, in elements
            workers = self._workers(n_chunks, width)
            pool = ThreadPoolExecutor(workers) if workers > 1 else None
            if pool is not None:
                set_blas_threads(1)  # each worker thread runs its own single-threaded GEMMs
            try:
                self._run(g, tokens, on_logits, keep, rows, pool, workers, width)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C: no further chunks
                    set_blas_threads(self.threads if self.threads > 0 else workers)

    def _workers(self, n_chunks: int, width: int) -> int:
        """Threads that each push their own chunks through a layer (1: one group, BLAS threads).

        numpy's elementwise passes (activation rounding, attention softmax, RoPE, SwiGLU, norms) run
        on one core; with 2 BLAS threads only the GEMMs used both cores and the rest left one idle,
        a third of the run. Splitting the chunks between threads, each with single-threaded BLAS,
        keeps every core busy (numpy and BLAS release the GIL). Not with a plain observer (a
        GroupObserver is told which group each input belongs to), nor with fewer chunks than threads.
        The groups in flight share one group's activation budget (_GROUP_ELEMENTS), each with at
        least one chunk (`width` elements): where a chunk alone fills it, one group at a time."""
        n = self.threads if self.threads > 0 else len(os.sched_getaffinity(0))
        serial_observer = self.observer is not None and not isinstance(self.observer, GroupObserver)
        if n <= 1 or serial_observer or n_chunks < n:
            return 1
        n = min(n, _GROUP_ELEMENTS // max(1, width))
        return n if n > 1 else 1

    def _run(
        self,
        g: GGUFFile,
        tokens: np.ndarray,
        on_logits: Callable[[int, np.ndarray], None] | None,
        keep: slice | None,
        rows: slice | None,
        pool: ThreadPoolExecutor | None,
        workers: int,
        width: int,
    ) -> None:
        n_chunks, n_ctx = tokens.shape
        h = self._embed(g, tokens)  # (n_chunks, n_ctx, n_embd)
        ff = self._vector(g, "rope_freqs.weight") if g.has_tensor("rope_freqs.weight") else None
        cos, sin = self._rope_cache(n_ctx, ff)
        # chunks per group: the widest activation (gate and up, or the fused qkv) of the groups in
        # flight stays ~32 MiB; with worker threads, a multiple of their number of groups of about
        # equal size
        n_groups = -(-n_chunks // max(1, _GROUP_ELEMENTS // (workers * width)))
        n_groups = min(n_chunks, -(-n_groups // workers) * workers)
        bounds = np.linspace(0, n_chunks, n_groups + 1).round().astype(int)
        groups = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        last = self.hp.n_layer - 1
        if keep is not None:
            hk = np.empty((n_chunks, keep.stop - keep.start, h.shape[2]), dtype=np.float32)
        grouped = self.observer if isinstance(self.observer, GroupObserver) else None
        for il in range(self.hp.n_layer):
            lw = self._layer(g, il, pool)
            cut = keep if il == last else None
            dst = h if cut is None else hk

            def block(i: int, lw: LayerWeights = lw, cut: slice | None = cut, dst: np.ndarray = dst) -> None:
                if grouped is not None:
                    grouped.begin_group(i, len(groups))
                gr = groups[i]
                dst[gr] = self._block(lw, h[gr], cos, sin, cut)

            if pool is None:
                for i in range(len(groups)):
                    block(i)
            else:
                list(pool.map(block, range(len(groups))))
            del lw
        if on_logits is None:
            return
        if keep is not None:
            h = hk
            rows = None  # h holds only the kept positions now
        norm, out = self._output(g, pool, workers)

        def logits(c: int) -> np.ndarray:
            if grouped is not None:  # the output matmul: one group per chunk
                grouped.begin_group(c, n_chunks)
            return out(self._rms_norm(h[c] if rows is None else h[c][rows], norm), self.emulate)

        if pool is None:
            for c in range(n_chunks):
                on_logits(c, logits(c))
            return
        # each worker computes a chunk's logits; the callbacks still run one at a time, in chunk
        # order (a worker waits for the previous chunk's), overlapping the other worker's GEMM
        done = [threading.Event() for _ in range(n_chunks)]
        failed = threading.Event()

        def head(c: int) -> None:
            try:
                lg = logits(c) if not failed.is_set() else None
                if c:
                    done[c - 1].wait()
                if lg is not None and not failed.is_set():
                    on_logits(c, lg)
            except BaseException:
                failed.set()
                raise
            finally:
                done[c].set()

        list(pool.map(head, range(n_chunks)))

    def _widest(self, g: GGUFFile) -> int:
        """The widest activation row of a block: 2·n_ff (gate and up fused), the (fused) qkv width or n_embd."""
        t = g.tensor("blk.0.ffn_up.weight") if g.has_tensor("blk.0.ffn_up.weight") else None
        n_ff = t.ne[1] if t is not None else 0
        hp = self.hp
        return max(2 * n_ff, hp.n_embd, (hp.n_head + 2 * hp.n_head_kv) * hp.head_dim_k)


def _read_f32(g: GGUFFile, t: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """kernels.read_f32 through dequant.dequantize_tensor (whole-tensor numpy, not 16 rows a call),
    into `out` when given."""
    return dequantize_tensor(g.read_raw(t), t.type, t.shape, out)


# activation elements per chunk group (see Engine.run): 8 Mi floats, 32 MiB per temporary
_GROUP_ELEMENTS = 1 << 23


def logits_for(model_path: Path | str, tokens: np.ndarray, adapters: Sequence[tuple[Path | str, float]] = (), **kw) -> np.ndarray:
    """All chunks' logits as one array (n_chunks, n_ctx, n_vocab): for tests and small inputs."""
    eng = Engine(model_path, adapters, **kw)
    tokens = np.asarray(tokens)
    out = np.empty((*tokens.shape, eng.n_vocab), dtype=np.float32)

    def keep(i: int, lg: np.ndarray) -> None:
        out[i] = lg

    eng.run(tokens, keep)
    return out


__all__ = [
    "Engine",
    "GroupObserver",
    "HParams",
    "chunk_tokens",
    "logits_for",
    "retain_freed_memory",
    "round_activations",
    "round_f16",
    "set_blas_threads",
    "vec_dot_kind",
]
