"""Float storage conversions (f32, f16, bf16), bit-exact with ggml, plus single-rounding float64
conversions for values computed in float64 (docs/llama-cpp.md §5.2: GGML_FP32_TO_FP16).

* f16: round to nearest even, overflow -> inf, NaN -> 0x7E00 with the sign kept (ggml's software
  and F16C paths both give a quiet NaN without payload; numpy keeps payload bits, so NaN is
  patched).
* bf16: ggml_compute_fp32_to_bf16: NaN -> (bits >> 16) | 0x40 (forced quiet), else round to
  nearest even on the top 16 bits (overflow rounds into inf naturally).
* f64 -> f16/f32: numpy's float64 casts round once, directly. f64 -> bf16 goes through float32
  with round-to-odd, which makes the second rounding (24 -> 8 significant bits) exact."""

from __future__ import annotations

import numpy as np


def _fix_f16_nan(src: np.ndarray, h: np.ndarray) -> np.ndarray:
    nan = np.isnan(src)
    if nan.any():
        h[nan] = np.where(np.signbit(src[nan]), 0xFE00, 0x7E00).astype(np.uint16)
    return h


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 fp16 bits, as GGML_FP32_TO_FP16."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16).view(np.uint16)
    return _fix_f16_nan(x, h)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bf16 bits, as ggml_fp32_to_bf16 (RNE, NaN forced quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r[nan] = (u[nan] >> np.uint32(16)) | np.uint32(0x40)
    return r.astype(np.uint16)


def f64_to_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32, one round to nearest even (numpy casts directly)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float32)


def f64_to_f16(x: np.ndarray) -> np.ndarray:
    """float64 -> uint16 fp16 bits, rounded once (numpy's double->half cast is direct, not via
    float32); NaN -> 0x7E00 with sign as in to_f16."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16).view(np.uint16)
    return _fix_f16_nan(x, h)


def _round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 bits rounded toward zero, with the lowest bit set when inexact
    ("round to odd"); finite values beyond the float32 range give ±FLT_MAX|1 = ±FLT_MAX."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        back = f.astype(np.float64)
        inexact = (back != x) & ~np.isnan(x)
        bits = f.view(np.uint32).copy()
        # RNE went away from zero: step the magnitude down one ulp (inf -> FLT_MAX too).
        away = inexact & (np.abs(back) > np.abs(x))
    bits[away] -= np.uint32(1)
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def f64_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> uint16 bf16 bits, rounded once to nearest even.

    Round-to-odd to float32 keeps a sticky bit 16 places below bf16's last bit, so the following
    RNE to bf16 sees exactly whether the float64 value was below, at or above the halfway point."""
    x = np.asarray(x, dtype=np.float64)
    return to_bf16(_round_to_odd_f32(x))


# Storage kernels: chunks of single elements (m, 1) -> their bytes (m, 4 or 2); no imatrix.


def f32(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return x.view(np.uint8)


def f16(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return to_f16(x).view(np.uint8)


def bf16(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return to_bf16(x).view(np.uint8)
