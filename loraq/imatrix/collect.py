"""Importance-matrix collection: llama-imatrix's statistics from loraq's numpy engine.

What llama-imatrix collects (tools/imatrix/imatrix.cpp; docs: shared reference §6.1), and how
loraq matches it:

* Which matrices: every mul_mat whose weight's name starts with `blk.`, plus `output.weight` with
  `process_output`. The engine's observer reports each weight matmul's F32 input (before the
  conversion to the weight's vec_dot type, as the eval callback sees src1). q, k and v (and gate
  and up) read the same input and are separate matmuls, so each gets its own, equal, entry; a fused
  `attn_qkv` is one entry. Runtime LoRA adapters add `<W>.lora_a` (input x) and `<W>.lora_b`
  (input A·x) entries, as llama.cpp's adapter tensors carry those names. Tied embeddings: the
  output matmul's weight is `token_embd.weight`, which llama-imatrix never collects, so
  `process_output` adds nothing there and loraq skips the output projection.
* Which tokens: the text tokenized with BOS when the vocabulary adds one; whole chunks of n_ctx
  tokens; each chunk evaluated on its own from position 0 with its first token replaced by BOS
  (when the vocabulary adds BOS); every position of every chunk counts (llama-imatrix asks for all
  logits, so even the last layer sees every row).
* What: per column j, the sum over rows of x_j² (accumulated here in float64, stored as F32) and
  counts = rows seen. One matrix per dense weight (n_mat = 1).
* MoE (`mul_mat_id`, per-expert slices): loraq's engine refuses MoE models, so there is none.

Differences, on purpose: llama-imatrix drops a micro-batch of fewer than 16 rows (only a chunk
tail of 1-15 tokens past its 512-row ubatch can be that small); loraq counts every row.
llama-imatrix refuses a text of fewer than two chunks; loraq needs one. It also computes the text's perplexity; loraq does
not (the logits are not computed at all unless `process_output` needs the output matmul)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadArguments, BadInput
from ..llama.calibration import calibration_tokens
from ..llama.engine import Engine, chunk_tokens
from ..quantize.imatrix_file import ImatrixData, ImatrixEntry

HIDDEN_BUDGET = 512 << 20  # bytes of hidden states per engine pass; more chunks run in several passes


_SIBLINGS = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "ffn_gate": "ffn_in", "ffn_up": "ffn_in"}


def _input_group(name: str) -> str:
    """blk.3.attn_k.weight(.lora_a) -> blk.3.attn_in: the weights whose matmuls read one input."""
    base = name.removesuffix(".lora_a")
    parts = base.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        return f"blk.{parts[1]}.{_SIBLINGS.get(parts[2], parts[2])}"
    return name


class _Accumulator:
    """The engine's observer (a GroupObserver): Σx² per column and row counts, per weight name.

    The engine's worker threads feed it chunk groups at once. Each group's squares are kept apart
    until every group of the layer has given that weight's input, then added to the total in group
    order, so the sums do not depend on which thread ran which group (only on the grouping, which
    the engine derives from the chunk count and threads). Held at once: one layer's weights' sums
    per group in flight."""

    def __init__(self, process_output: bool, on_rows: Callable[[int], None] | None = None):
        self.process_output = process_output
        self.on_rows = on_rows  # rows through a block's last matmul, for progress
        self.sums: dict[str, np.ndarray] = {}  # float64 (n_col,)
        self.counts: dict[str, int] = {}
        self._parts: dict[str, dict[int, tuple[np.ndarray, int]]] = {}  # name -> group -> (Σx², rows)
        self._lock = threading.Lock()
        self._local = threading.local()  # this thread's group, and its last input's squares

    def begin_group(self, group: int, n_groups: int) -> None:
        self._local.group = (group, n_groups)
        # q/k/v (and gate/up) read one input: its squares are computed once. Reused only for the same
        # array within the same sibling group and chunk group, so recycled buffers cannot mix inputs.
        self._local.last = None

    def wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, name: str, x: np.ndarray) -> None:
        rows = int(np.prod(x.shape[:-1]))
        if self.on_rows is not None and name.endswith(".ffn_down.weight"):  # the last matmul of a block
            self.on_rows(rows)
        if not self.wanted(name):
            return
        group, n_groups = getattr(self._local, "group", (0, 1))  # the output matmul runs outside groups
        sibling = _input_group(name)
        last = getattr(self._local, "last", None)
        if last is not None and last[0] == sibling and last[1] is x:
            sq = last[2]
        else:
            x2 = x.reshape(-1, x.shape[-1])
            sq = np.einsum("ij,ij->j", x2, x2, dtype=np.float64)
            if not np.isfinite(sq).all():  # llama-imatrix aborts too: such statistics would poison quantization
                raise BadInput(f"non-finite activations at the input of {name}: the model or adapter overflows on this text")
            self._local.last = (sibling, x, sq)
        with self._lock:
            parts = self._parts.setdefault(name, {})
            parts[group] = (sq, rows)
            if len(parts) < n_groups:
                return
            del self._parts[name]
            for g in sorted(parts):
                self._add(name, *parts[g])

    def _add(self, name: str, sq: np.ndarray, rows: int) -> None:
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = sq.copy()
            self.counts[name] = 0
        elif acc.shape != sq.shape:
            raise BadInput(f"{name}: inputs of {acc.shape[0]} and {sq.shape[0]} columns")
        else:
            acc += sq
        self.counts[name] += rows

    def end_pass(self) -> None:
        """After an engine run: every group has been folded in; forget the threads' state."""
        if self._parts:  # a run that stopped early (an exception) leaves parts; it is not reused then
            raise RuntimeError(f"imatrix: groups missing for {sorted(self._parts)[:3]}")
        self._local = threading.local()


