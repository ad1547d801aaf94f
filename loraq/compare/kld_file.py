"""llama-perplexity's `--kl-divergence-base` file (docs/llama-cpp.md §8.2), byte for byte.

The reference model's log-probabilities are stored once, uint16-coded, for the scored positions
of every chunk (the second half: `first = n_ctx/2 … n_ctx−2`, each predicting the next token).
Candidates are then scored chunk by chunk against the memory-mapped file, so no stage holds all
logits. A file written here is accepted by `llama-perplexity --kl-divergence-base FILE
--kl-divergence`, and a file written by llama-perplexity can be read here.

Layout (little endian): "_logits_", u32 n_ctx, i32 n_vocab, i32 n_chunk, i32 tokens[n_chunk·n_ctx],
then per chunk `n_ctx − 1 − n_ctx/2` records of `nv = 2·((n_vocab+1)/2) + 4` u16: f32 scale,
f32 min_log_prob, n_vocab codes, one zero pad when n_vocab is odd.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, io_error
from ..errors import BadInput

MAGIC = b"_logits_"
HEADER_BYTES = 20  # magic, n_ctx, n_vocab, n_chunk

# Rows encoded or scored at once: bounds the float temporaries to a few MB whatever the vocab.
_BLOCK_ELEMENTS = 1 << 20


def first_scored(n_ctx: int) -> int:
    """Index of the first scored position in a chunk (n_ctx/2)."""
    return n_ctx // 2


def n_scored(n_ctx: int) -> int:
    """Scored positions per chunk: first … n_ctx−2, each predicting the next token."""
    return n_ctx - 1 - n_ctx // 2


def record_u16(n_vocab: int) -> int:
    """uint16 values per scored position: scale and min_log_prob (2 each), codes, odd-vocab pad."""
    return 2 * ((n_vocab + 1) // 2) + 4


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Exact size in bytes of a base-logits file (§8.2)."""
    return HEADER_BYTES + 4 * n_ctx * n_chunk + n_chunk * n_scored(n_ctx) * record_u16(n_vocab) * 2


