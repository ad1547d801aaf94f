"""loraq's ggml type and ftype facts agree with native ggml (libgguf) and with gguf-py."""

from __future__ import annotations

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from loraq.ggml_types import _TYPES, FTYPES, GGMLType, file_type, ggml_type

libgguf = pytest.importorskip("libgguf")


@pytest.mark.parametrize("t", _TYPES, ids=lambda t: t.name)
def test_type_matches_ggml(t: GGMLType):
    assert libgguf.type_name(t.id) == t.name  # ggml_type_name
    assert libgguf.type_size(t.id) == t.nbytes  # ggml_type_size
    if libgguf.row_size(t.id, t.block):  # ggml_row_size; 0 for types libgguf does not store
        assert libgguf.row_size(t.id, 4 * t.block) == t.row_bytes(4 * t.block)
    assert ggml_type(t.name.upper()) is ggml_type(t.id) is t


def test_types_match_gguf_py():
    assert [t.id for t in _TYPES] == [q.value for q in GGMLQuantizationType]
    for t in _TYPES:
        q = GGMLQuantizationType(t.id)
        assert q.name == t.name.upper()
        if q != GGMLQuantizationType.Q8_1:  # gguf-py's 40 bytes is wrong: ggml says 36
            assert GGML_QUANT_SIZES[q] == (t.block, t.nbytes)


@pytest.mark.parametrize("name", list(FTYPES))
def test_ftype_matches_gguf_py(name: str):
    f = file_type(name)
    assert LlamaFileType(f.id).name == ("ALL_F32" if name == "F32" else "MOSTLY_" + name)
    assert ggml_type(f.default).name == f.default


def test_known_facts():
    """A few numbers fixed by llama.cpp, so that a wrong source cannot agree with itself."""
    assert (ggml_type("q4_K").id, ggml_type("q4_K").nbytes, ggml_type("q8_0").nbytes) == (12, 144, 34)
    assert (file_type("Q4_K_M").id, file_type("q4_k").id, file_type("BF16").id, file_type("Q8_0").id) == (15, 15, 32, 7)
