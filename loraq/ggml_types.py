"""ggml tensor types and llama.cpp file types (ftypes), as llama.cpp numbers and names them.

Reference: llama-cpp.md §4.2 (ftypes, default types, type ids) and §5.1 (block sizes)."""

from __future__ import annotations

from dataclasses import dataclass

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


_TYPES = [
    GGMLType("f32", 0, 1, 4),
    GGMLType("f16", 1, 1, 2),
    GGMLType("q4_0", 2, 32, 18),
    GGMLType("q4_1", 3, 32, 20),
    GGMLType("q5_0", 6, 32, 22),
    GGMLType("q5_1", 7, 32, 24),
    GGMLType("q8_0", 8, 32, 34),
    GGMLType("q8_1", 9, 32, 36),
    GGMLType("q2_K", 10, 256, 84),
    GGMLType("q3_K", 11, 256, 110),
    GGMLType("q4_K", 12, 256, 144),
    GGMLType("q5_K", 13, 256, 176),
    GGMLType("q6_K", 14, 256, 210),
    GGMLType("q8_K", 15, 256, 292),
    GGMLType("iq2_xxs", 16, 256, 66),
    GGMLType("iq2_xs", 17, 256, 74),
    GGMLType("iq3_xxs", 18, 256, 98),
    GGMLType("iq1_s", 19, 256, 50),
    GGMLType("iq4_nl", 20, 32, 18),
    GGMLType("iq3_s", 21, 256, 110),
    GGMLType("iq2_s", 22, 256, 82),
    GGMLType("iq4_xs", 23, 256, 136),
    GGMLType("i8", 24, 1, 1),
    GGMLType("i16", 25, 1, 2),
    GGMLType("i32", 26, 1, 4),
    GGMLType("i64", 27, 1, 8),
    GGMLType("f64", 28, 1, 8),
    GGMLType("iq1_m", 29, 256, 56),
    GGMLType("bf16", 30, 1, 2),
    GGMLType("tq1_0", 34, 256, 54),
    GGMLType("tq2_0", 35, 256, 66),
]

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


# (name, llama_ftype id, default ggml type, llama_ftype_name), for the ftypes loraq implements
# and the K/IQ ones whose rules are already known (their quantizers arrive with the K-quant issue).
_FTYPES = [
    FileType("F32", 0, "f32", "all F32"),
    FileType("F16", 1, "f16", "F16"),
    FileType("BF16", 32, "bf16", "BF16"),
    FileType("Q4_0", 2, "q4_0", "Q4_0"),
    FileType("Q4_1", 3, "q4_1", "Q4_1"),
    FileType("Q5_0", 8, "q5_0", "Q5_0"),
    FileType("Q5_1", 9, "q5_1", "Q5_1"),
    FileType("Q8_0", 7, "q8_0", "Q8_0"),
    FileType("Q2_K", 10, "q2_K", "Q2_K - Medium"),
    FileType("Q2_K_S", 21, "q2_K", "Q2_K - Small"),
    FileType("Q3_K_S", 11, "q3_K", "Q3_K - Small"),
    FileType("Q3_K_M", 12, "q3_K", "Q3_K - Medium"),
    FileType("Q3_K_L", 13, "q3_K", "Q3_K - Large"),
    FileType("Q4_K_S", 14, "q4_K", "Q4_K - Small"),
    FileType("Q4_K_M", 15, "q4_K", "Q4_K - Medium"),
    FileType("Q5_K_S", 16, "q5_K", "Q5_K - Small"),
    FileType("Q5_K_M", 17, "q5_K", "Q5_K - Medium"),
    FileType("Q6_K", 18, "q6_K", "Q6_K"),
    FileType("IQ4_NL", 25, "iq4_nl", "IQ4_NL - 4.5 bpw"),
    FileType("IQ4_XS", 30, "iq4_xs", "IQ4_XS - 4.25 bpw"),
    FileType("TQ1_0", 36, "tq1_0", "TQ1_0 - 1.69 bpw ternary"),
    FileType("TQ2_0", 37, "tq2_0", "TQ2_0 - 2.06 bpw ternary"),
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