def block_rows(n_vocab: int, elements: int = _BLOCK_ELEMENTS) -> int:
    """Rows of n_vocab values in a block of about `elements` (at least one row)."""
    return max(1, elements // max(1, n_vocab))


def scored_rows(logits: np.ndarray, n_ctx: int, n_vocab: int, what: str = "logits") -> np.ndarray:
    """The scored rows of one chunk's logits as float32 (n_scored, n_vocab).

    Accepts the whole chunk (n_ctx rows) or only the scored rows; rejects NaN/Inf (exit 4)."""
    a = np.asarray(logits)
    ns = n_scored(n_ctx)
    if a.ndim != 2 or a.shape[1] != n_vocab or a.shape[0] not in (n_ctx, ns):
        raise BadInput(
            f"{what}: expected shape ({n_ctx}, {n_vocab}) (or ({ns}, {n_vocab}) scored rows), got {a.shape}; "
            "the model's vocabulary or context does not match the reference"
        )
    if a.shape[0] == n_ctx:
        a = a[first_scored(n_ctx) : n_ctx - 1]
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise BadInput(f"{what}: NaN or Inf in the logits; the model file is probably corrupt")
    return a


def encode_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint16-code float32 logits rows (P, V) as llama-perplexity's `log_softmax` does.

    Returns (scale f32 (P,), min_log_prob f32 (P,), codes u16 (P, V)). The arithmetic follows the
    C code in float32: `min_logit = max(min, max − 16)`, `Σ expf(x − max)` summed in double left to
    right, `lse = (float) log(sum)`, `scale = (max − min_logit)/65535`, codes
    `nearest_int((1/scale)·(x − min_logit))` (round half to even) where `x > min_logit`, else 0."""
    x = np.asarray(x, dtype=np.float32)
    mx = x.max(axis=1)
    mn = np.maximum(x.min(axis=1), mx - np.float32(16))
    d = x - mx[:, None]
    # expf, then a double sum in index order (cumsum is sequential; np.sum would be pairwise).
    e = np.exp(d.astype(np.float64)).astype(np.float32).astype(np.float64)
    sum_exp = np.cumsum(e, axis=1)[:, -1]
    lse = np.log(sum_exp).astype(np.float32)
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / np.float32(65535)
    codes = np.zeros(x.shape, dtype=np.uint16)
    nz = scale != 0
    if nz.any():
        inv = np.float32(1) / scale[nz]
        xs = x[nz]
        q = np.rint(inv[:, None] * (xs - mn[nz][:, None]))  # float32 product, half-even like nearest_int
        q = np.where(xs > mn[nz][:, None], q, np.float32(0))
        codes[nz] = q.astype(np.int64).astype(np.uint16)  # C's int → uint16_t conversion wraps
    return scale.astype(np.float32), min_log_prob.astype(np.float32), codes


def decode_rows(scale: np.ndarray, min_log_prob: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Decoded base log-probs, float32 (P, V): `scale·code + min_log_prob` (float32, no FMA)."""
    s = np.asarray(scale, dtype=np.float32)[:, None]
    m = np.asarray(min_log_prob, dtype=np.float32)[:, None]
    return s * codes.astype(np.float32) + m


class ReferenceWriter:
    """Writes a base-logits file chunk by chunk; it appears under `path` only when complete.

    `tokens` are the evaluation tokens, (n_chunk, n_ctx) or flat with n_chunk·n_ctx entries, as
    they are in the text (without llama-perplexity's BOS substitution at each chunk start). Feed
    every chunk's logits (n_ctx, n_vocab) with `add_chunk(i, logits)` in any order, then `close()`
    (or leave the `with` block): the file is renamed into place. An exception inside the `with`
    block, or `abort()`, removes the temporary file and leaves any previous file untouched."""

    def __init__(self, path: Path | str, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        if n_ctx < 4 or n_vocab < 1:
            raise ValueError(f"n_ctx must be >= 4 and n_vocab >= 1 (got {n_ctx}, {n_vocab})")
        tok = np.asarray(tokens)
        if tok.size == 0 or tok.size % n_ctx:
            raise ValueError(f"{tok.size} tokens is not a positive multiple of n_ctx={n_ctx}")
        tok = tok.reshape(-1, n_ctx).astype("<i4")
        if tok.min() < 0 or tok.max() >= n_vocab:
            raise BadInput(f"token ids outside the vocabulary [0, {n_vocab}); tokenizer and model do not match")
        self.path = Path(path)
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, tok.shape[0]
        self.tokens = tok
        self._done = np.zeros(self.n_chunk, dtype=bool)
        self._chunk_bytes = n_scored(n_ctx) * record_u16(n_vocab) * 2
        self._data_offset = HEADER_BYTES + 4 * tok.size
        self._f = None
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_output(self.path))
        try:
            self._f = open(self._tmp, "wb")  # noqa: SIM115 -- held across add_chunk calls
            self._f.write(MAGIC + struct.pack("<Iii", n_ctx, n_vocab, self.n_chunk))
            self._f.write(tok.tobytes())
        except OSError as exc:
            self.abort()
            raise io_error(exc, self.path, "write") from exc

    def add_chunk(self, i: int, logits: np.ndarray) -> None:
        """Encode chunk `i`'s scored positions and write them at their place in the file."""
        if self._f is None:
            raise ValueError("ReferenceWriter is closed")
        if not 0 <= i < self.n_chunk:
            raise ValueError(f"chunk {i} out of range [0, {self.n_chunk})")
        if self._done[i]:
            raise ValueError(f"chunk {i} was already written")
        x = scored_rows(logits, self.n_ctx, self.n_vocab, f"reference logits, chunk {i}")
        V, nv = self.n_vocab, record_u16(self.n_vocab)
        out = np.zeros((x.shape[0], nv), dtype="<u2")
        step = block_rows(V)
        for r in range(0, x.shape[0], step):
            scale, mlp, codes = encode_rows(x[r : r + step])
            head = np.stack([scale, mlp], axis=1).astype("<f4")
            out[r : r + step, :4] = head.view("<u2")
            out[r : r + step, 4 : 4 + V] = codes
        try:
            self._f.seek(self._data_offset + i * self._chunk_bytes)
            self._f.write(out.tobytes())
        except OSError as exc:
            self.abort()
            raise io_error(exc, self.path, "write") from exc
        self._done[i] = True

    @property
    def missing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._done)]

    def close(self) -> Path:
        """Finish the file and rename it into place; every chunk must have been added."""
        if self._f is None:
            return self.path
        if not self._done.all():
            missing = self.missing
            self.abort()
            raise ValueError(f"reference file incomplete: chunks {missing[:8]} were never added")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as exc:
            self.abort()
            raise io_error(exc, self.path, "write") from exc
        self._f = None
        self._stack.close()
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; a previous file at `path` stays as it was."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None
        # Leaving the atomic_output block through an exception removes the temporary file.
        with contextlib.suppress(_Abort):
            self._stack.__exit__(_Abort, _Abort(), None)

    def __enter__(self) -> ReferenceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Abort(Exception):
    pass


