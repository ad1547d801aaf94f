"""Row quantizers and dequantizers for ggml block types.

`quantize(rows, qtype, imatrix)` takes float32 rows of shape (n_rows, n_per_row) and returns the
blocks as uint8 of shape (n_rows, row_bytes), byte-identical to ggml's `ggml_quantize_chunk`
(reference §5). The per-type kernels live in their own modules and register here; the K types
slot in the same way."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import BadArguments
from ..ggml_types import GGMLType, ggml_type
from ..gguf_io import GGUFFile, TensorInfo

# qtype name -> fn(rows float32 (n, k), imatrix float32 (k,) | None) -> uint8 (n, row_bytes);
# `quantize` has already checked both shapes.
Quantizer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
QUANTIZERS: dict[str, Quantizer] = {}


def register(name: str) -> Callable[[Quantizer], Quantizer]:
    def deco(fn: Quantizer) -> Quantizer:
        QUANTIZERS[name] = fn
        return fn

    return deco


def can_quantize(qtype: GGMLType | str) -> bool:
    return ggml_type(qtype).name in QUANTIZERS


def quantize(rows: np.ndarray, qtype: GGMLType | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    t = ggml_type(qtype)
    fn = QUANTIZERS.get(t.name)
    if fn is None:
        raise BadArguments(f"loraq cannot quantize to {t.name} yet")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % t.block:
        raise ValueError(f"{t.name} needs 2-D rows whose length is a multiple of {t.block}, got {rows.shape}")
    if imatrix is not None:  # kernels receive a contiguous float32 vector of one weight per column
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != rows.shape[1]:
            raise ValueError(f"imatrix has {imatrix.shape[0]} values, rows have {rows.shape[1]}")
    return fn(rows, imatrix)


def dequantize(raw: np.ndarray, qtype: GGMLType | str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored bytes -> float32 array of numpy `shape` (…, ne[0]); exact, as ggml's to_float."""
    t = ggml_type(qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if t.name == "f32":
        return raw.view(np.float32).reshape(shape)
    if t.name == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if t.name == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    flat = raw.reshape(-1, t.row_bytes(shape[-1]))
    return gguf_dequantize(flat, GGMLQuantizationType(t.id)).astype(np.float32, copy=False).reshape(shape)


def read_f32(f: GGUFFile, t: TensorInfo) -> np.ndarray:
    """A tensor of an open GGUF dequantized to float32, numpy shape (…, ne[0])."""
    return dequantize(f.read_raw(t), t.type, t.shape)


# Register the kernels (import for side effects).
from . import fp as _fp  # noqa: E402,F401
from . import iquants as _iquants  # noqa: E402,F401
from . import kquants as _kquants  # noqa: E402,F401
from . import legacy as _legacy  # noqa: E402,F401
from . import ternary as _ternary  # noqa: E402,F401