@dataclass
class CollectResult:
    data: ImatrixData
    text_tokens: int  # tokens in the calibration text
    tokens: int  # tokens evaluated (chunks · ctx)
    kind: str  # "text" or "chat"


def collect_imatrix(
    model: Path | str,
    text: Path | str,
    ctx: int = 512,
    chunks: int | None = None,
    adapters: Sequence[tuple[Path | str, float]] = (),
    process_output: bool = False,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    dataset: str | None = None,
) -> CollectResult:
    """Run `model` (+ runtime adapters) over the calibration text and return llama-imatrix's
    statistics. `progress(done, total)` counts chunks through layers (chunks × layers); `dataset` is the
    name recorded in imatrix.datasets (default: the text's path as given)."""
    if ctx < 1:
        raise BadArguments(f"ctx must be at least 1, got {ctx}")
    if chunks is not None and chunks < 1:
        raise BadArguments(f"chunks must be at least 1, got {chunks}")
    cal = calibration_tokens(model, text, None if chunks is None else chunks * ctx + 1)
    if len(cal.tokens) < ctx:
        raise BadArguments(f"{text} has {len(cal.tokens)} tokens, fewer than one chunk of ctx={ctx}; give more text or a smaller ctx")
    batch = chunk_tokens(cal.tokens, ctx, chunks, bos=cal.bos)
    eng = Engine(model, adapters=list(adapters), threads=threads)
    n_chunks = len(batch)
    total = n_chunks * eng.hp.n_layer
    rows_done = 0
    lock = threading.Lock()

    def tick(rows: int) -> None:  # from the engine's worker threads: a group's rows left a block
        nonlocal rows_done
        with lock:
            rows_done += rows
            if progress is not None:
                progress(rows_done // ctx, total)

    acc = _Accumulator(process_output, tick)
    eng.observer = acc
    # only an untied output.weight is collected; its logits themselves are not needed
    on_logits = (lambda i, lg: None) if process_output and not eng.tied else None
    group = max(1, HIDDEN_BUDGET // (ctx * eng.hp.n_embd * 4))
    for c0 in range(0, n_chunks, group):
        eng.run(batch[c0 : c0 + group], on_logits)
        acc.end_pass()
    entries = {
        name: ImatrixEntry(sums=acc.sums[name].astype(np.float32)[None, :], counts=np.array([acc.counts[name]], dtype=np.float32))
        for name in sorted(acc.sums)
    }
    data = ImatrixData(entries=entries, chunk_count=n_chunks, chunk_size=ctx, datasets=[dataset if dataset is not None else str(text)])
    return CollectResult(data, len(cal.tokens), n_chunks * ctx, cal.kind)


__all__ = ["CollectResult", "collect_imatrix"]