class ReferenceFile:
    """A base-logits file, memory-mapped; chunk records are read lazily.

    Raises BadInput (exit 4) for a file that is not a base-logits file or whose size does not match
    its header (truncated or corrupt)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 -- closed by the `with fh` below
        except OSError as exc:
            raise io_error(exc, self.path, "read") from exc
        with fh:
            head = fh.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES or head[:8] != MAGIC:
                raise BadInput(f"{self.path}: not a llama-perplexity KL-divergence base file (no '_logits_' header)")
            n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:])
            size = os.fstat(fh.fileno()).st_size
            if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
                raise BadInput(f"{self.path}: bad header (n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
            want = file_size(n_ctx, n_vocab, n_chunk)
            if size != want:
                raise BadInput(
                    f"{self.path}: {size} bytes, but its header (n_ctx={n_ctx}, n_vocab={n_vocab}, "
                    f"n_chunk={n_chunk}) needs {want}; the file is truncated or corrupt, recreate it"
                )
            self._mm: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.n_ctx, self.n_vocab, self.n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
        self.first = first_scored(self.n_ctx)
        self.n_scored = n_scored(self.n_ctx)
        self.record_u16 = record_u16(self.n_vocab)
        ntok = self.n_chunk * self.n_ctx
        self.tokens = np.frombuffer(self._mm, dtype="<i4", count=ntok, offset=HEADER_BYTES).reshape(self.n_chunk, self.n_ctx)
        self._records = np.frombuffer(self._mm, dtype="<u2", offset=HEADER_BYTES + 4 * ntok).reshape(
            self.n_chunk, self.n_scored, self.record_u16
        )

    def targets(self, i: int) -> np.ndarray:
        """The tokens the scored positions of chunk i predict: tokens[i, first+1 … n_ctx−1]."""
        return np.asarray(self.tokens[i, self.first + 1 :], dtype=np.int64)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale f32 (P,), min_log_prob f32 (P,), codes u16 (P, n_vocab)) of chunk i.

        The codes are a read-only view of the mapped file."""
        if not 0 <= i < self.n_chunk:
            raise IndexError(f"chunk {i} out of range [0, {self.n_chunk})")
        rec = self._records[i]
        head = np.ascontiguousarray(rec[:, :4]).view("<f4")
        return head[:, 0].astype(np.float32), head[:, 1].astype(np.float32), rec[:, 4 : 4 + self.n_vocab]

    def decoded(self, i: int) -> np.ndarray:
        """Decoded base log-probs of chunk i, float32 (P, n_vocab)."""
        return decode_rows(*self.chunk(i))

    def close(self) -> None:
        if self._mm is not None:
            del self.tokens, self._records  # drop the views before unmapping
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> ReferenceFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
