"""Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) without torch.

The result is one record per adapted module: its HF name, the safetensors keys of A and B, the
rank (from the shapes), the alpha PEFT uses for it (alpha_pattern or lora_alpha) and PEFT's
scale (alpha/r, or alpha/sqrt(r) with rsLoRA). Tensors are read lazily, one at a time; BF16 is
read from the raw bytes (safetensors' numpy API cannot load it) and widened to float32 exactly.

Anything loraq cannot represent as a llama.cpp LoRA (DoRA, modules_to_save full weights, trainable
token rows, LoRA biases, unknown tensors, a pickle `adapter_model.bin`) is refused with a one-line
message that names the tensor and the way out; it is never silently dropped (docs/llama-cpp.md
§1.3, §10.12). For the merge (merge=True) DoRA magnitudes, modules_to_save weights and trainable
token rows are read into `parts` instead; biases and unknown tensors stay refused."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import regex

from ..atomic import io_error
from ..errors import BadArguments, BadInput, shown

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# What a llama.cpp runtime adapter cannot hold but loraq's merge applies (DoRA, modules_to_save,
# trainable tokens, an lm_head LoRA on tied embeddings): the way out is the merged path.
MERGE_HINT = "use the merged path instead (`loraq merge`, or `loraq run`, which then scores merged variants only); it applies this as PEFT's merge_and_unload does"
# What neither can apply (biases, unknown tensors): PEFT's own merge.
PEFT_HINT = "merge it with PEFT's merge_and_unload and convert the merged model"

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
class MergeParts:
    """The parts of a PEFT adapter that a merge can apply and a llama.cpp LoRA cannot hold, keyed by
    HF module name (without `base_model.model.`), each a safetensors key read lazily."""

    magnitudes: dict[str, str] = field(default_factory=dict)  # DoRA: lora_magnitude_vector, one value per output feature
    full: dict[str, str] = field(default_factory=dict)  # modules_to_save: the trained copy of the whole weight
    tokens: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # trainable_token_indices: rows, their new values

    def describe(self) -> list[str]:
        out = []
        if self.magnitudes:
            out.append(f"DoRA magnitudes on {len(self.magnitudes)} modules")
        if self.full:
            out.append(f"full weights (modules_to_save) of {', '.join(sorted(self.full))}")
        if self.tokens:
            out.append(f"trainable token rows of {', '.join(sorted(self.tokens))}")
        return out


@dataclass
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    lora_alpha: float
    use_rslora: bool
    modules: list[LoraModule]  # in safetensors key order (lexicographic HF names)
    skipped: list[str] = field(default_factory=list)  # `.base_layer.weight` copies, ignored as the reference does
    # Read only with merge=True (see MergeParts): what a llama.cpp adapter cannot hold.
    parts: MergeParts = field(default_factory=lambda: MergeParts())
    _file: _Safetensors | None = field(default=None, repr=False)

    @property
    def merge_only(self) -> list[str]:
        """Why only a merge can apply this adapter, one phrase per kind of part (empty: convertible)."""
        return self.parts.describe()

    def read(self, key: str) -> np.ndarray:
        """A tensor as float32 (float64 if stored as F64); NaN/Inf is a BadInput naming it."""
        assert self._file is not None
        return self._file.read(key)


# Limits on untrusted adapter files (docs/design.md, Untrusted input); real ones are far below.
MAX_CONFIG_BYTES = 4 << 20  # adapter_config.json is a few KiB
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (the safetensors library's own limit)
MAX_ALPHA = 1e6  # |lora_alpha| and alpha_pattern values; PEFT's are 1..a few hundred
MAX_RANK = 1 << 16
PATTERN_BUDGET_S = 1.0  # total time all alpha_pattern matching of one adapter may take


def pattern_key(patterns: Iterable[str], name: str, deadline: float | None = None) -> str | None:
    """The first key of `patterns` that PEFT's get_pattern_key matches against module `name`.

    PEFT uses Python's `re`; the keys come from an untrusted file, so they are matched with the
    `regex` package (the same syntax) under a time limit: a catastrophically backtracking
    pattern becomes a BadInput instead of a hang. `deadline` is a time.monotonic() value shared by
    all the matches of one adapter."""
    if deadline is None:
        deadline = time.monotonic() + PATTERN_BUDGET_S
    for key in patterns:
        try:
            hit = regex.match(rf"(.*\.)?({key})$", name, timeout=max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            raise BadInput(
                f"{CONFIG_NAME}: alpha_pattern key `{shown(key)}` takes too long to match module `{shown(name)}` "
                "(catastrophic backtracking); simplify the pattern"
            ) from None
        except (regex.error, re.error, ValueError, TypeError, RecursionError, MemoryError) as exc:
            raise BadInput(f"{CONFIG_NAME}: alpha_pattern key `{shown(key)}` is not a valid regular expression ({_short(exc)})") from None
        if hit:
            return key
    return None


def peft_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def load_peft_adapter(path: Path | str, merge: bool = False) -> PeftAdapter:
    """Read and validate a PEFT LoRA adapter folder; tensors stay on disk until `read`.

    With merge=False (a llama.cpp adapter is wanted) DoRA magnitudes, modules_to_save weights and
    trainable token rows are refused naming the merge as the way out; with merge=True they are
    collected in `parts` for loraq's merge. Raises BadArguments for a missing folder or file,
    BadInput for anything loraq cannot apply faithfully (each with a one-line message naming the
    tensor and the alternative)."""
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
    peft_type = _typed(config, "peft_type", str, cfg_path, "LORA")
    if peft_type.upper() != "LORA":
        raise BadInput(f"{cfg_path}: peft_type is {peft_type[:40]}; loraq converts LoRA adapters only")
    if _typed(config, "use_dora", bool, cfg_path, False) and not merge:
        raise BadInput(f"{cfg_path}: use_dora is true; llama.cpp cannot run DoRA adapters: {MERGE_HINT}")
    if "lora_alpha" not in config:
        raise BadInput(f"{cfg_path} has no lora_alpha; PEFT's scale alpha/r is undefined without it")
    lora_alpha = _number(config["lora_alpha"], "lora_alpha", cfg_path)
    use_rslora = _typed(config, "use_rslora", bool, cfg_path, False)
    r = config.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK):
        raise BadInput(f"{cfg_path}: r must be an integer in [1, {MAX_RANK}], got {_show(r)}")
    alpha_pattern = _typed(config, "alpha_pattern", dict, cfg_path, {})
    for k, v in alpha_pattern.items():
        _number(v, f"alpha_pattern[{shown(repr(k))}]", cfg_path)
    for k, v in _typed(config, "rank_pattern", dict, cfg_path, {}).items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_RANK:
            raise BadInput(f"{cfg_path}: rank_pattern[{shown(repr(k))}] must be an integer in [1, {MAX_RANK}], got {_show(v)}")

    st = _Safetensors(weights)
    keys = sorted(st.header)
    a_keys: dict[str, tuple[str, bool]] = {}
    b_keys: dict[str, tuple[str, bool]] = {}
    order: list[str] = []
    skipped: list[str] = []
    refused: dict[str, list[str]] = {}
    parts = MergeParts()
    token_rows = _token_indices(config, cfg_path) if merge else {}
    for key in keys:
        if merge and _merge_part(key, st, parts, token_rows, weights):
            continue
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
    deadline = time.monotonic() + PATTERN_BUDGET_S
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
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or not 1 <= sa[0] <= MAX_RANK:
            raise BadInput(
                f"`{ka}` {list(sa)} and `{kb}` {list(sb)} are not a LoRA pair (A must be (r, in), B (out, r)); "
                "re-save the adapter with PEFT"
            )
        pkey = pattern_key(alpha_pattern, name, deadline)
        alpha = float(alpha_pattern[pkey]) if pkey is not None else lora_alpha
        modules.append(LoraModule(name, ka, kb, emb_a, (sa[0], sa[1]), (sb[0], sb[1]), alpha, peft_scale(alpha, sa[0], use_rslora)))
    for name in parts.magnitudes:
        if name not in a_keys:
            raise BadInput(
                f"`{parts.magnitudes[name]}` is a DoRA magnitude with no lora_A/lora_B for its module; re-save the adapter with PEFT"
            )
    if not modules and not parts.describe():
        raise BadInput(f"{weights} holds no lora_A/lora_B tensors")
    return PeftAdapter(d, config, lora_alpha, use_rslora, modules, skipped, parts, st)


_MAGNITUDE = ".lora_magnitude_vector"
_TOKENS = ".token_adapter.trainable_tokens_delta"


def _merge_part(key: str, st: _Safetensors, parts: MergeParts, token_rows: dict[str, list[int]], weights: Path) -> bool:
    """File `key` under `parts` if it is a DoRA magnitude, a modules_to_save weight or trainable
    token rows (checking its shape); False for anything else."""
    mod = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    shape = st.shape(key)
    if mod.endswith(_MAGNITUDE):
        name = mod[: -len(_MAGNITUDE)]
        if len(shape) != 1:
            raise BadInput(f"`{key}` has shape {list(shape)}; a DoRA magnitude is a vector, re-save the adapter with PEFT")
        parts.magnitudes[name] = key
        return True
    if mod.endswith(_TOKENS):
        name = mod[: -len(_TOKENS)]
        rows = next((ids for k, ids in token_rows.items() if name == k or name.endswith("." + k)), None)
        if rows is None:
            raise BadInput(f"`{key}` holds trainable token rows, but trainable_token_indices names no token ids for `{name}`")
        if len(shape) != 2 or shape[0] != len(rows):
            raise BadInput(f"`{key}` has shape {list(shape)} for {len(rows)} trainable token ids; re-save the adapter with PEFT")
        parts.tokens[name] = (rows, key)
        return True
    if mod.endswith(".weight") and ".lora_" not in mod and not mod.endswith(".base_layer.weight"):
        if len(shape) != 2:
            raise BadInput(f"`{key}` (modules_to_save) has shape {list(shape)}; loraq merges full 2-D weights only")
        parts.full[mod[: -len(".weight")]] = key
        return True
    return False


def _token_indices(config: dict[str, Any], p: Path) -> dict[str, list[int]]:
    """trainable_token_indices as {module suffix: token ids}; a bare list means embed_tokens (PEFT's default)."""
    raw = config.get("trainable_token_indices")
    if raw is None:
        return {}
    table = {"embed_tokens": raw} if isinstance(raw, list) else raw
    if not isinstance(table, dict):
        raise BadInput(f"{p}: trainable_token_indices must be a list of token ids or an object of them, got {_show(raw)}")
    for k, ids in table.items():
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 1 << 24 for i in ids):
            raise BadInput(f"{p}: trainable_token_indices[{shown(repr(k))}] must be a list of token ids, got {_show(ids)}")
        if len(set(ids)) != len(ids):
            raise BadInput(f"{p}: trainable_token_indices[{shown(repr(k))}] lists a token id twice")
    return table


