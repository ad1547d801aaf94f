"""The compare engine `llama.cpp`: the same `run(tokens, on_logits, rows)` as the numpy Engine, with
the logits computed by llama.cpp itself through llama-cpp-python (the optional extra
`loraq[llama-cpp]`), on whatever backend that build has: CPU, CUDA, Metal, Vulkan…

It is what a user with a 7B–70B model picks: llama.cpp's kernels (and GPU offload, every layer
when the build has one) instead of loraq's float32 numpy pass. The metrics downstream are the
same code, fed the same tokens, so the two engines' reports differ only by the logits.

What makes the logits comparable with the numpy engine and with llama-perplexity (§8.1):
* one chunk per llama_decode, from position 0 with an empty KV cache (llama_memory_clear), on a
  context of exactly n_ctx = the chunk size, n_batch = n_ubatch = n_ctx, so the whole chunk is one
  graph as in the numpy engine; the caller has already put BOS in each chunk's first slot
  (`chunk_tokens`), as llama-perplexity does;
* logits requested (llama_batch.logits flags) only for the positions `rows` asks for: llama.cpp
  then runs the output projection on those rows alone, as the numpy engine does;
* KV cache F32 by default (type_k = type_v = GGML_TYPE_F32), the numpy engine's default; "f16"
  is llama.cpp's own default;
* no weight repacking (model params use_extra_bufts = false, llama-cli's --no-repack): repacked
  Q4_0/Q4_K layouts sum dot products in another order, which moved a Q4_0 KLD by 0.0025 against
  the plain CPU path the numpy engine follows (tests/test_interop_compare.py);
* flash attention off on a CPU-only build (the numpy engine follows soft_max_ext); with GPU
  offload llama.cpp decides (auto), as llama-perplexity does;
* runtime LoRA through llama_adapter_lora_init + llama_set_adapters_lora with the user scale
  (llama.cpp applies alpha/rank itself, docs/llama-cpp.md §3.2). A PEFT folder is first converted
  to a temporary F32 GGUF LoRA, so nothing is rounded on the way.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..atomic import scratch_dir
from ..cpus import available_cpus
from ..errors import BadArguments, BadInput, LoraqError
from ..gguf_io import open_gguf
from ..merge.lora_file import load_adapter

ENGINES = ("numpy", "llama.cpp")
INSTALL_HINT = "pip install 'loraq[llama-cpp]'"
_KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
_GRAPH_LORA = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# llama.cpp's log lines (ERROR level) kept for the one-line messages below; everything else dropped.
_errors: deque[str] = deque(maxlen=8)
_log_callback: Any = None  # the ctypes callback must stay referenced while llama.cpp may call it


def load_llama_cpp() -> ModuleType:
    """llama_cpp.llama_cpp (the C API), or BadArguments naming the extra to install."""
    global _log_callback
    try:
        import llama_cpp.llama_cpp as lib
    except (ImportError, OSError, RuntimeError) as exc:  # missing, or its shared library would not load
        why = "is not installed" if isinstance(exc, ImportError) else f"would not load ({str(exc).splitlines()[0][:120]})"
        raise BadArguments(f"compare engine 'llama.cpp' needs llama-cpp-python, which {why}: {INSTALL_HINT}") from None
    if _log_callback is None:

        @lib.llama_log_callback
        def keep_errors(level: int, text: bytes, _user: Any) -> None:
            if level == 3 and text:  # GGML_LOG_LEVEL_ERROR
                _errors.append(text.decode("utf-8", "replace").strip())

        _log_callback = keep_errors
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lib.llama_backend_init()
    return lib


def _last_error() -> str:
    return f": {_errors[-1]}" if _errors else ""


def check_adapter_targets(model: Path, adapter: Path) -> None:
    """Refuse what llama.cpp would abort on or silently ignore, as the numpy engine does: an adapter
    that is malformed for this model (load_adapter: metadata typed as llama.cpp's getters assert
    them, shapes, NaN), a LoRA on token_embd of a tied model (llama.cpp would also apply it to the
    output projection and assert, docs/llama-cpp.md §3.3), or on a tensor its graph does not
    multiply through build_lora_mm."""
    with open_gguf(model) as g:
        tied = not g.has_tensor("output.weight")
        names = {t.name for t in g.tensors}
        targets = set(load_adapter(adapter, g).pairs)
    used = {"token_embd.weight", "output.weight"} | {n for n in names if n.startswith("blk.") and n.split(".")[2] in _GRAPH_LORA}
    for name in sorted(targets):
        if name == "token_embd.weight" and tied:
            raise BadInput(
                f"{adapter}: LoRA on token_embd.weight of a model with tied embeddings; llama.cpp would also apply it to "
                "the output projection and abort (docs/llama-cpp.md §3.3): merge it instead (loraq merge)"
            )
        if name in names and name not in used:
            raise BadInput(
                f"{adapter}: LoRA on {name}, which llama.cpp's graph does not apply at runtime "
                "(it would be silently without effect): merge it instead (loraq merge)"
            )


class LlamaCppEngine:
    """Logits of any GGUF model llama.cpp loads, optionally with runtime LoRA adapters.

    engine = LlamaCppEngine("model.gguf", adapters=[("adapter.gguf", 1.0)], threads=2)
    engine.run(tokens_int32_of_shape_(n_chunks, n_ctx), lambda i, logits: ...)
    """

    def __init__(
        self,
        model_path: Path | str,
        adapters: Sequence[tuple[Path | str, float]] = (),
        threads: int = 0,
        kv_type: str = "f32",
        repack: bool = False,
    ):
        if kv_type not in _KV_TYPES:
            raise BadArguments(f"kv_type must be 'f32' or 'f16', got {kv_type!r}")
        self.lib = lib = load_llama_cpp()
        self.path = Path(model_path)
        self.kv_type = kv_type
        self.threads = threads if threads > 0 else available_cpus()
        self.gpu = bool(lib.llama_supports_gpu_offload())
        self._ctx: Any = None
        self._n_ctx = 0
        self._adapters: list[tuple[Any, float]] = []
        params = lib.llama_model_default_params()
        params.use_extra_bufts = repack  # n_gpu_layers stays at its default: every layer, where a GPU is
        _errors.clear()
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise BadInput(f"{self.path}: llama.cpp could not load this model{_last_error()}")
        try:
            self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
            for path, scale in adapters:
                self._adapters.append((self._load_adapter(Path(path)), float(scale)))
        except BaseException:
            self.close()
            raise

    def _load_adapter(self, path: Path) -> Any:
        if not path.is_dir():
            return self._init_adapter(path, path)
        # A PEFT folder: llama.cpp reads GGUF LoRA only. The scratch folder goes as soon as llama.cpp
        # has read the tensors (pid-named: a kill -9 leaves it to the leftover sweep).
        from ..convert import convert_adapter

        with scratch_dir() as tmp:
            gguf = tmp / "adapter-f32.gguf"
            convert_adapter(path, self.path, gguf, outtype="f32")
            return self._init_adapter(gguf, path)

    def _init_adapter(self, gguf: Path, shown: Path) -> Any:
        check_adapter_targets(self.path, gguf)
        _errors.clear()
        ad = self.lib.llama_adapter_lora_init(self._model, str(gguf).encode())
        if not ad:
            raise BadInput(f"{shown}: llama.cpp could not load this LoRA adapter for {self.path.name}{_last_error()}")
        return ad

    def _context(self, n_ctx: int) -> Any:
        """A context for chunks of n_ctx tokens (made again only when n_ctx changes)."""
        lib = self.lib
        if self._ctx is not None and self._n_ctx == n_ctx:
            return self._ctx
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.type_k = cp.type_v = _KV_TYPES[self.kv_type]
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO if self.gpu else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        _errors.clear()
        ctx = lib.llama_init_from_model(self._model, cp)
        if not ctx:
            raise LoraqError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens{_last_error()}")
        if self._adapters:
            arr = (lib.llama_adapter_lora_p_ctypes * len(self._adapters))(*(a for a, _ in self._adapters))
            scales = (ctypes.c_float * len(self._adapters))(*(s for _, s in self._adapters))
            if lib.llama_set_adapters_lora(ctx, arr, len(self._adapters), scales) != 0:
                lib.llama_free(ctx)
                raise LoraqError(f"{self.path}: llama.cpp refused the LoRA adapters{_last_error()}")
        self._ctx, self._n_ctx = ctx, n_ctx
        return ctx

    def run(self, tokens: np.ndarray, on_logits: Callable[[int, np.ndarray], None], rows: slice | None = None) -> None:
        """Evaluate each row of `tokens` (n_chunks, n_ctx) independently from position 0 and call
        on_logits(chunk_index, logits float32 (n_ctx, n_vocab), or only the positions `rows`)."""
        lib = self.lib
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise BadArguments(f"tokens must be an integer array of shape (n_chunks, n_ctx), got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.n_vocab):
            raise BadInput(f"token ids must lie in [0, {self.n_vocab}); got {tokens.min()}..{tokens.max()}")
        n_chunks, n_ctx = tokens.shape
        want = np.zeros(n_ctx, dtype=np.int8)
        want[np.arange(n_ctx)[rows if rows is not None else slice(None)]] = 1
        n_out = int(want.sum())
        ctx = self._context(n_ctx)
        batch = lib.llama_batch_init(n_ctx, 0, 1)
        try:
            batch.n_tokens = n_ctx
            np.ctypeslib.as_array(batch.pos, shape=(n_ctx,))[:] = np.arange(n_ctx, dtype=np.int32)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n_ctx,))[:] = 1
            for i in range(n_ctx):
                batch.seq_id[i][0] = 0
            np.ctypeslib.as_array(batch.logits, shape=(n_ctx,))[:] = want
            tok = np.ctypeslib.as_array(batch.token, shape=(n_ctx,))
            for c in range(n_chunks):
                lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                tok[:] = tokens[c]
                _errors.clear()
                rc = lib.llama_decode(ctx, batch)
                if rc != 0:
                    raise LoraqError(f"{self.path}: llama_decode failed (code {rc}) on chunk {c}{_last_error()}")
                ptr = lib.llama_get_logits(ctx)
                on_logits(c, np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        finally:
            lib.llama_batch_free(batch)

    def close(self) -> None:
        """Free the context, adapters and model (also done when the engine is garbage-collected)."""
        lib = self.lib
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        for ad, _ in self._adapters:
            lib.llama_adapter_lora_free(ad)
        self._adapters = []
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_engine(
    engine: str, model_path: Path | str, adapters: Sequence[tuple[Path | str, float]] = (), threads: int = 0, kv_type: str = "f32"
) -> Any:
    """The compare engine named by `compare.engine` / `--engine`; both have `.n_vocab` and `.run`."""
    if engine == "numpy":
        from .engine import Engine

        return Engine(model_path, adapters=adapters, threads=threads, kv_type=kv_type)
    if engine == "llama.cpp":
        return LlamaCppEngine(model_path, adapters=adapters, threads=threads, kv_type=kv_type)
    raise BadArguments(f"unknown compare engine {engine!r}; choose one of: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "INSTALL_HINT", "LlamaCppEngine", "check_adapter_targets", "load_llama_cpp", "make_engine"]
