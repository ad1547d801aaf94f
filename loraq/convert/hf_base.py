"""Hugging Face model folder -> F16 (BF16, F32) GGUF, as llama.cpp's convert_hf_to_gguf.py makes it.

Inputs: config.json, safetensors (model.safetensors, or shards listed in
model.safetensors.index.json; BF16, F16, F32 or F64 tensors), tokenizer.json,
tokenizer_config.json, generation_config.json, chat_template.jinja. Architectures: llama (incl.
SmolLM2 and Mistral-style checkpoints), qwen2, qwen3, with a GPT-2 byte-level BPE tokenizer
(hf_vocab.py); SentencePiece tokenizers (tokenizer.model, byte-fallback tokenizer.json) and other
architectures are refused in one line naming what is supported.

What the reference does, and so this does (docs/llama-cpp.md §1.4, §1.5):
- hyper-parameters as transformers' config classes complete them (head_dim of llama is
  hidden/heads, qwen3's defaults to 128, ...), written with gguf-py's GGUFWriter key helpers in the
  reference's order; `general.*` from gguf-py's Metadata (model card, folder name, size label);
- tensor names through gguf-py's TensorNameMap; Q and K of llama permuted for its rope
  (row (head, 2, d/2) -> (head, d/2, 2)); tensors in the order the reference writes them (shards
  sorted, names sorted within a shard);
- values: BF16 widened to F32 exactly, then every tensor rounded by gguf-py's `quants.quantize`
  (F16: numpy's round-to-nearest-even; BF16: its round-half-even with NaN kept quiet); 1-D tensors,
  `*_norm.weight` and biases stay F32;
- llama's Llama-3 rope scaling adds `rope_freqs.weight` (F32).

Streams tensor by tensor and, for the big ones, row block by row block: the source bytes are read
with pread at the offsets of the header (every size checked against the file, loraq/convert/peft.py),
converted, written; peak memory stays near one block plus the tokenizer, not the model. The output
is written atomically (loraq/gguf_io/writer.py)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ..atomic import check_not_input, check_regular, io_error
from ..errors import BadArguments, BadInput, shown
from ..ggml_types import GGMLType, ggml_type
from ..gguf_io import KVList
from ..gguf_io.writer import GGUFStreamWriter, OutTensor
from .hf_vocab import add_gpt2_vocab, check_supported_tokenizer
from .peft import _Safetensors, read_json

# HF architecture (config.json "architectures"[0]) -> llama.cpp architecture
ARCHES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED = "llama (LlamaForCausalLM, MistralForCausalLM; SmolLM2, Llama 3, Mistral), qwen2 (Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM)"

OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32)}  # gguf LlamaFileType ids
FIX = "re-download or re-save the model folder"
MAX_CONFIG_BYTES = 16 << 20
CHUNK_BYTES = 4 << 20  # float32 bytes of the source rows converted at a time: bounds the working memory per tensor
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # buffers, not weights

# transformers' config-class defaults for the keys the conversion reads (what AutoConfig adds to a
# config.json that leaves them out); llama's head_dim is derived from hidden_size / heads below.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 32000},
    "qwen2": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": 151936,
        "num_key_value_heads": 32,
    },
    "qwen3": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": 151936,
        "num_key_value_heads": 32,
        "head_dim": 128,
    },
}


@dataclass
class HFBaseResult:
    out: Path
    arch: str
    n_tensors: int
    pre: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Source:
    """One tensor of the folder: its safetensors file and header entry."""

    hf_name: str
    file: _Safetensors
    dtype: str
    shape: tuple[int, ...]
    lo: int
    hi: int


def _read_json(p: Path, limit: int = MAX_CONFIG_BYTES) -> Any:
    try:
        if p.stat().st_size > limit:
            raise BadInput(f"{p} is larger than {limit >> 20} MiB; is this the right file?")
        raw = p.read_bytes()
    except OSError as exc:
        raise io_error(exc, p, "read") from exc
    return read_json(raw, p, FIX)


def load_hparams(folder: Path) -> tuple[str, str, dict[str, Any]]:
    """(HF architecture, llama.cpp architecture, config completed with transformers' defaults)."""
    p = folder / "config.json"
    if not p.is_file():
        raise BadInput(f"{p} not found; is {folder} a Hugging Face model folder (saved with save_pretrained)?")
    cfg = _read_json(p)
    if not isinstance(cfg, dict):
        raise BadInput(f"{p} must hold a JSON object")
    archs = cfg.get("architectures")
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if hf_arch not in ARCHES:
        got = shown(hf_arch) if hf_arch else "no architectures entry"
        raise BadInput(f"{p}: architecture {got} is not supported; loraq converts {SUPPORTED}")
    arch = ARCHES[hf_arch]
    hp = {**_DEFAULTS[arch], **{k: v for k, v in cfg.items() if v is not None}}
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        if key not in hp:
            raise BadInput(f"{p} has no {key}; {FIX}")
    _check_numbers(p, hp)
    if arch == "llama" or cfg.get("num_key_value_heads", 0) is None:  # the config classes' rule: none given = MHA
        hp["num_key_value_heads"] = hp.get("num_key_value_heads") or hp["num_attention_heads"]
    if arch == "llama" and "head_dim" not in hp:
        hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    if hp.get("num_local_experts") or hp.get("num_experts"):
        raise BadInput(f"{p}: mixture-of-experts models are not supported; loraq converts {SUPPORTED}")
    return hf_arch, arch, hp


_INT_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)
_FLOAT_KEYS = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
_ROPE_FLOATS = (
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "extrapolation_factor",
    "attention_factor",
    "attn_factor",
    "beta_fast",
    "beta_slow",
)