def _read_config(p: Path) -> dict[str, Any]:
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise BadInput(f"{p} is larger than {MAX_CONFIG_BYTES >> 20} MiB; an adapter_config.json is a few KiB, is this the right file?")
        raw = p.read_bytes()
    except OSError as exc:
        raise io_error(exc, p, "read") from exc
    cfg = read_json(raw, p, "re-save the adapter with PEFT")
    if not isinstance(cfg, dict):
        raise BadInput(f"{p} must hold a JSON object")
    return cfg


def read_json(raw: bytes, p: Path, fix: str, pairs_hook: Any = None) -> Any:
    """Parse untrusted JSON: non-UTF-8, bad syntax, NaN/Infinity literals, huge integers and deep
    nesting are all a one-line BadInput."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=no_constant, object_pairs_hook=pairs_hook)
    except UnicodeDecodeError as exc:
        raise BadInput(f"{p} is not UTF-8 ({exc.reason} at byte {exc.start}); {fix}") from None
    except RecursionError:
        raise BadInput(f"{p} nests JSON too deeply; {fix}") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, integers too long to convert
        raise BadInput(f"{p} is not valid JSON ({_short(exc)}); {fix}") from None


def _show(v: Any) -> str:
    return shown(repr(v), 60)


def _typed(config: dict[str, Any], key: str, typ: type, p: Path, default: Any) -> Any:
    """config[key] if it has type `typ`; a missing key or null gives `default`."""
    v = config.get(key)
    if v is None:
        return default
    if not isinstance(v, typ):
        raise BadInput(f"{p}: {key} must be {'true or false' if typ is bool else 'a JSON ' + typ.__name__}, got {_show(v)}")
    return v


def _number(v: Any, what: str, p: Path) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v)) and abs(v) <= MAX_ALPHA
    if not ok:
        raise BadInput(f"{p}: {what} must be a finite number within ±{MAX_ALPHA:g}, got {_show(v)}")
    return float(v)


def _refusal_kind(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "dora"
    if key.endswith(_TOKENS):
        return "tokens"
    if ".lora_" in key and key.endswith(".bias"):
        return "lora_bias"
    if key.endswith(".bias"):
        return "bias"
    if key.endswith(".weight") or "modules_to_save" in key:
        return "full"
    return "unknown"


def _raise_refused(refused: dict[str, list[str]], config: dict[str, Any]) -> None:
    for kind in ("dora", "tokens", "full", "lora_bias", "bias", "unknown"):
        keys = refused.get(kind)
        if not keys:
            continue
        first = f"`{keys[0]}`" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
        if kind == "dora":
            msg = f"{first} is a DoRA magnitude vector; llama.cpp cannot run DoRA adapters: {MERGE_HINT}"
        elif kind == "tokens":
            msg = f"{first} holds trainable token rows (trainable_token_indices); a llama.cpp LoRA adapter holds only lora_A/lora_B: {MERGE_HINT}"
        elif kind == "full":
            saved = config.get("modules_to_save")
            why = f"modules_to_save={saved}" if saved else "a full tensor, not a LoRA factor"
            msg = (
                f"{first} is a full weight ({why}); a llama.cpp LoRA adapter holds only lora_A/lora_B: "
                f"{MERGE_HINT}, or train without modules_to_save"
            )
        elif kind == "lora_bias":
            msg = (
                f"{first} is a LoRA bias (lora_bias=true); llama.cpp LoRA adapters have no bias: {PEFT_HINT}, or train with lora_bias=False"
            )
        elif kind == "bias":
            msg = (
                f"{first} is a trained bias (bias={config.get('bias')!r}); llama.cpp LoRA adapters have no bias: "
                f"{PEFT_HINT}, or train with bias='none'"
            )
        else:
            msg = f"{first} is not a lora_A/lora_B tensor; loraq converts plain LoRA adapters only: {PEFT_HINT}"
        raise BadInput(msg)


class _Entry(NamedTuple):  # one tensor of a safetensors header
    dtype: str
    shape: tuple[int, ...]
    lo: int  # data_offsets, relative to the end of the header
    hi: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if any(k == k2 for k2, _ in pairs[:i]))
        raise ValueError(f"key {dup[:80]!r} appears twice")
    return d


def _entry(path: Path, key: str, info: Any, data_size: int) -> _Entry:
    """One header entry, checked: known dtype, non-negative integer shape whose byte size is
    exactly its data_offsets span, and the span inside the data section."""

    def bad(why: str) -> NoReturn:
        raise BadInput(f"{path}: tensor `{shown(key, 120)}` {why}; the file is corrupt, re-save or re-download it")

    if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list):
        bad("has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        bad("has a malformed header entry")
    if dtype not in _DTYPES:
        raise BadInput(f"{path}: tensor `{shown(key, 120)}` has dtype {shown(dtype, 20)}; loraq reads F32, F16, BF16 and F64 adapters")
    ints = [*shape, *offsets]
    if len(offsets) != 2 or len(shape) > 8 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in ints):
        bad("has a malformed shape or data_offsets")
    lo, hi = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if hi < lo or hi - lo != nbytes:
        bad(f"has shape {_show(shape)} ({nbytes} bytes) but data_offsets {_show(offsets)}")
    if hi > data_size:
        bad(f"has data_offsets {_show(offsets)} past the end of the data section ({data_size} bytes)")
    return _Entry(dtype, tuple(shape), lo, hi)


class _Safetensors:
    """A safetensors file: the header parsed here, tensors read one at a time."""

    def __init__(self, path: Path, fix: str = "re-save the adapter with PEFT"):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise BadInput(f"{path} is not a readable safetensors file (shorter than its 8-byte header length); {fix}")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > MAX_HEADER_BYTES:
                    raise BadInput(
                        f"{path} is not a readable safetensors file (header length {n} is past the end of the file "
                        f"or above {MAX_HEADER_BYTES >> 20} MiB); {fix}"
                    )
                raw = f.read(n)
        except OSError as exc:
            raise io_error(exc, path, "read") from exc
        header = read_json(raw, path, fix, pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise BadInput(f"{path} is not a readable safetensors file (header is not an object); {fix}")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.header: dict[str, _Entry] = {}
        for key, info in header.items():
            if not key.isprintable() or len(key) > 1024:  # names end up in messages and GGUF tensor names
                raise BadInput(f"{path}: tensor name `{shown(key)}` is not a printable name of at most 1024 characters; {fix}")
            self.header[key] = _entry(path, key, info, size - self.data_start)
        spans = sorted((e.lo, e.hi, k) for k, e in self.header.items() if e.hi > e.lo)
        for (_, hi, k1), (lo, _, k2) in itertools.pairwise(spans):
            if lo < hi:
                raise BadInput(f"{path}: tensors `{k1}` and `{k2}` overlap in the data section; the file is corrupt, {fix}")
        try:  # safetensors' own validation of the header and offsets; it reads F32/F16/F64
            from safetensors import safe_open

            self._st = safe_open(str(path), framework="numpy")
        except Exception as exc:
            raise BadInput(f"{path} is not a readable safetensors file ({_short(exc)}); {fix}") from exc

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
