"""The demo's domain corpus (scripts/make_domain_corpus.py) and LoRA training (train_demo_adapter.py).

The corpus tests check what the demo relies on: the same seed writes the same bytes, the three
splits share no bulletin, the held-out bulletins are mostly new text (not memorisable from train),
each bulletin's gale-warning list agrees with its own area forecasts (the learnable structure),
and the splits are long enough for the compare stage and an importance matrix. The training smoke
test (slow, skipped without torch/peft) trains a few steps on a tiny random llama and checks the
PEFT folder: PEFT reloads it to the loss training reported, training is repeatable to the byte,
and the cache does not retrain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scripts import make_domain_corpus as mdc


def _splits(tmp: Path, seed: int = 0, **counts: int) -> dict[str, str]:
    paths = mdc.write_corpus(tmp, seed, **{"train": 20, "calibration": 4, "heldout": 4, **counts})
    return {k: p.read_text(encoding="utf-8") for k, p in paths.items()}


def test_same_seed_same_bytes_other_seed_other_text(tmp_path: Path) -> None:
    a = _splits(tmp_path / "a")
    b = _splits(tmp_path / "b")
    c = _splits(tmp_path / "c", seed=1)
    assert a == b
    assert all(a[k] != c[k] for k in a)


def test_growing_one_split_changes_no_other(tmp_path: Path) -> None:
    a = _splits(tmp_path / "a")
    b = _splits(tmp_path / "b", train=30)
    assert a["heldout"] == b["heldout"] and a["calibration"] == b["calibration"]
    assert b["train"].startswith(a["train"].rstrip("\n"))


def test_splits_are_disjoint_and_heldout_is_new_text(tmp_path: Path) -> None:
    s = _splits(tmp_path, train=60, heldout=8)
    bulletins = {k: mdc.bulletins(v) for k, v in s.items()}
    assert [len(bulletins[k]) for k in ("train", "calibration", "heldout")] == [60, 4, 8]
    serials = {k: {re.match(r"MARROW SEA SHIPPING BULLETIN (\d+)\n", b).group(1) for b in v} for k, v in bulletins.items()}  # type: ignore[union-attr]
    assert not (serials["train"] & serials["heldout"]) and not (serials["train"] & serials["calibration"])
    assert not (serials["calibration"] & serials["heldout"])
    bodies = {k: {b.split("\n", 1)[1].replace(n, "") for b, n in zip(v, serials[k])} for k, v in bulletins.items()}
    assert not (bodies["train"] & bodies["heldout"]) and not (bodies["train"] & bodies["calibration"])

    # A held-out area forecast line seldom occurs verbatim in train: the text is new combinations.
    def forecasts(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if re.match(r"[A-Z][a-z]+( [A-Z][a-z]+)*(, [A-Z][a-z]+( [A-Z][a-z]+)*)*: [A-Z]", ln)]

    train_lines = set(forecasts(s["train"]))
    held = forecasts(s["heldout"])
    assert len(held) > 8 * 10
    seen = sum(ln in train_lines for ln in held) / len(held)
    assert seen < 0.25, f"{seen:.0%} of the held-out forecast lines occur in train"


def test_gale_warnings_agree_with_the_forecasts(tmp_path: Path) -> None:
    s = _splits(tmp_path, train=40)
    checked_gales = 0
    for b in mdc.bulletins(s["train"]):
        lines = b.splitlines()
        start = lines.index("Area forecasts for the next 24 hours:") + 1
        windy: list[str] = []
        for ln in lines[start:]:
            if not ln:
                break
            areas, wind = ln.split(": ", 1)
            if re.search(r"\b(gale|storm) (8|9|10|11)\b", wind.split(".")[0]):
                windy += areas.split(", ")
        warning = next(ln for ln in lines if ln.startswith(("Gale warnings in force:", "There are no warnings")))
        if windy:
            assert warning == f"Gale warnings in force: {', '.join(windy)}."
            checked_gales += 1
        else:
            assert warning == "There are no warnings of gales."
    assert 0 < checked_gales < 40  # both kinds of bulletin occur


@pytest.mark.real
def test_default_splits_are_long_enough(tmp_path: Path, smollm2_q4_1: Path) -> None:
    from loraq.llama.tokenizer import Tokenizer
    from scripts.train_demo_adapter import Settings

    tok = Tokenizer.from_gguf(smollm2_q4_1)
    paths = mdc.write_corpus(tmp_path)
    n = {k: len(tok.encode(p.read_text(encoding="utf-8"))) for k, p in paths.items()}
    assert n["calibration"] >= 16 * 256 and n["heldout"] >= 8 * 256
    d = Settings()
    assert n["train"] >= 2 * d.steps * d.batch * d.seq_len  # the default training reads under half of the train split


@pytest.mark.slow
def test_training_smoke(tmp_path: Path, smollm2_q4_1: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import math

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts import hf_folder
    from scripts import train_demo_adapter as tda

    tok_dir = hf_folder.tokenizer_from_gguf(smollm2_q4_1, tmp_path / "tok")
    hf = hf_folder.synthetic(tmp_path / "hf", tok_dir, arch="llama", n_embd=256, n_ff=512, n_layer=2, dtype="F32")
    corpus = tmp_path / "corpus"
    mdc.write_corpus(corpus, train=6, calibration=1, heldout=1)
    s = tda.Settings(steps=6, batch=1, seq_len=64, lr=1e-2, warmup=1, eval_ctx=64, eval_chunks=2)
    cache = tmp_path / "cache"
    out = tda.cached_train(hf, corpus, tmp_path / "adapter", cache, s, threads=1)
    rep = json.loads((out / "demo_training.json").read_text())
    assert rep["after"]["train_loss"] < rep["before"]["train_loss"] - 0.5
    assert rep["after"]["heldout_ppl"] < rep["before"]["heldout_ppl"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and sorted(cfg["target_modules"]) == sorted(tda.TARGETS)

    # PEFT itself reloads the saved folder to the held-out perplexity training reported.
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok((corpus / "heldout.txt").read_text(encoding="utf-8"))["input_ids"][: 2 * 64]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), out).eval()
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([c]), labels=torch.tensor([c])).loss) for c in (ids[:64], ids[64:])]
    assert math.exp(sum(losses) / 2) == pytest.approx(rep["after"]["heldout_ppl"], rel=1e-4)

    # Seeded: training again writes the same adapter bytes.
    tda.train(hf, corpus, tmp_path / "again", s, threads=1, log=lambda _: None)
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()

    # The cache: a second run copies the cached folder (same bytes, no training); a changed corpus retrains.
    (cache_dirs,) = list(cache.glob("smollm2-demo-lora-*"))
    stamp = (cache_dirs / "adapter_model.safetensors").stat().st_mtime_ns
    again = tda.cached_train(hf, corpus, tmp_path / "adapter2", cache, s, threads=1)
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    assert (cache_dirs / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    mdc.write_corpus(corpus, seed=1, train=6, calibration=1, heldout=1)
    tda.cached_train(hf, corpus, tmp_path / "adapter3", cache, s, threads=1)
    assert len(list(cache.glob("smollm2-demo-lora-*"))) == 2
