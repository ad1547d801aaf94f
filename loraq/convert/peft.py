"""Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) without torch.

The result is one record per adapted module: its HF name, the safetensors keys of A and B, the
rank (from the shapes), the alpha PEFT uses for it (alpha_pattern or lora_alpha) and PEFT's
scale (alpha/r, or alpha/sqrt(r) with rsLoRA). Tensors are read lazily, one at a time; BF16 is
read from the raw bytes (safetensors' numpy API cannot load it) and widened to float32 exactly.

Anything loraq cannot represent as a llama.cpp LoRA (DoRA, modules_to_save full weights, LoRA
biases, unknown tensors, a pickle `adapter_model.bin`) is refused with a one-line message that
names the tensor and the way out; it is never silently dropped (docs/llama-cpp.md §1.3, §10.12)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..atomic import io_error
from ..errors import BadArguments, BadInput

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

MERGE_HINT = "merge it with PEFT's merge_and_unload and convert the merged model"

# safetensors dtype -> numpy dtype it is read as (BF16 is widened by hand)
_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": np.dtype("<u2")}

_A = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_embedding_A)$")
_B = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_B\.weight|lora_embedding_B)$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module. A is (r, in) and B is (out, r) as PEFT stores them; for an embedding
    (lora_embedding_A/B) A is (r, n_vocab) and B is (n_embd, r)."""

    name: str  # HF module name without `base_model.model.`, e.g. model.layers.0.self_attn.q_proj
    key_a: str  # safetensors key of A
    key_b: str  # safetensors key of B
    embedding: bool
    shape_a: tuple[int, int]
    shape_b: tuple[int, int]
    alpha: float  # the alpha PEFT uses for this module (alpha_pattern or lora_alpha)
    scale: float  # PEFT's scale: alpha/r, or alpha/sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.shape_a[0]


@dataclass
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    lora_alpha: float
    use_rslora: bool
    modules: list[LoraModule]  # in safetensors key order (lexicographic HF names)
    skipped: list[str] = field(default_factory=list)  # `.base_layer.weight` copies, ignored as the reference does
    _file: _Safetensors | None = field(default=None, repr=False)

    def read(self, key: str) -> np.ndarray:
        """A tensor as float32 (float64 if stored as F64); NaN/Inf is a BadInput naming it."""
        assert self._file is not None
        return self._file.read(key)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of `patterns` that PEFT's get_pattern_key matches against module `name`."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as exc:
            raise BadInput(f"{CONFIG_NAME}: pattern `{key}` is not a valid regular expression ({exc})") from exc
    return None


