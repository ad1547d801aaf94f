"""Importance-matrix files (loraq/quantize/imatrix_file.py) against their oracles.

- gguf-py reads loraq's GGUF imatrix as the layout of docs/llama-cpp.md §6.2 (KV types, tensor
  names, shapes, values).
- llama.cpp's own tools, when built (`python -m scripts.build_llama_tools`; found through
  $LORAQ_LLAMA_BIN or $LORAQ_CACHE/llama.cpp-build/bin, skipped with a reason otherwise):
  `llama-imatrix` run on SmolLM2 F16 over a few chunks of the GPL-3 text writes a file loraq reads
  and rewrites byte for byte, in GGUF and .dat; `llama-imatrix --in-file` merges and converts
  loraq's files into the bytes loraq's merge and writers produce.
- Hostile files: truncated, wrong shapes, NaN, huge or negative counts, bad names; each is one
  BadInput line from the reader and exit 4 with nothing written from `loraq quantize --imatrix`."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import hostile_files as H
from conftest import need
from loraq.cli import run_cli
from loraq.errors import BadArguments, BadInput
from loraq.quantize.imatrix_file import (
    ImatrixData,
    ImatrixEntry,
    merge_imatrix,
    quant_weights,
    quantize_kvs,
    read_imatrix,
    select_entries,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from scripts.build_llama_tools import bin_dir, tool

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def sample(seed: int = 0, chunk_size: int = 512, chunks: int = 6) -> ImatrixData:
    """Two dense entries and one MoE entry with an expert that saw no tokens, the way a
    collector leaves them: raw sums of squares and row counts."""
    rng = np.random.default_rng(seed)
    n = chunks * chunk_size

    def dense(cols: int) -> ImatrixEntry:
        mean = rng.lognormal(0, 1, (1, cols)).astype(np.float32)
        return ImatrixEntry((mean * np.float32(n)).astype(np.float32), np.array([n], np.float32))

    moe_counts = np.array([n // 2, 0, n // 3, n - n // 2 - n // 3], np.float32)
    moe = ImatrixEntry((rng.lognormal(0, 1, (4, 64)) * moe_counts[:, None]).astype(np.float32), moe_counts)
    entries = {"blk.1.attn_q.weight": dense(64), "blk.0.ffn_down.weight": dense(128), "blk.0.ffn_up_exps.weight": moe}
    return ImatrixData(entries, chunks, chunk_size, ["calib.txt"])


def same(a: ImatrixData, b: ImatrixData) -> None:
    assert sorted(a.entries) == sorted(b.entries)
    for k, e in a.entries.items():
        np.testing.assert_array_equal(e.sums, b.entries[k].sums, err_msg=k)
        np.testing.assert_array_equal(e.counts, b.entries[k].counts, err_msg=k)
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)


# ------------------------------------------------------------------------------------------------
# Layout and semantics (no native tools)
# ------------------------------------------------------------------------------------------------
def test_gguf_layout_as_gguf_py_reads_it(tmp_path):
    d = sample()
    p = write_imatrix_gguf(tmp_path / "m.gguf", d)
    r = gguf.GGUFReader(str(p))
    kvs = {f.name: f for f in r.fields.values() if not f.name.startswith("GGUF.")}
    assert list(kvs) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert kvs["general.type"].contents() == "imatrix"
    assert kvs["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert kvs["imatrix.datasets"].contents() == ["calib.txt"]
    for k, v in (("imatrix.chunk_count", 6), ("imatrix.chunk_size", 512)):
        assert kvs[k].types == [gguf.GGUFValueType.UINT32] and kvs[k].contents() == v
    names = [t.name for t in r.tensors]
    want = []
    for w in sorted(d.entries):  # byte order of the weight names, sums before counts
        want += [w + ".in_sum2", w + ".counts"]
    assert names == want
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        w, _, kind = t.name.rpartition(".")
        e = d.entries[w]
        if kind == "in_sum2":  # dense entries are 1-D, as ggml_n_dims drops the trailing 1
            assert list(t.shape) == ([e.n_col] if e.n_mat == 1 else [e.n_col, e.n_mat])
            np.testing.assert_array_equal(np.asarray(t.data).reshape(e.sums.shape), e.sums)
        else:
            assert list(t.shape) == ([1] if e.n_mat == 1 else [1, e.n_mat])
            np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), e.counts)
    back = read_imatrix(p, require_metadata=True)
    same(d, back)
    assert not back.legacy


def test_dat_layout_and_weights(tmp_path):
    """§6.3 field by field; the quant weights of the .dat agree with the GGUF's to float rounding
    (value = mean·ncall stored, divided by ncall again), and an expert with no tokens weighs 1."""
    d = sample()
    p = write_imatrix_dat(tmp_path / "m.dat", d)
    raw = p.read_bytes()
    (n,) = struct.unpack_from("<i", raw, 0)
    assert n == 3
    pos, names = 4, []
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", raw, pos)
        name = raw[pos + 4 : pos + 4 + ln].decode()
        ncall, nval = struct.unpack_from("<ii", raw, pos + 4 + ln)
        names.append(name)
        assert ncall == -(-int(d.entries[name].counts.max()) // 512) and nval == d.entries[name].sums.size
        pos += 4 + ln + 8 + 4 * nval
    assert names == sorted(d.entries)
    assert struct.unpack_from("<ii", raw, pos) == (6, 9) and raw[pos + 8 :] == b"calib.txt"
    leg = read_imatrix(p)
    assert leg.legacy and leg.chunk_count == 6 and leg.datasets == ["calib.txt"] and leg.chunk_size == 0
    wg, wd = quant_weights(d), quant_weights(leg)
    for k in d.entries:
        np.testing.assert_allclose(wd[k], wg[k], rtol=1e-6)
    assert (wg["blk.0.ffn_up_exps.weight"][64:128] == 1.0).all()
    assert (wd["blk.0.ffn_up_exps.weight"][64:128] == 1.0).all()


def test_quant_weights_division_is_float32():
    """llama-quantize: float(sums[k·n + i]) / float(counts[k]); legacy ncall 0 keeps the raw values."""
    sums = np.array([[1.0, 2.0, 3.0], [5.0, 7.0, 11.0]], np.float32)
    d = ImatrixData({"w": ImatrixEntry(sums, np.array([3, 7], np.float32))}, 1, 512, [])
    w = quant_weights(d)["w"]
    assert w.dtype == np.float32 and w.shape == (6,)
    assert w.tolist() == [np.float32(x) / np.float32(c) for x, c in ((1, 3), (2, 3), (3, 3), (5, 7), (7, 7), (11, 7))]
    leg = ImatrixData({"w": ImatrixEntry(sums[:1], np.array([0], np.float32))}, 0, 0, [], legacy=True)
    assert quant_weights(leg)["w"].tolist() == [1.0, 2.0, 3.0]


def test_counts_are_rounded_like_lround(tmp_path):
    d = sample()
    d.entries["blk.1.attn_q.weight"].counts[:] = 2.5  # lround: halves away from zero
    back = read_imatrix(write_imatrix_gguf(tmp_path / "m.gguf", d))
    assert back.entries["blk.1.attn_q.weight"].counts.tolist() == [3.0]


def test_merge_adds_sums_counts_and_datasets():
    a, b = sample(1), sample(2)
    b.datasets = ["more.txt"]
    m = merge_imatrix([a, b], 512)
    for k in a.entries:
        np.testing.assert_array_equal(m.entries[k].sums, a.entries[k].sums + b.entries[k].sums)
        np.testing.assert_array_equal(m.entries[k].counts, a.entries[k].counts + b.entries[k].counts)
    assert m.chunk_count == 12 and m.datasets == ["calib.txt", "more.txt"]
    b.entries["blk.1.attn_q.weight"] = ImatrixEntry(np.ones((1, 32), np.float32), np.ones(1, np.float32))
    with pytest.raises(BadInput, match="32 values in one file and 64"):
        merge_imatrix([a, b])


def test_include_exclude_are_substring_filters():
    d = sample()
    assert sorted(select_entries(d, include=["ffn_"]).entries) == ["blk.0.ffn_down.weight", "blk.0.ffn_up_exps.weight"]
    assert sorted(select_entries(d, include=["attn_q", "down"]).entries) == ["blk.0.ffn_down.weight", "blk.1.attn_q.weight"]
    assert sorted(select_entries(d, exclude=["blk.0."]).entries) == ["blk.1.attn_q.weight"]
    assert select_entries(d, include=["[a-z]"]).entries == {}  # a plain substring, not a regex
    with pytest.raises(BadArguments, match="cannot be used together"):
        select_entries(d, include=["a"], exclude=["b"])


def test_quantize_kvs_follow_llama_quantize():
    d = sample()
    d.datasets = ["x" * 200, "second"]
    kvs = quantize_kvs("dir/" + "é" * 100, d)
    assert [k for k, _, _ in kvs] == [
        "quantize.imatrix.file",
        "quantize.imatrix.dataset",
        "quantize.imatrix.entries_count",
        "quantize.imatrix.chunks_count",
    ]
    assert kvs[0][2] == ("dir/" + "é" * 100).encode()[:127]  # strncpy: 127 bytes, even mid-character
    assert kvs[1][2] == b"x" * 127
    assert kvs[2][1] == gguf.GGUFValueType.UINT32 and kvs[2][2] == 3
    assert kvs[3][2] == 6
    d.chunk_count, d.datasets = 0, []
    assert [k for k, _, _ in quantize_kvs("f", d)] == ["quantize.imatrix.file", "quantize.imatrix.entries_count"]
    assert quantize_kvs("f", select_entries(d, include=["nothing"])) == []


# ------------------------------------------------------------------------------------------------
# Hostile files
# ------------------------------------------------------------------------------------------------
META = [H.kv_arr("imatrix.datasets", H.STRING, 1, H.s("t.txt")), H.kv_u32("imatrix.chunk_count", 1), H.kv_u32("imatrix.chunk_size", 512)]


def _imat(tensors: list[tuple[str, tuple[int, ...], list[float]]], kvs: list[bytes] | None = None, tid: int = H.F32) -> bytes:
    infos, data = [], b""
    for name, ne, vals in tensors:
        body = struct.pack(f"<{len(vals)}f", *vals)
        infos.append(H.info(name, ne, tid, len(data)))
        data += body + b"\0" * (-len(body) % 32)
    return H.gguf(META if kvs is None else kvs, infos, data)


def _dat(entries: list[tuple[bytes, int, list[float]]], trailer: bytes = struct.pack("<ii", 1, 0), n: int | None = None) -> bytes:
    out = struct.pack("<i", len(entries) if n is None else n)
    for name, ncall, vals in entries:
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, len(vals)) + struct.pack(f"<{len(vals)}f", *vals)
    return out + trailer


W = "blk.0.attn_q.weight"


def _head(nval: int) -> bytes:
    """One entry's header claiming `nval` values, followed by 16 bytes."""
    return struct.pack("<ii", 1, len(W)) + W.encode() + struct.pack("<ii", 1, nval) + b"\0" * 16