def _check_numbers(p: Path, hp: dict[str, Any]) -> None:
    """Every number the conversion writes or computes with, checked: a one-line BadInput instead of
    a traceback from deep inside the writer."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in _INT_KEYS:
        v = hp.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 1 << 31):
            raise BadInput(f"{p}: {key} must be a positive integer, got {shown(repr(v), 40)}")
    for key in _FLOAT_KEYS:
        v = hp.get(key)
        if v is not None and not (number(v) and v >= 0):
            raise BadInput(f"{p}: {key} must be a non-negative number, got {shown(repr(v), 40)}")
    for key in ("rope_parameters", "rope_scaling"):
        rp = hp.get(key)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            raise BadInput(f"{p}: {key} must be an object, got {shown(repr(rp), 40)}")
        inner = rp.get("full_attention", rp)
        if not isinstance(inner, dict):
            raise BadInput(f"{p}: {key}.full_attention must be an object")
        for k in _ROPE_FLOATS:
            if inner.get(k) is not None and not (number(inner[k]) and inner[k] > 0):
                raise BadInput(f"{p}: {key}.{k} must be a positive number, got {shown(repr(inner[k]), 40)}")
        for k in ("rope_type", "type"):
            if inner.get(k) is not None and not isinstance(inner[k], str):
                raise BadInput(f"{p}: {key}.{k} must be a string, got {shown(repr(inner[k]), 40)}")


def _find(hp: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((hp[k] for k in keys if k in hp), None)


def _rope(hp: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters as transformers 5 presents them: rope_parameters, else rope_scaling plus
    rope_theta (the reference reads the same keys from either layout)."""
    rp = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    rp = dict(rp) if isinstance(rp, dict) else {}
    if "full_attention" in rp:
        rp = dict(rp["full_attention"])
    if "rope_theta" not in rp and hp.get("rope_theta") is not None:
        rp["rope_theta"] = hp["rope_theta"]
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    return rp


