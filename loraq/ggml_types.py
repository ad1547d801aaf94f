"""ggml tensor types and llama.cpp file types (ftypes), as llama.cpp numbers and names them.

Type ids, block sizes and ftype ids come from gguf-py (llama.cpp's own Python package); the
default type and name of each ftype from llama.cpp's source.
Reference: docs/llama-cpp.md §4.2 (ftypes, default types, type ids) and §5.1 (block sizes)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .errors import BadArguments


@dataclass(frozen=True)
class GGMLType:
    name: str  # ggml_type_name, e.g. "q4_K"
    id: int  # the number stored in GGUF tensor infos
    block: int  # elements per block
    nbytes: int  # bytes per block

    @property
    def quantized(self) -> bool:
        return self.name not in ("f32", "f16", "bf16")

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.nbytes

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / self.block


def _ggml_name(q: GGMLQuantizationType) -> str:
    """ggml_type_name: gguf-py's enum name in lower case, except the K of the K-quants."""
    name = q.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


# gguf-py sizes q8_1 with float32 d and s (40 bytes); ggml's block_q8_1 holds two halves (36)
_SIZE_FIX = {GGMLQuantizationType.Q8_1: (32, 36)}
_TYPES = [GGMLType(_ggml_name(q), q.value, *_SIZE_FIX.get(q, GGML_QUANT_SIZES[q])) for q in GGMLQuantizationType]

BY_ID: dict[int, GGMLType] = {t.id: t for t in _TYPES}
BY_NAME: dict[str, GGMLType] = {t.name.lower(): t for t in _TYPES}

F32, F16, BF16 = BY_NAME["f32"], BY_NAME["f16"], BY_NAME["bf16"]


def ggml_type(name_or_id: str | int | GGMLType) -> GGMLType:
    """Look a type up by ggml name (case-insensitive, e.g. 'q6_K', 'Q8_0') or id."""
    if isinstance(name_or_id, GGMLType):
        return name_or_id
    if isinstance(name_or_id, int):
        if name_or_id in BY_ID:
            return BY_ID[name_or_id]
        raise BadArguments(f"unknown ggml tensor type id {name_or_id}")
    t = BY_NAME.get(name_or_id.lower())
    if t is None:
        raise BadArguments(f"unknown tensor type '{name_or_id}'; expected one of: " + ", ".join(sorted(x.name for x in _TYPES)))
    return t


@dataclass(frozen=True)
class FileType:
    name: str  # llama-quantize's name, e.g. "Q4_K_M"
    id: int  # llama_ftype, stored as general.file_type
    default: str  # llama_ftype_get_default_type, a ggml type name
    description: str  # llama_ftype_name


def _ftype(name: str, default: str, description: str) -> FileType:
    return FileType(name, LlamaFileType["ALL_F32" if name == "F32" else "MOSTLY_" + name].value, default, description)


# (name, default ggml type, llama_ftype_name) for every ftype whose rules loraq knows; an ftype
# whose mix needs a type loraq cannot write yet (kernels.can_quantize) fails per tensor, naming it.
_FTYPES = [
    _ftype("F32", "f32", "all F32"),
    _ftype("F16", "f16", "F16"),
    _ftype("BF16", "bf16", "BF16"),
    _ftype("Q4_0", "q4_0", "Q4_0"),
    _ftype("Q4_1", "q4_1", "Q4_1"),
    _ftype("Q5_0", "q5_0", "Q5_0"),
    _ftype("Q5_1", "q5_1", "Q5_1"),
    _ftype("Q8_0", "q8_0", "Q8_0"),
    _ftype("Q2_K", "q2_K", "Q2_K - Medium"),
    _ftype("Q2_K_S", "q2_K", "Q2_K - Small"),
    _ftype("Q3_K_S", "q3_K", "Q3_K - Small"),
    _ftype("Q3_K_M", "q3_K", "Q3_K - Medium"),
    _ftype("Q3_K_L", "q3_K", "Q3_K - Large"),
    _ftype("Q4_K_S", "q4_K", "Q4_K - Small"),
    _ftype("Q4_K_M", "q4_K", "Q4_K - Medium"),
    _ftype("Q5_K_S", "q5_K", "Q5_K - Small"),
    _ftype("Q5_K_M", "q5_K", "Q5_K - Medium"),
    _ftype("Q6_K", "q6_K", "Q6_K"),
    _ftype("IQ2_XXS", "iq2_xxs", "IQ2_XXS - 2.0625 bpw"),
    _ftype("IQ2_XS", "iq2_xs", "IQ2_XS - 2.3125 bpw"),
    _ftype("IQ2_S", "iq2_xs", "IQ2_S - 2.5 bpw"),
    _ftype("IQ2_M", "iq2_s", "IQ2_M - 2.7 bpw"),
    _ftype("IQ1_S", "iq1_s", "IQ1_S - 1.5625 bpw"),
    _ftype("IQ1_M", "iq1_m", "IQ1_M - 1.75 bpw"),
    _ftype("IQ3_XXS", "iq3_xxs", "IQ3_XXS - 3.0625 bpw"),
    _ftype("IQ3_XS", "iq3_s", "IQ3_XS - 3.3 bpw"),
    _ftype("IQ3_S", "iq3_s", "IQ3_S - 3.4375 bpw"),
    _ftype("IQ3_M", "iq3_s", "IQ3_S mix - 3.66 bpw"),
    _ftype("IQ4_NL", "iq4_nl", "IQ4_NL - 4.5 bpw"),
    _ftype("IQ4_XS", "iq4_xs", "IQ4_XS - 4.25 bpw"),
    _ftype("TQ1_0", "tq1_0", "TQ1_0 - 1.69 bpw ternary"),
    _ftype("TQ2_0", "tq2_0", "TQ2_0 - 2.06 bpw ternary"),
]
_FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

FTYPES: dict[str, FileType] = {f.name: f for f in _FTYPES}
FTYPE_BY_ID: dict[int, FileType] = {f.id: f for f in _FTYPES}


def file_type(name: str) -> FileType:
    """An ftype by llama-quantize's name (case-insensitive, aliases Q4_K etc. accepted)."""
    key = name.upper()
    key = _FTYPE_ALIASES.get(key, key)
    if key in FTYPES:
        return FTYPES[key]
    raise BadArguments(f"unknown quantization type '{name}'; expected one of: {', '.join(FTYPES)}")