GOOD_GGUF = _imat([(W + ".in_sum2", (4,), [1, 2, 3, 4]), (W + ".counts", (1,), [2])])
GOOD_DAT = _dat([(W.encode(), 1, [1, 2, 3, 4])])
NAN = float("nan")

HOSTILE = [
    ("gguf-truncated", GOOD_GGUF[:-40], "truncated"),
    ("gguf-no-tensors", H.gguf(META, []), "no tensors"),
    ("gguf-model-file", H.model(), "no .in_sum2/.counts tensors"),
    ("gguf-unpaired", _imat([(W + ".in_sum2", (4,), [1, 2, 3, 4])]), "has no counts"),
    ("gguf-f16", _imat([(W + ".in_sum2", (4,), [1, 2]), (W + ".counts", (2,), [2])], tid=H.F16), "must be f32"),
    ("gguf-shape-mismatch", _imat([(W + ".in_sum2", (5,), [1, 2, 3, 4, 5]), (W + ".counts", (1, 2), [2, 2])]), "5 sums for 2 counts"),
    ("gguf-nan-sum", _imat([(W + ".in_sum2", (4,), [1, NAN, 3, 4]), (W + ".counts", (1,), [2])]), "nan or infinite sum"),
    ("gguf-negative-sum", _imat([(W + ".in_sum2", (4,), [1, -2, 3, 4]), (W + ".counts", (1,), [2])]), "negative sum"),
    ("gguf-huge-count", _imat([(W + ".in_sum2", (4,), [1, 2, 3, 4]), (W + ".counts", (1,), [1e30])]), "count that is negative"),
    ("gguf-nan-count", _imat([(W + ".in_sum2", (4,), [1, 2, 3, 4]), (W + ".counts", (1,), [NAN])]), "count that is negative"),
    (
        "gguf-chunk-count-not-u32",
        _imat(
            [(W + ".in_sum2", (4,), [1, 2, 3, 4]), (W + ".counts", (1,), [2])], [*META[:1], H.kv_str("imatrix.chunk_count", "1"), META[2]]
        ),
        "imatrix.chunk_count must be a uint32",
    ),
    ("gguf-no-metadata", _imat([(W + ".in_sum2", (4,), [1, 2, 3, 4]), (W + ".counts", (1,), [2])], []), "metadata"),
    ("dat-empty", b"", "too short"),
    ("dat-zero-entries", _dat([]), "neither a gguf file"),
    ("dat-entries-huge", _dat([(W.encode(), 1, [1.0])], n=1 << 30), "neither a gguf file"),
    ("dat-truncated-values", GOOD_DAT[:30], "truncated"),
    ("dat-nval-huge", _head(1 << 30), "claims 1073741824 values"),
    ("dat-nval-negative", _head(-1), "claims -1 values"),
    ("dat-name-negative", struct.pack("<ii", 1, -5) + b"\0" * 40, "name of -5 bytes"),
    ("dat-name-long", _dat([(b"x" * 64, 1, [1.0])]), "name of 64 bytes"),
    ("dat-name-not-utf8", _dat([(b"w\xff", 1, [1.0])]), "not utf-8"),
    ("dat-duplicate", _dat([(b"w", 1, [1.0]), (b"w", 1, [1.0])]), "appears twice"),
    ("dat-nan", _dat([(W.encode(), 1, [1.0, NAN])]), "nan or infinite"),
    ("dat-ncall-negative", _dat([(W.encode(), -3, [1.0])]), "count that is negative"),
    ("dat-trailing-garbage", GOOD_DAT + b"\1\2\3", "unexpected bytes"),
    ("dat-trailer-cut", GOOD_DAT[:-2], "truncated"),
]