def peft_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def load_peft_adapter(path: Path | str) -> PeftAdapter:
    """Read and validate a PEFT LoRA adapter folder; tensors stay on disk until `read`.

    Raises BadArguments for a missing folder or file, BadInput for anything loraq cannot
    convert faithfully (each with a one-line message naming the tensor and the alternative)."""
    d = Path(path)
    if not d.exists():
        raise BadArguments(f"adapter folder not found: {d}")
    if not d.is_dir():
        raise BadArguments(f"adapter must be a PEFT folder (adapter_config.json + {WEIGHTS_NAME}), got the file {d}")
    cfg_path, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise BadArguments(f"{cfg_path} not found; is {d} a PEFT adapter folder (saved with save_pretrained)?")
    if not weights.is_file():
        if (d / PICKLE_NAME).is_file():
            raise BadInput(
                f"{d / PICKLE_NAME} is a pickle, which loraq never loads; re-save the adapter with "
                f"save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}"
            )
        raise BadArguments(f"{weights} not found; is {d} a PEFT adapter folder (saved with save_pretrained)?")

    config = _read_config(cfg_path)
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise BadInput(f"{cfg_path}: peft_type is {peft_type}; loraq converts LoRA adapters only")
    if config.get("use_dora"):
        raise BadInput(f"{cfg_path}: use_dora is true; llama.cpp cannot run DoRA adapters: {MERGE_HINT}")
    if "lora_alpha" not in config:
        raise BadInput(f"{cfg_path} has no lora_alpha; PEFT's scale alpha/r is undefined without it")
    lora_alpha = _number(config["lora_alpha"], "lora_alpha", cfg_path)
    use_rslora = bool(config.get("use_rslora") or False)
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise BadInput(f"{cfg_path}: alpha_pattern must be an object mapping module patterns to alphas")
    for k, v in alpha_pattern.items():
        _number(v, f"alpha_pattern[{k!r}]", cfg_path)

    st = _Safetensors(weights)
    keys = sorted(st.header)
    a_keys: dict[str, tuple[str, bool]] = {}
    b_keys: dict[str, tuple[str, bool]] = {}
    order: list[str] = []
    skipped: list[str] = []
    refused: dict[str, list[str]] = {}
    for key in keys:
        if m := _A.match(key):
            mod, emb, side = m["mod"], m["kind"] == "lora_embedding_A", a_keys
        elif m := _B.match(key):
            mod, emb, side = m["mod"], m["kind"] == "lora_embedding_B", b_keys
        else:
            if key.endswith(".base_layer.weight"):
                skipped.append(key)
            else:
                refused.setdefault(_refusal_kind(key), []).append(key)
            continue
        name = mod[len(PREFIX) :] if mod.startswith(PREFIX) else mod
        if name not in a_keys and name not in b_keys:
            order.append(name)
        side[name] = (key, emb)
    if refused:
        _raise_refused(refused, config)

    modules: list[LoraModule] = []
    for name in order:
        if name not in b_keys:
            ka = a_keys[name][0]
            raise BadInput(f"`{ka}` has no matching lora_B tensor; the adapter file is incomplete, re-save it with PEFT")
        if name not in a_keys:
            kb = b_keys[name][0]
            raise BadInput(f"`{kb}` has no matching lora_A tensor; the adapter file is incomplete, re-save it with PEFT")
        (ka, emb_a), (kb, emb_b) = a_keys[name], b_keys[name]
        if emb_a != emb_b:
            raise BadInput(f"`{ka}` and `{kb}` mix Linear and Embedding LoRA for one module; re-save the adapter with PEFT")
        sa, sb = st.shape(ka), st.shape(kb)
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or sa[0] < 1:
            raise BadInput(
                f"`{ka}` {list(sa)} and `{kb}` {list(sb)} are not a LoRA pair (A must be (r, in), B (out, r)); "
                "re-save the adapter with PEFT"
            )
        pkey = pattern_key(alpha_pattern, name)
        alpha = float(alpha_pattern[pkey]) if pkey is not None else lora_alpha
        modules.append(LoraModule(name, ka, kb, emb_a, (sa[0], sa[1]), (sb[0], sb[1]), alpha, peft_scale(alpha, sa[0], use_rslora)))
    if not modules:
        raise BadInput(f"{weights} holds no lora_A/lora_B tensors")
    return PeftAdapter(d, config, lora_alpha, use_rslora, modules, skipped, st)


def _read_config(p: Path) -> dict[str, Any]:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise io_error(exc, p, "read") from exc
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p} is not valid JSON ({exc}); re-save the adapter with PEFT") from exc
    if not isinstance(cfg, dict):
        raise BadInput(f"{p} must hold a JSON object")
    return cfg


