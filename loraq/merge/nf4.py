"""QLoRA's base weights: bitsandbytes' NF4 quantize -> dequantize, as the adapter saw them in training.

A QLoRA adapter is trained against W' = dequantize_4bit(quantize_4bit(W)), not against W, so merging
it into W' (merge.base_precision: nf4_roundtrip) can keep more of the fine-tune than merging into
the original weights. This reimplements what bitsandbytes does for
`quantize_4bit(W, quant_type="nf4", blocksize=64, compress_statistics=True)` and `dequantize_4bit`
(bnb_4bit_use_double_quant=True, QLoRA's recipe), read from bitsandbytes' sources
(bitsandbytes/functional.py, backends/default/ops.py, csrc/kernels.cu dQuantizeNF4 / dQuantize):

1. The weight, in the dtype the model was loaded in (`dtype`: bfloat16, QLoRA's usual
   torch_dtype, or float16 / float32), is widened to float32 and flattened row-major (numpy's
   (out, in) order, so a row of a length that is not a multiple of 64 shares a block with the next
   row); blocks of 64 values, the last one possibly shorter.
2. absmax per block = max |x| (float32). Each value is scaled by the float32 reciprocal 1/absmax
   (a block of zeros uses 1/1e-38: its values stay 0) and mapped to the nearest of the 16 NF4 code
   values: the index is the number of code midpoints (float32 (c_i + c_{i+1})/2) strictly below
   the scaled value, i.e. ties go to the lower code, as the CUDA kernel's `x > threshold` tree and
   the CPU backend's torch.bucketize both do.
3. Double quantization of the absmax vector (float32, one per 64-block): offset = its mean; the
   centred values absmax − offset are quantized in blocks of 256 with bitsandbytes' signed dynamic
   8-bit map (create_dynamic_map(signed=True): 256 sorted values, a dynamic exponent and fraction),
   each block scaled by its own absmax2 = max |·| (float32, reciprocal then multiply) and rounded to
   the nearest map value (float32 midpoints; a tie goes to the lower value).
4. Dequantization: absmax' = map[q2]·absmax2 + offset (float32), then W' = NF4[q]·absmax' in
   float32, rounded to `dtype` (round to nearest even).

Where bitsandbytes' backends differ from each other at the last bit: the mean is computed here in
float64 and rounded once to float32 (torch's float32 reductions differ in order per device; on the
SmolLM2 tensors tested this equals torch's CPU mean, elsewhere it is within 2 float32 ulps); a
trailing partial 64-block is scaled by the reciprocal like every other block, as the CUDA kernel
does (the CPU backend divides); and the absmax codes are the exact nearest, as the CUDA kernel's
binary search gives, while the CPU backend's 8-bit quantizer (csrc/cpu_ops.cpp, since 0.50) looks
them up in a 65536-entry table, which picks the farther neighbour for about 0.3 % of the absmax
values of SmolLM2 (one step of the 8-bit map). `cpu_lut=True` reproduces that table, and with it
the roundtrip equals bitsandbytes 0.50.2's CPU backend bit for bit (tests/test_nf4.py)."""

from __future__ import annotations

import numpy as np

from ..errors import BadArguments

BLOCK = 64  # NF4 block (QLoRA's bnb_4bit blocksize)
BLOCK2 = 256  # the absmax vector's 8-bit block
DTYPES = ("bf16", "f16", "f32")

# The 16 NormalFloat4 values of QLoRA (Dettmers et al. 2023, Appendix E), as bitsandbytes stores
# them: float32, sorted, exactly -1, 0 and 1 included.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)): for exponent e = 0..6, 2^e fraction values — the midpoints of 2^e + 1 points
    evenly spaced on [0.1, 1] — times 10^(e-6), with both signs; plus 0 and 1; sorted. The points
    are torch.linspace's float32 values, the midpoints float32, the product by 10^(e-6) rounded to
    float32 (tests/test_nf4.py compares the map with bitsandbytes' own)."""
    vals: list[np.ndarray] = []
    for e in range(7):
        n = 2**e + 1
        pts = _linspace_f32(0.1, 1.0, n)
        means = (pts[:-1] + pts[1:]) / np.float32(2)
        scaled = (np.float32(10.0 ** (e - 6)) * means).astype(np.float32)
        vals += [scaled, -scaled]
    out = np.concatenate([*vals, np.array([0.0, 1.0], dtype=np.float32)])
    return np.sort(out).astype(np.float32)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) as the CPU computes it: step = (end −
    start)/(steps − 1) in float32; the first half start + step·i, the second half end − step·(steps−1−i),
    each a fused multiply-add (one rounding; float64 holds the exact product and sum here)."""
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    return np.where(i < half, np.float64(s) + step * i, np.float64(e) - step * (steps - 1 - i)).astype(np.float32)


def _nearest(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value (sorted `code`), ties to the lower one."""
    mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    return np.searchsorted(mids, x, side="left").astype(np.uint8)