@pytest.mark.parametrize("raw,fragment", [pytest.param(r, f, id=i) for i, r, f in HOSTILE])
def test_hostile_imatrix_is_one_bad_input_line(tmp_path, raw, fragment):
    p = tmp_path / "bad.imatrix"
    p.write_bytes(raw)
    with pytest.raises(BadInput) as exc:
        read_imatrix(p, require_metadata=True)
    msg = str(exc.value)
    assert "\n" not in msg and fragment in msg.lower(), msg


def test_good_hostile_baselines_parse(tmp_path):
    """The rows above differ from these valid files only in what each breaks."""
    (tmp_path / "g").write_bytes(GOOD_GGUF)
    (tmp_path / "d").write_bytes(GOOD_DAT)
    g, d = read_imatrix(tmp_path / "g", require_metadata=True), read_imatrix(tmp_path / "d")
    assert g.entries[W].sums.tolist() == [[1, 2, 3, 4]] and g.entries[W].counts.tolist() == [2]
    assert d.legacy and d.entries[W].counts.tolist() == [1] and d.chunk_count == 1


@pytest.mark.parametrize("raw,fragment", [pytest.param(r, f, id=i) for i, r, f in HOSTILE])
def test_cli_rejects_hostile_imatrix_and_writes_nothing(tmp_path, capsys, raw, fragment):
    """Through the command line: exit 4, one stderr line, no output and no temporary file."""
    model = H.write(tmp_path / "m.gguf", H.model([(W, (32, 4)), ("output_norm.weight", (32,))]))
    bad = H.write(tmp_path / "bad.imatrix", raw)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_cli(["quantize", str(model), str(tmp_path / "out.gguf"), "Q8_0", "--imatrix", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and fragment in err[0].lower(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------------
# llama.cpp's own tools
# ------------------------------------------------------------------------------------------------
def _tool(name: str) -> Path:
    p = tool(name)
    if p is None:  # a dev-only build; CI machines don't have it, so this skips there too
        pytest.skip(f"{name} is not built in {bin_dir()}; run `python -m scripts.build_llama_tools` (dev only)")
    return p


def _run(argv: list[str | Path]) -> None:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{argv[0]} failed ({r.returncode}): {r.stderr[-2000:]}"


@pytest.mark.interop
def test_llama_imatrix_roundtrips_loraq_files(tmp_path):
    """`llama-imatrix --in-file` (no text: it only loads, merges and saves; -m is required but not
    loaded) rewrites loraq's GGUF
    byte for byte, converts loraq's .dat as loraq's merge does, and merges two files as loraq does."""
    exe = _tool("llama-imatrix")
    merge_only = [exe, "-m", tmp_path / "no-model.gguf", "-c", "128"]
    a, b = sample(1, 128, 4), sample(2, 128, 3)
    b.datasets = ["other.txt"]
    fa, fb, fd = (
        write_imatrix_gguf(tmp_path / "a.gguf", a),
        write_imatrix_gguf(tmp_path / "b.gguf", b),
        write_imatrix_dat(tmp_path / "a.dat", a),
    )
    _run([*merge_only, "--in-file", fa, "-o", tmp_path / "theirs-a.gguf"])
    assert (tmp_path / "theirs-a.gguf").read_bytes() == fa.read_bytes()
    _run([*merge_only, "--in-file", fa, "--in-file", fb, "-o", tmp_path / "theirs-ab.gguf"])
    mine = write_imatrix_gguf(tmp_path / "ab.gguf", merge_imatrix([read_imatrix(fa), read_imatrix(fb)], 128))
    assert (tmp_path / "theirs-ab.gguf").read_bytes() == mine.read_bytes()
    _run([*merge_only, "--in-file", fd, "-o", tmp_path / "theirs-d.gguf"])
    mine = write_imatrix_gguf(tmp_path / "d.gguf", merge_imatrix([read_imatrix(fd)], 128))
    assert (tmp_path / "theirs-d.gguf").read_bytes() == mine.read_bytes()
    _run([*merge_only, "--in-file", fa, "--output-format", "dat", "-o", tmp_path / "theirs-a.dat"])
    assert (tmp_path / "theirs-a.dat").read_bytes() == fd.read_bytes()


@pytest.mark.interop
@pytest.mark.real
def test_llama_imatrix_output_reads_and_rewrites_identically(smollm2_f16, tmp_path):
    """A real llama-imatrix run (SmolLM2 F16, 4 chunks of 128 tokens of the GPL-3 text):
    loraq reads it and its writers reproduce the tool's GGUF and .dat files byte for byte."""
    exe = _tool("llama-imatrix")
    need(GPL3.is_file(), f"{GPL3} is missing")
    common = [exe, "-m", smollm2_f16, "-f", GPL3, "-c", "128", "--chunks", "4", "-t", "2", "--no-ppl"]
    _run([*common, "-o", tmp_path / "theirs.gguf"])
    _run([*common, "--output-format", "dat", "-o", tmp_path / "theirs.dat"])
    d = read_imatrix(tmp_path / "theirs.gguf", require_metadata=True)
    assert d.chunk_count == 4 and d.chunk_size == 128 and d.datasets == [str(GPL3)]
    assert all(n.startswith("blk.") for n in d.entries) and len(d.entries) == 30 * 7
    assert {int(e.counts[0]) for e in d.entries.values()} == {4 * 128}
    assert (write_imatrix_gguf(tmp_path / "mine.gguf", d).read_bytes()) == (tmp_path / "theirs.gguf").read_bytes()
    assert (write_imatrix_dat(tmp_path / "mine.dat", d).read_bytes()) == (tmp_path / "theirs.dat").read_bytes()
    leg = read_imatrix(tmp_path / "theirs.dat")
    assert leg.legacy and sorted(leg.entries) == sorted(d.entries) and leg.chunk_count == 4