def add_hparams(w: Any, arch: str, hp: dict[str, Any], ftype: int) -> None:
    """The model hyper-parameter KVs, keys and order as convert_hf_to_gguf.py's TextModel / LlamaModel."""
    w.add_block_count(hp["num_hidden_layers"])
    keys: list[tuple[tuple[str, ...], Callable[[Any], None]]] = [
        (
            ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"),
            w.add_context_length,
        ),
        (("hidden_size", "n_embd", "dim"), w.add_embedding_length),
        (("intermediate_size", "n_inner", "hidden_dim"), w.add_feed_forward_length),
        (("num_attention_heads", "n_head", "n_heads"), w.add_head_count),
        (("num_key_value_heads", "n_kv_heads"), w.add_head_count_kv),
    ]
    for names, add in keys:
        if (v := _find(hp, names)) is not None:
            add(v)
    rp = _rope(hp)
    rope_type = rp.get("rope_type")
    if rope_type is not None:
        import gguf

        factor = rp.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
            for key, add in (
                ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
            ):
                v = rp.get(key, rp.get("attn_factor")) if key == "attention_factor" else rp.get(key)
                if v is not None:
                    add(v)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(rp["rope_theta"])
    if (eps := _find(hp, ("rms_norm_eps", "norm_eps"))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(hp, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    if arch == "llama":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def llama3_rope_factors(hp: dict[str, Any]) -> np.ndarray | None:
    """rope_freqs for Llama 3.1+ rope scaling. The reference computes in float32 tensors (python
    numbers in an operation with one are cast to float32 first), so this does the same in numpy
    float32 scalars to give the same bits."""
    rp = _rope(hp)
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return None
    f32 = np.float32
    base = rp.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    factor = rp.get("factor", 8.0)
    lo_f, hi_f = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    lo_wl, hi_wl = old_ctx / lo_f, old_ctx / hi_f
    out = []
    for f in freqs:
        wavelen = f32(2 * math.pi) / f
        if wavelen < f32(hi_wl):
            out.append(f32(1))
        elif wavelen > f32(lo_wl):
            out.append(f32(factor))
        else:
            smooth = (f32(old_ctx) / wavelen - f32(lo_f)) / f32(hi_f - lo_f)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


def index_tensors(folder: Path) -> list[_Source]:
    """Every tensor of the folder in the reference's order, headers checked against the files."""
    index = folder / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index.is_file():
        data = _read_json(index, 64 << 20)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise BadInput(f"{index} has no weight_map object of tensor name -> file name; {FIX}")
        weight_map = wm
        parts = sorted(set(wm.values()))
        for part in parts:
            if Path(part).name != part or not part.endswith(".safetensors"):
                raise BadInput(f"{index}: weight_map names `{shown(part)}`, not a .safetensors file in the folder; {FIX}")
    else:
        parts = sorted(n for n in os.listdir(folder) if n.startswith("model") and n.endswith(".safetensors"))
    if not parts:
        if any(n.endswith(".bin") for n in os.listdir(folder)):
            raise BadInput(f"{folder} holds pickle weights (*.bin), which loraq never loads; re-save with safe_serialization=True")
        raise BadInput(f"{folder} has no model*.safetensors; is it a Hugging Face model folder?")
    sources: list[_Source] = []
    seen: dict[str, str] = {}
    for part in parts:
        p = folder / part
        if not p.is_file():
            raise BadInput(f"{p} is listed in {index.name} but missing; the download is incomplete")
        check_regular(p, "model weights")
        st = _Safetensors(p, FIX)
        for name in sorted(st.header):
            if name in seen:
                raise BadInput(f"tensor `{shown(name)}` is in both {seen[name]} and {part}; {FIX}")
            seen[name] = part
            e = st.header[name]
            sources.append(_Source(name, st, e.dtype, e.shape, e.lo, e.hi))
    if weight_map:
        missing = sorted(set(weight_map) - set(seen))
        extra = sorted(set(seen) - set(weight_map))
        if missing or extra:
            what = (
                f"`{shown(missing[0])}` is missing from {weight_map[missing[0]]}" if missing else f"`{shown(extra[0])}` is not in the index"
            )
            raise BadInput(f"{index.name} and the shards disagree: {what}; the download is incomplete or mixed, {FIX}")
    return [s for s in sources if not s.hf_name.endswith(SKIPPED_SUFFIXES)]


def hf_head_facts(folder: Path) -> tuple[bool, int | None]:
    """(tied: the folder has no lm_head tensor, so its GGUF has no output.weight; rows of
    embed_tokens, or None), from the safetensors headers only."""
    sources = index_tensors(folder)
    tied = not any(s.hf_name.split(".")[-2:] == ["lm_head", "weight"] for s in sources)
    emb = next((s for s in sources if s.hf_name.endswith("embed_tokens.weight")), None)
    return tied, (emb.shape[0] if emb is not None and emb.shape else None)


def _permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: per head, rows (2, d/2) -> (d/2, 2), for weights and biases."""
    rows = x.shape[0]
    if rows % (2 * n_head):
        raise BadInput(f"a Q/K tensor has {rows} rows, not a multiple of 2 x {n_head} heads; config.json does not match the weights")
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _read(src: _Source, row_lo: int, row_hi: int) -> np.ndarray:
    """Rows [row_lo, row_hi) of a tensor as float16 (F16 source) or float32 (others)."""
    shape = src.shape or (1,)
    row_elems = math.prod(shape[1:])
    item = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[src.dtype]
    start, n = src.lo + row_lo * row_elems * item, (row_hi - row_lo) * row_elems * item
    try:
        fd = os.open(src.file.path, os.O_RDONLY)
        try:
            buf = os.pread(fd, n, src.file.data_start + start)
        finally:
            os.close(fd)
    except OSError as exc:
        raise io_error(exc, src.file.path, "read") from exc
    if len(buf) != n:
        raise BadInput(f"{src.file.path} is truncated inside tensor `{src.hf_name}`; {FIX}")
    out_shape = (row_hi - row_lo, *shape[1:]) if src.shape else ()
    if src.dtype == "BF16":
        return (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(out_shape)  # exact
    if src.dtype == "F16":
        return np.frombuffer(buf, "<f2").reshape(out_shape)
    if src.dtype == "F64":
        return np.frombuffer(buf, "<f8").astype(np.float32).reshape(out_shape)
    return np.frombuffer(buf, "<f4").reshape(out_shape)


def _kv_records(w: Any) -> KVList:
    """The KVs gathered in a gguf.GGUFWriter, as loraq KV records in the same order."""
    kvs = KVList()
    for key, v in w.kv_data[0].items():
        sub = v.sub_type
        if v.type == GGUFValueType.ARRAY and sub is None:
            sub = GGUFValueType.get_type(v.value[0]) if len(v.value) else GGUFValueType.INT32
        kvs.set(key, v.type, v.value, sub)
    return kvs


def convert_hf_base(
    folder: Path | str, out: Path | str, outtype: str = "f16", on_tensor: Callable[[str], None] | None = None
) -> HFBaseResult:
    """Convert a Hugging Face model folder to a GGUF (see the module doc)."""

    if outtype not in OUTTYPES:
        raise BadArguments(f"--outtype must be one of f16, bf16, f32 (got '{outtype}')")
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise BadArguments(f"{folder} is not a folder; give a Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    type_name, ftype = OUTTYPES[outtype]
    hf_arch, arch, hp = load_hparams(folder)
    tokenizer_json = check_supported_tokenizer(folder)
    sources = index_tensors(folder)
    others = [p for p in folder.iterdir() if p.suffix in (".json", ".jinja")]
    check_not_input(out, [*(("model weights", s.file.path) for s in sources), *(("model file", p) for p in others)])

    plan = _plan(folder, hf_arch, arch, hp, sources, ggml_type(type_name))
    kvs = _collect_kvs(folder, arch, hp, ftype, tokenizer_json, sum(math.prod(o.ne) for o, _, _ in plan))
    del tokenizer_json  # the vocabulary's Python objects are not needed while tensors stream
    pre = kvs.pop("pre")
    with GGUFStreamWriter(out, kvs["kvs"], [o for o, _, _ in plan]) as gw:
        for o, src, heads in plan:
            gw.begin(o.name)
            for block in _blocks(src, heads, o.type.name):
                gw.append(block)
            gw.end()
            if on_tensor:
                on_tensor(o.name)
    return HFBaseResult(out, arch, len(plan), pre)


_Plan = list[tuple[OutTensor, "_Source | np.ndarray", int]]  # (output tensor, source or generated value, heads to permute by)


def _plan(folder: Path, hf_arch: str, arch: str, hp: dict[str, Any], sources: list[_Source], out_type: GGMLType) -> _Plan:
    """Every output tensor: llama.cpp name, shape, type, and where its values come from."""
    import gguf

    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(gguf_arch, hp["num_hidden_layers"])
    n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    plan: _Plan = []
    rope = llama3_rope_factors(hp) if arch == "llama" else None
    if rope is not None:
        plan.append((OutTensor("rope_freqs.weight", (rope.shape[0],), ggml_type("F32"), 1), rope, 0))
    seen: set[str] = set()
    for src in sources:
        new = names.get_name(src.hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise BadInput(
                f"{src.file.path}: tensor `{shown(src.hf_name)}` has no llama.cpp name for {arch}; is this a {hf_arch} checkpoint?"
            )
        if new in seen:
            raise BadInput(f"{folder}: two tensors map to `{new}`; {FIX}")
        seen.add(new)
        heads = 0
        if arch == "llama" and src.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif arch == "llama" and src.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        n_dims = len(src.shape)
        # as the reference: vectors, norms and biases stay F32 whatever the output type
        keep_f32 = n_dims <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight")
        ne = tuple(reversed(src.shape)) if src.shape else (1,)
        plan.append((OutTensor(new, ne, ggml_type("F32") if keep_f32 else out_type, max(n_dims, 1)), src, heads))
    return plan


def _collect_kvs(folder: Path, arch: str, hp: dict[str, Any], ftype: int, tokenizer_json: dict[str, Any], n_params: int) -> dict[str, Any]:
    """{"kvs": the KV records, "pre": the pre-tokenizer name}, gathered through a gguf.GGUFWriter
    (used only as a collector) so that keys, value types and order are the reference's."""
    import gguf

    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type(gguf.GGUFType.MODEL)
    meta = gguf.Metadata.load(None, folder, None, n_params)
    if meta.name is None:
        meta.name = folder.name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    meta.set_gguf_meta_model(w)
    add_hparams(w, arch, hp, ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch == "llama" and (folder / "tokenizer_config.json").is_file():
        tcfg = _read_json(folder / "tokenizer_config.json")
        if isinstance(tcfg, dict) and (aps := tcfg.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(aps)
    pre = add_gpt2_vocab(w, folder, hp.get("vocab_size"), tokenizer_json)
    if arch == "llama" and hp.get("vocab_size") == 49152:
        # the reference's rule for 49152-token vocabularies (Granite small, SmolLM2); it overwrites
        # the key in place, as GGUFWriter.add_key_value does (without its duplicate-key warning)
        w.kv_data[0][gguf.Keys.Tokenizer.ADD_BOS] = gguf.GGUFValue(False, GGUFValueType.BOOL)
    return {"kvs": _kv_records(w), "pre": pre}


def _blocks(src: _Source | np.ndarray, heads: int, type_name: str) -> Iterator[np.ndarray]:
    """The output bytes of one tensor, a block of rows at a time (a permuted tensor at once)."""
    from gguf import GGMLQuantizationType, quants

    qtype = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16}[type_name]
    if isinstance(src, np.ndarray):
        yield quants.quantize(src, qtype)
        return
    rows = src.shape[0] if src.shape else 1
    if heads:
        x = _permute_rows(_read(src, 0, rows), heads)
        yield quants.quantize(np.ascontiguousarray(x), qtype)
        return
    row_bytes = max(1, math.prod(src.shape[1:]) * 4) if src.shape else 4
    step = max(1, CHUNK_BYTES // row_bytes)
    for lo in range(0, rows, step):
        x = _read(src, lo, min(rows, lo + step)) if src.shape else _read(src, 0, 1)
        yield quants.quantize(x, qtype)
