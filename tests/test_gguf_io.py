"""loraq's GGUF header parser against gguf-py's GGUFReader (the ecosystem's reader) on real files,
and its rejection of damaged files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from loraq.errors import BadInput
from loraq.gguf_io import open_gguf


def _check_same(path):
    ref = gguf.GGUFReader(str(path))
    f = open_gguf(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(f.kvs) == keys
    for k in keys:
        field = ref.fields[k]
        n = sum(int(p.nbytes) for p in field.parts)
        assert f.kvs[k].raw == ref.data[field.offset : field.offset + n].tobytes(), k
        assert f.kvs[k].vtype == int(field.types[0]), k
        want = field.contents()
        got = f.kvs[k].value
        if isinstance(want, float):
            assert np.float32(want) == np.float32(got), k
        else:
            assert got == want, k
    assert [t.name for t in f.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(f.tensors, ref.tensors):
        assert t.ne == tuple(int(x) for x in r.shape) and t.type.id == int(r.tensor_type)
        assert t.offset == int(r.data_offset) and t.nbytes == int(r.n_bytes)
        assert np.array_equal(f.read_raw(t), np.asarray(r.data).view(np.uint8).reshape(-1))


@pytest.mark.slow  # gguf-py reads every tensor of the real models
def test_header_matches_gguf_py_on_real_models(smollm2_q4_1, smollm2_f16, synth256):
    for p in (smollm2_q4_1, smollm2_f16, synth256):
        _check_same(p)


@pytest.mark.parametrize("cut", [3, 30, 1000, 200_000, -5])
def test_damaged_files_are_bad_input(smollm2_f16, tmp_path, cut):
    data = smollm2_f16.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:cut])
    with pytest.raises(BadInput):
        open_gguf(p)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(BadInput, match="not a readable GGUF"):
        open_gguf(p)
