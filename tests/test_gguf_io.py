"""loraq's GGUF header parser against gguf-py's GGUFReader (the ecosystem's reader) on real files,
and its rejection of damaged files."""

from __future__ import annotations

import itertools
import os

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


def test_writeback_starts_only_on_written_bytes(tmp_path, monkeypatch):
    """The writer hands finished ranges to the disk early (atomic.start_writeback): contiguous from
    byte 0, each ending at a tensor's end, each already holding its final bytes when handed over
    (also those another writer put there with pwrite, as the quantizer's threads do)."""
    from loraq.ggml_types import ggml_type
    from loraq.gguf_io import writer as wmod

    f32 = ggml_type("f32")
    shapes = [(64, 3), (16, 1), (128, 5), (32, 2)]
    tensors = [wmod.OutTensor(f"t{i}", ne, f32) for i, ne in enumerate(shapes)]
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(ne[::-1]).astype(np.float32) for ne in shapes]
    calls: list[tuple[int, int, bytes]] = []
    monkeypatch.setattr(wmod, "_WRITEBACK_BYTES", 600)

    def seen(fd: int, off: int, n: int) -> None:  # the descriptor is write-only: read through /proc
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            f.seek(off)
            calls.append((off, n, f.read(n)))

    monkeypatch.setattr(wmod, "start_writeback", seen)
    out = tmp_path / "w.gguf"
    with wmod.GGUFStreamWriter(out, wmod.KVList(), tensors) as w:
        for i, (t, a) in enumerate(zip(tensors, data)):
            if i == 2:  # as the quantizer: the bytes pwritten into the temporary, then accounted for
                _, fd, off = w.region(t.name)
                os.pwrite(fd, a.tobytes(), off)
                w.begin(t.name)
                w.skip(a.nbytes)
                w.end()
            else:
                w.write(t.name, a)
    final = out.read_bytes()
    assert len(calls) >= 2
    assert calls[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(calls))
    ends = {w._offsets[t.name] + wmod._pad(t.nbytes) for t in tensors}
    for off, n, seen in calls:
        assert off + n in ends and seen == final[off : off + n]