def _number(v: Any, what: str, p: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadInput(f"{p}: {what} must be a finite number, got {v!r}")
    return float(v)


def _refusal_kind(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "dora"
    if ".lora_" in key and key.endswith(".bias"):
        return "lora_bias"
    if key.endswith(".bias"):
        return "bias"
    if key.endswith(".weight") or "modules_to_save" in key:
        return "full"
    return "unknown"


def _raise_refused(refused: dict[str, list[str]], config: dict[str, Any]) -> None:
    for kind in ("dora", "full", "lora_bias", "bias", "unknown"):
        keys = refused.get(kind)
        if not keys:
            continue
        first = f"`{keys[0]}`" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
        if kind == "dora":
            msg = f"{first} is a DoRA magnitude vector; llama.cpp cannot run DoRA adapters: {MERGE_HINT}"
        elif kind == "full":
            saved = config.get("modules_to_save")
            why = f"modules_to_save={saved}" if saved else "a full tensor, not a LoRA factor"
            msg = (
                f"{first} is a full weight ({why}); a llama.cpp LoRA adapter holds only lora_A/lora_B: "
                f"{MERGE_HINT}, or train without modules_to_save"
            )
        elif kind == "lora_bias":
            msg = (
                f"{first} is a LoRA bias (lora_bias=true); llama.cpp LoRA adapters have no bias: "
                f"{MERGE_HINT}, or train with lora_bias=False"
            )
        elif kind == "bias":
            msg = (
                f"{first} is a trained bias (bias={config.get('bias')!r}); llama.cpp LoRA adapters have no bias: "
                f"{MERGE_HINT}, or train with bias='none'"
            )
        else:
            msg = f"{first} is not a lora_A/lora_B tensor; loraq converts plain LoRA adapters only: {MERGE_HINT}"
        raise BadInput(msg)


class _Entry(NamedTuple):  # one tensor of a safetensors header
    dtype: str
    shape: tuple[int, ...]
    lo: int  # data_offsets, relative to the end of the header
    hi: int


class _Safetensors:
    """A safetensors file: the header parsed here, tensors read one at a time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} is past the end of the file")
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as exc:
            raise io_error(exc, path, "read") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path} is not a readable safetensors file ({exc}); re-save the adapter with PEFT") from exc
        if not isinstance(header, dict):
            raise BadInput(f"{path} is not a readable safetensors file (header is not an object)")
        try:  # safetensors' own validation of the header and offsets; it reads F32/F16/F64
            from safetensors import safe_open

            self._st = safe_open(str(path), framework="numpy")
        except Exception as exc:
            raise BadInput(f"{path} is not a readable safetensors file ({_short(exc)}); re-save the adapter with PEFT") from exc
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.header: dict[str, _Entry] = {}
        for key, info in header.items():
            try:
                (lo, hi), shape = info["data_offsets"], tuple(int(x) for x in info["shape"])
                e = self.header[key] = _Entry(info["dtype"], shape, int(lo), int(hi))
            except (KeyError, TypeError, ValueError) as exc:
                raise BadInput(f"{path}: tensor `{key}` has a malformed header entry; re-save the adapter") from exc
            if e.dtype not in _DTYPES:
                raise BadInput(f"{path}: tensor `{key}` has dtype {e.dtype}; loraq reads F32, F16, BF16 and F64 adapters")
            count = int(np.prod(e.shape, dtype=np.int64))
            if e.hi - e.lo != count * _DTYPES[e.dtype].itemsize or e.lo < 0 or self.data_start + e.hi > size:
                raise BadInput(f"{path} is truncated or corrupt at tensor `{key}`; re-save or re-download it")

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header[key].shape

    def read(self, key: str) -> np.ndarray:
        dtype = self.header[key].dtype
        if dtype == "BF16":
            x = self._read_bf16(key)
        else:
            try:
                x = self._st.get_tensor(key)
            except OSError as exc:
                raise io_error(exc, self.path, "read") from exc
            except Exception as exc:
                raise BadInput(f"{self.path}: cannot read tensor `{key}` ({_short(exc)}); re-save the adapter") from exc
            if dtype != "F64":
                x = x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise BadInput(f"adapter tensor `{key}` has {bad} NaN/Inf values; the fine-tune diverged, use an earlier checkpoint")
        return x

    def _read_bf16(self, key: str) -> np.ndarray:
        """safetensors' numpy API cannot return BF16, so read the bytes at the header's offsets."""
        _, shape, lo, hi = self.header[key]
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                buf = os.pread(fd, hi - lo, self.data_start + lo)
            finally:
                os.close(fd)
        except OSError as exc:
            raise io_error(exc, self.path, "read") from exc
        if len(buf) != hi - lo:
            raise BadInput(f"{self.path} is truncated inside tensor `{key}`; re-save or re-download it")
        u16 = np.frombuffer(buf, dtype="<u2").reshape(shape)
        return (u16.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of an f32: exact


def _short(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__