def _lut_nearest(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU 8-bit lookup (csrc/cpu_ops.cpp, since 0.50): [-1, 1] cut into 65536 points
    -1 + 2i/65535, each mapped to the code of the first midpoint not below it, and a value mapped to
    point uint16((v + 1)·0.5·65535 + 0.5), all in float32. Near a midpoint it can pick the farther code."""
    mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    pts = (np.float32(-1) + (np.float32(2) * np.arange(65536, dtype=np.float32)) / np.float32(65535)).astype(np.float32)
    lut = np.searchsorted(mids, pts, side="left").astype(np.uint8)
    v = ((np.clip(x, -1, 1).astype(np.float32) + np.float32(1)) * np.float32(0.5)).astype(np.float32)
    pos = ((v * np.float32(65535)).astype(np.float32) + np.float32(0.5)).astype(np.float32)
    return lut[pos.astype(np.uint32).clip(0, 65535)]


def _blockwise(x: np.ndarray, block: int, code: np.ndarray, lut: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(code indices, per-block absmax) of flat float32 `x` in blocks of `block` (the last may be short)."""
    n = x.size
    nb = -(-n // block)
    pad = np.zeros(nb * block, dtype=np.float32)
    pad[:n] = x
    blocks = pad.reshape(nb, block)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    inv = (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1)).astype(np.float32)
    flat = scaled.reshape(-1)[:n]
    return (_lut_nearest(flat, code) if lut else _nearest(flat, code)), absmax


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the values of `dtype` (round to nearest even), as float32."""
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    u = x.astype(np.float32).view(np.uint32)
    # bf16 = the top 16 bits, rounded to nearest even (NaN stays NaN: weights are finite here)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).astype(np.uint32)
    return r.view(np.float32)


def nf4_roundtrip(w: np.ndarray, dtype: str = "bf16", cpu_lut: bool = False, offset: float | None = None) -> np.ndarray:
    """W' = dequantize_4bit(quantize_4bit(W)) of one weight (numpy (out, in)), NF4 with blocksize 64
    and double-quantized absmax, as float32 holding values of `dtype` (see the module doc).

    cpu_lut: False, the exact nearest 8-bit absmax code, as the CUDA kernels QLoRA trains with; True
    reproduces bitsandbytes' CPU backend's table lookup instead (the oracle test runs on the CPU).
    offset: the double quantization's mean of the absmax vector, when given (the oracle test passes
    bitsandbytes' own float32 reduction, whose summation order no formula reproduces)."""
    if dtype not in DTYPES:
        raise BadArguments(f"the NF4 roundtrip dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    x = _round_to(np.ascontiguousarray(w, dtype=np.float32), dtype).reshape(-1)
    if x.size == 0:
        return x.reshape(w.shape)
    q, absmax = _blockwise(x, BLOCK, NF4)
    offset = np.float32(absmax.astype(np.float64).mean() if offset is None else offset)
    dmap = dynamic_map()
    q2, absmax2 = _blockwise((absmax - offset).astype(np.float32), BLOCK2, dmap, cpu_lut)
    deq_absmax = (dmap[q2] * np.repeat(absmax2, BLOCK2)[: absmax.size]).astype(np.float32) + offset
    out = NF4[q] * np.repeat(deq_absmax.astype(np.float32), BLOCK)[: x.size]
    return _round_to(out.astype(np.float32), dtype).reshape(w.shape)
