"""Size-targeted mixes: the knapsack against exhaustive search, the loss prediction against the
error measured on the dequantized tensor, and the --tensor-type-file format llama-quantize reads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraq.errors import BadArguments
from loraq.ggml_types import ggml_type
from loraq.quantize.mix import (
    Option,
    _hull,
    candidates,
    choose_mix,
    format_tensor_type_file,
    parse_tensor_type_file,
    row_errors,
    tensor_type_patterns,
)

T = [ggml_type(n) for n in ("q4_0", "q5_0", "q8_0", "q6_K")]


def _brute(options: dict[str, list[Option]], budget: int) -> float:
    names = list(options)
    best = np.inf
    for combo in itertools.product(*(options[n] for n in names)):
        if sum(o.nbytes for o in combo) <= budget:
            best = min(best, sum(o.loss for o in combo))
    return best


menus = st.lists(
    st.lists(st.tuples(st.integers(1, 50), st.floats(0, 100, allow_nan=False)), min_size=1, max_size=4), min_size=1, max_size=5
)


@settings(max_examples=150, deadline=None)
@given(menus, st.floats(0, 1))
def test_choice_fits_and_is_near_the_exhaustive_optimum(raw, frac):
    options = {f"t{i}": [Option(T[j % 4], b, loss) for j, (b, loss) in enumerate(m)] for i, m in enumerate(raw)}
    lo = sum(min(o.nbytes for o in m) for m in options.values())
    hi = sum(max(o.nbytes for o in m) for m in options.values())
    budget = int(lo + frac * (hi - lo))
    got = choose_mix(options, budget)
    assert sum(o.nbytes for o in got.values()) <= budget
    opt = _brute(options, budget)
    total = sum(o.loss for o in got.values())
    # Lagrangian + greedy fill: off the exhaustive optimum by at most one tensor's largest hull step
    step = (
        max((h[i].loss - h[i + 1].loss) for h in map(_hull, options.values()) for i in range(len(h) - 1))
        if any(len(_hull(m)) > 1 for m in options.values())
        else 0.0
    )
    assert total <= opt + step + 1e-9
    if budget >= hi:  # everything affordable: each tensor takes its least-loss option
        assert total == pytest.approx(sum(min(o.loss for o in m) for m in options.values()))


def test_budget_below_the_floor_is_one_line():
    with pytest.raises(BadArguments, match="below the smallest possible mix"):
        choose_mix({"a": [Option(T[0], 10, 1.0)]}, 9)


def test_hull_drops_dominated_and_non_convex_options():
    a, b, c, d = Option(T[0], 10, 9.0), Option(T[1], 20, 8.9), Option(T[2], 30, 1.0), Option(T[3], 40, 5.0)
    assert _hull([d, c, b, a]) == [a, c]  # d is dominated by c; b lies above the segment a→c


def test_predicted_error_ranks_types_by_bits_and_follows_the_imatrix():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((16, 512)).astype(np.float32)
    errs = {n: row_errors(rows, ggml_type(n), None)[0] for n in ("q4_0", "q5_0", "q8_0", "q4_K", "q6_K")}
    assert errs["q8_0"] < errs["q6_K"] < errs["q5_0"] < errs["q4_0"]
    assert errs["q4_K"] < errs["q4_0"]
    # the error is measured on the dequantized blocks: equal to a direct computation
    from loraq.kernels import dequantize, quantize

    d = dequantize(quantize(rows, "q4_0"), "q4_0", rows.shape)
    assert errs["q4_0"] == pytest.approx(float(((rows - d).astype(np.float64) ** 2).sum()) / 16, rel=1e-9)
    w = np.ones(512, dtype=np.float32)
    w[:32] = 1000.0  # the imatrix says the first block's columns matter
    plain, weighted, _ = row_errors(rows, ggml_type("q4_0"), w)
    assert weighted > plain


def test_candidates_respect_the_row_length():
    assert {t.name for t in candidates(576, False)} == {"iq4_nl", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
    assert "q2_K" not in {t.name for t in candidates(1536, False)}
    assert "q2_K" in {t.name for t in candidates(1536, True)}


def test_tensor_type_file_round_trips_and_anchors_names():
    pairs = tensor_type_patterns({"blk.1.attn_q.weight": ggml_type("q5_0"), "output.weight": ggml_type("q6_K")})
    assert pairs[0] == (r"^blk\.1\.attn_q\.weight$", "q5_0")
    import re

    assert re.search(pairs[0][0], "blk.1.attn_q.weight") and not re.search(pairs[0][0], "blk.11.attn_q.weight")
    assert parse_tensor_type_file(format_tensor_type_file(pairs)) == pairs
    with pytest.raises(BadArguments, match="NAME=TYPE"):
        parse_tensor_type_file("blk.0.attn_q.weight q4_0")
    with pytest.raises(BadArguments):
        parse_tensor_type_file("a=q9_9")


def _run_cli(*args: str) -> None:
    from typer.testing import CliRunner

    from loraq.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output


@pytest.mark.slow  # 10 s: in make test-slow, to keep make test under 5 minutes on a 2-core AVX2 EPYC
def test_size_targeted_mix_fits_records_its_choice_and_replays_byte_identical(synth256, tmp_path):
    """--size-of Q4_K_M: a file no larger than Q4_K_M's, with types beyond Q4_K_M's rules; the
    recorded list replayed through --tensor-type-file writes the same bytes (what llama-quantize
    --tensor-type-file is given to reproduce it)."""
    from loraq.gguf_io import open_gguf
    from loraq.quantize.mix import MIX_KV

    ref, mix, replay, tt = (tmp_path / n for n in ("q4km.gguf", "mix.gguf", "replay.gguf", "types.txt"))
    _run_cli("quantize", str(synth256), str(ref), "Q4_K_M")
    _run_cli("quantize", str(synth256), str(mix), "Q4_K_M", "--size-of", "Q4_K_M")
    assert mix.stat().st_size <= ref.stat().st_size
    with open_gguf(mix) as g:
        text = g.get_str(MIX_KV)
        types = {t.name: t.type.name for t in g.tensors}
    with open_gguf(ref) as g:
        ref_types = {t.name: t.type.name for t in g.tensors}
    pairs = parse_tensor_type_file(text)
    assert len(pairs) > 0 and types != ref_types
    tt.write_text(text)
    _run_cli("quantize", str(synth256), str(replay), "Q4_K_M", "--tensor-type-file", str(tt))
    with open_gguf(replay) as g:
        assert {t.name: t.type.name for t in g.tensors} == types
    # the replay lacks only the recorded KV: every tensor's bytes are the same
    with open_gguf(mix) as a, open_gguf(replay) as b:
        for t in a.tensors:
            assert a.read_raw(t).tobytes() == b.read_raw(b.tensor(t.name)).tobytes(), t.name


def test_size_target_below_the_floor_exits_2(synth256, tmp_path, capsys):
    from loraq.cli import run_cli

    assert run_cli(["quantize", str(synth256), str(tmp_path / "x.gguf"), "Q4_K_M", "--target-bpw", "0.5"]) == 2
    assert "below the smallest possible mix" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_llama_quantize_replays_the_mix(synth256, tmp_path):
    """llama-quantize (native, dev-only build: scripts/build_llama_tools.py) given the recorded list
    as --tensor-type-file writes the same tensor bytes as loraq's mix. Skips without the tool."""
    import subprocess

    from loraq.gguf_io import open_gguf
    from loraq.quantize.mix import MIX_KV
    from scripts.build_llama_tools import tool

    exe = tool("llama-quantize")
    if exe is None:
        pytest.skip("llama-quantize is not built; run `python -m scripts.build_llama_tools` (dev only)")
    mix, theirs, tt = tmp_path / "mix.gguf", tmp_path / "theirs.gguf", tmp_path / "types.txt"
    _run_cli("quantize", str(synth256), str(mix), "Q4_K_M", "--size-of", "Q4_K_M")  # tied: its head-typed embedding is most of this model
    with open_gguf(mix) as g:
        tt.write_text(g.get_str(MIX_KV))
    r = subprocess.run([str(exe), "--tensor-type-file", str(tt), str(synth256), str(theirs), "Q4_K_M"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with open_gguf(mix) as a, open_gguf(theirs) as b:
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for t in a.tensors:
            u = b.tensor(t.name)
            assert (t.type, a.read_raw(t).tobytes()) == (u.type, b.read_raw(u).tobytes()), t.name


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_tied_embedding_keeps_the_heads_type(smollm2_q4_1, tmp_path, tied):
    """A tied token_embd is also the output head: its error reaches every logit, which its lookup
    row error (the loss the search would use) does not see. On SmolLM2 a mix that priced it as a
    lookup took iq4_nl for it and lost 1.7x Q4_K_M's KLD; it must keep the ftype's head type."""
    from loraq.quantize.driver import QuantizeOptions
    from loraq.quantize.mix import target_mix
    from scripts import make_synthetic_model

    m = make_synthetic_model.make_model(tmp_path / "m.gguf", smollm2_q4_1, n_embd=256, n_ff=512, n_layer=1, tied=tied, n_vocab=4096)
    pairs, _ = target_mix(m, "Q4_K_M", QuantizeOptions(), size_of="Q4_K_M")
    assert any(p == "^token_embd\\.weight$" for p, _ in pairs) is not tied, pairs
