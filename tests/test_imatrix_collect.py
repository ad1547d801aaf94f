"""Importance-matrix collection (loraq/imatrix/collect.py, `loraq imatrix`).

Oracle: llama.cpp's own `llama-imatrix`, built from the llama-cpp-python 0.3.36 sdist (the same
llama.cpp tree as the bindings) by `python -m scripts.build_llama_tools` — a CPU-only Release cmake
build of vendor/llama.cpp into $LORAQ_CACHE/llama.cpp-build/bin. The tests find it through
$LORAQ_LLAMA_BIN (a folder) or that folder and skip with the reason when it is absent (CI has no
native build). They run it as `llama-imatrix -m MODEL -f TEXT -c CTX --chunks N -t 2 --no-ppl -o
OUT.gguf` (its default output format in this version is GGUF; counts are stored raw, as F32
rows-seen, one per matrix) and compare: the same tensor names, the same counts, chunk count and
chunk size, and every column's Σx² within 1 % relative.

Without the tool, the collection's llama-imatrix rules are checked by properties that a wrong
collector breaks: which names (every blk.* matmul weight, output.weight only untied and only with
--process-output, LoRA A/B entries), counts = chunks·ctx, q/k/v and gate/up equal (one input),
the BOS replacement at each chunk start, the CLI's outputs and errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from loraq.cli import run_cli
from loraq.convert import convert_adapter
from loraq.errors import BadArguments
from loraq.gguf_io import GGUFStreamWriter, KVList, open_gguf
from loraq.imatrix.collect import collect_imatrix
from loraq.quantize.imatrix_file import ImatrixData, read_imatrix
from scripts import build_llama_tools, make_demo_adapter, make_synthetic_model

GPL3 = Path("/usr/share/common-licenses/GPL-3")
TEXT = " ".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs, and then it rests." for i in range(400))


def _imatrix_tool() -> Path:
    p = build_llama_tools.tool("llama-imatrix")
    if p is None:
        pytest.skip(f"llama-imatrix not built in {build_llama_tools.bin_dir()}: run `python -m scripts.build_llama_tools` (dev only)")
    return p


def _native(model: Path, text: Path, ctx: int, chunks: int, out: Path, extra: tuple[str, ...] = ()) -> ImatrixData:
    cmd = [str(_imatrix_tool()), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", "2", "--no-ppl"]
    res = subprocess.run([*cmd, *extra, "-o", str(out)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    return read_imatrix(out)


def _agree(ours: ImatrixData, theirs: ImatrixData, rtol: float = 0.01, floor: float = 1e-3) -> float:
    """Same names, counts and chunk metadata; each column's Σx² within rtol of llama-imatrix's,
    relative to max(its value, floor × the tensor's median column). Returns the worst.

    The floor is for near-dead columns: on SmolLM2 one column of blk.18.attn_output (Σx² 5e-4
    against a median of 63, an attention output that cancels) differs by 6.7 %; llama-imatrix's
    own two attention paths (-fa on / off) disagree there by 0.6 %, ten times their worst
    elsewhere. Such a column's weight is ~0 to the quantizer either way."""
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    worst = 0.0
    for name, a in ours.entries.items():
        b = theirs.entries[name]
        assert a.sums.shape == b.sums.shape, name
        np.testing.assert_array_equal(a.counts, b.counts, err_msg=name)
        ref = np.maximum(np.abs(b.sums).astype(np.float64), floor * np.median(np.abs(b.sums), axis=1, keepdims=True))
        rel = np.abs(a.sums.astype(np.float64) - b.sums) / np.maximum(ref, 1e-30)
        worst = max(worst, float(rel.max()))
        assert rel.max() < rtol, f"{name}: column {int(rel.argmax())} differs by {rel.max():.3%}"
    return worst


@pytest.fixture(scope="module")
def synth_bos(smollm2_q4_1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, n_embd 256, untied output.weight, and a vocabulary that adds BOS (SmolLM2's does
    not), so the chunk-start BOS and --process-output both matter."""
    d = tmp_path_factory.mktemp("synth_bos")
    kvs = KVList()
    with open_gguf(smollm2_q4_1) as g:
        for k, kv in g.kvs.items():
            if k.startswith("tokenizer."):
                kvs.set_raw(k, kv.raw)
    from gguf import GGUFValueType as V

    kvs.set("tokenizer.ggml.add_bos_token", V.BOOL, True)
    vocab = d / "vocab.gguf"
    with GGUFStreamWriter(vocab, kvs, []):
        pass
    return make_synthetic_model.make_model(d / "synth-bos.gguf", vocab, n_layer=2, tied=False)


@pytest.fixture(scope="module")
def synth_lora(synth_bos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth_lora")
    peft = make_demo_adapter.make_adapter(synth_bos, d / "peft", rank=8, targets=["q_proj", "v_proj", "down_proj"])
    out = d / "lora.gguf"
    convert_adapter(peft, synth_bos, out, outtype="f32")
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text(TEXT + "\n", encoding="utf-8")
    return p


# -- against llama-imatrix -------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_gpl3_matches_llama_imatrix(smollm2_f16: Path, tmp_path: Path) -> None:
    """Must-show 2: SmolLM2 F16, the GPL-3 text, -c 256 --chunks 4."""
    tool = _imatrix_tool()
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} not on this system")
    theirs = _native(smollm2_f16, GPL3, 256, 4, tmp_path / "native.gguf")
    assert tool and theirs.chunk_size == 256 and theirs.chunk_count == 4
    assert all(float(e.counts[0]) == 4 * 256 for e in theirs.entries.values())
    ours = collect_imatrix(smollm2_f16, GPL3, 256, 4, threads=2).data
    _agree(ours, theirs)


def test_bos_output_and_lora_match_llama_imatrix(synth_bos: Path, synth_lora: Path, text_file: Path, tmp_path: Path) -> None:
    """A BOS-adding vocabulary, an untied output.weight with --process-output, and a runtime LoRA
    (whose A/B matmuls llama-imatrix collects as '<W>.lora_a' / '<W>.lora_b')."""
    _imatrix_tool()
    theirs = _native(synth_bos, text_file, 64, 3, tmp_path / "n.gguf", ("--process-output", "--lora", str(synth_lora)))
    assert "output.weight" in theirs.entries and "blk.0.attn_q.weight.lora_a" in theirs.entries
    ours = collect_imatrix(synth_bos, text_file, 64, 3, adapters=[(synth_lora, 1.0)], process_output=True, threads=2).data
    _agree(ours, theirs)


# -- llama-imatrix's rules, without the tool ------------------------------------------------------
def test_names_counts_and_shared_inputs(synth_bos: Path, synth_lora: Path, text_file: Path) -> None:
    res = collect_imatrix(synth_bos, text_file, 32, 3, adapters=[(synth_lora, 1.0)])
    d = res.data
    with open_gguf(synth_bos) as g:
        mats = {t.name for t in g.tensors if t.name.startswith("blk.") and len(t.ne) == 2}
    with open_gguf(synth_lora) as g:
        loras = {t.name for t in g.tensors if t.name.startswith("blk.")}  # <W>.lora_a, <W>.lora_b
    assert set(d.entries) == mats | loras  # no token_embd, no output.weight without --process-output
    assert (d.chunk_count, d.chunk_size, res.tokens) == (3, 32, 96)
    for e in d.entries.values():
        assert e.counts.tolist() == [96.0] and e.sums.dtype == np.float32 and (e.sums > 0).all()
    for i in range(2):
        q = d.entries[f"blk.{i}.attn_q.weight"].sums
        np.testing.assert_array_equal(q, d.entries[f"blk.{i}.attn_k.weight"].sums)
        np.testing.assert_array_equal(q, d.entries[f"blk.{i}.attn_v.weight"].sums)
        np.testing.assert_array_equal(q, d.entries[f"blk.{i}.attn_q.weight.lora_a"].sums)
        np.testing.assert_array_equal(d.entries[f"blk.{i}.ffn_gate.weight"].sums, d.entries[f"blk.{i}.ffn_up.weight"].sums)
        assert d.entries[f"blk.{i}.ffn_down.weight"].sums.shape == (1, 768)
        assert d.entries[f"blk.{i}.attn_q.weight.lora_b"].sums.shape == (1, 8)
    assert d.datasets == [str(text_file)]


def test_worker_threads_fold_groups_in_order(synth_bos: Path, synth_lora: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 threads the engine runs chunk groups on worker threads and the accumulator folds them
    in group order: the same names and counts as one thread, the sums equal up to the GEMMs' ulps,
    and two threaded runs bit-identical whichever thread ran which group. (The GEMMs group rows
    differently, and an ulp there can move an emulated Q8_0 activation by a step: ~1e-4 relative;
    a group dropped or counted twice would move the sums by a sixth.)"""
    from loraq.llama.engine import Engine

    used: list[int] = []
    workers = Engine._workers
    monkeypatch.setattr(Engine, "_workers", lambda self, n, w: used.append(workers(self, n, w)) or used[-1])
    args = (synth_bos, text_file, 32, 6)
    kw = {"adapters": [(synth_lora, 1.0)], "process_output": True}
    one = collect_imatrix(*args, threads=1, **kw).data
    two = collect_imatrix(*args, threads=2, **kw).data
    again = collect_imatrix(*args, threads=2, **kw).data
    assert used == [1, 2, 2]
    assert sorted(one.entries) == sorted(two.entries) and "output.weight" in two.entries
    for name, e in one.entries.items():
        assert e.counts.tolist() == two.entries[name].counts.tolist() == [192.0], name
        np.testing.assert_allclose(two.entries[name].sums, e.sums, rtol=1e-3, err_msg=name)
        np.testing.assert_array_equal(again.entries[name].sums, two.entries[name].sums, err_msg=name)


def test_process_output_only_untied(synth_bos: Path, synth256: Path, text_file: Path) -> None:
    with_out = collect_imatrix(synth_bos, text_file, 32, 2, process_output=True).data
    assert with_out.entries["output.weight"].sums.shape == (1, 256)
    tied = collect_imatrix(synth256, text_file, 32, 2, process_output=True).data
    assert not any(n in tied.entries for n in ("output.weight", "token_embd.weight"))


def test_each_chunk_starts_with_bos(synth_bos: Path, tmp_path: Path) -> None:
    """Two texts that differ only in the first token of chunk 1 give the same statistics (it is
    replaced by BOS); with another ctx, where that token is inside a chunk, they differ."""
    from loraq.llama.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(synth_bos)
    ctx = 32
    prefix = "the" + " the" * (ctx - 2)  # BOS + 31 one-token words: the next word starts chunk 1
    rest = " quick brown fox jumps over the lazy dog" * 8
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(f"{prefix} cat{rest}", encoding="utf-8")
    b.write_text(f"{prefix} dog{rest}", encoding="utf-8")
    ta, tb = tok.encode(a.read_text()), tok.encode(b.read_text())
    assert ta[0] == tok.bos_id and ta[:ctx] == tb[:ctx] and ta[ctx] != tb[ctx] and ta[ctx + 1 : 2 * ctx] == tb[ctx + 1 : 2 * ctx]

    def sums(text: Path, c: int) -> dict[str, np.ndarray]:
        return {k: e.sums for k, e in collect_imatrix(synth_bos, text, c, 2).data.entries.items()}

    sa, sb = sums(a, ctx), sums(b, ctx)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    sa, sb = sums(a, ctx + 4), sums(b, ctx + 4)
    assert not all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_cli_writes_gguf_and_dat(synth256: Path, text_file: Path, tmp_path: Path) -> None:
    g, d = tmp_path / "im.gguf", tmp_path / "im.dat"
    assert run_cli(["imatrix", str(synth256), "-f", str(text_file), "-o", str(g), "-c", "32", "--chunks", "2", "-t", "1"]) == 0
    assert run_cli(["imatrix", str(synth256), "-f", str(text_file), "-o", str(d), "-c", "32", "--chunks", "2", "-t", "1"]) == 0
    a, b = read_imatrix(g), read_imatrix(d)
    assert not a.legacy and b.legacy and (a.chunk_count, a.chunk_size) == (2, 32)
    assert sorted(a.entries) == sorted(b.entries)
    for n, e in a.entries.items():  # .dat holds mean·ncall with ncall = ceil(64/32) = 2
        np.testing.assert_allclose(b.entries[n].sums, e.sums / e.counts[:, None] * 2, rtol=1e-6)


def test_chat_jsonl_calibration(synth256: Path, tmp_path: Path) -> None:
    """A JSONL of conversations goes through the model's chat template into the same collection."""
    import json

    f = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "What is a fox?"}, {"role": "assistant", "content": "A small wild canid. " * 6}]
    f.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(4)), encoding="utf-8")
    res = collect_imatrix(synth256, f, 32, 3)
    assert res.kind == "chat" and res.tokens == 96 and res.data.chunk_count == 3
    assert all(e.counts.tolist() == [96.0] for e in res.data.entries.values())


def test_errors(synth256: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BadArguments, match="fewer than one chunk"):
        collect_imatrix(synth256, text_file, 1 << 16, 1)
    assert run_cli(["imatrix", str(synth256), "-f", str(text_file), "-o", str(text_file), "-c", "32"]) == 2  # over its input
    assert run_cli(["imatrix", str(synth256), "-f", str(text_file), "-o", str(tmp_path / "x.gguf"), "-c", "0"]) == 2
    assert run_cli(["imatrix", str(synth256), "-f", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x.gguf")]) != 0
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
