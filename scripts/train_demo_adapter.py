"""Train the demo's LoRA: rank 16 on every projection of SmolLM2-135M, with PEFT on the CPU.

    python -m scripts.train_demo_adapter HF_FOLDER CORPUS_DIR OUT [--cache DIR] [--steps 20] ...

HF_FOLDER is the base as a Hugging Face folder (scripts/hf_folder.py writes it from the fetched
GGUF); CORPUS_DIR holds train.txt and heldout.txt (scripts/make_domain_corpus.py). OUT becomes a
PEFT folder as `save_pretrained` writes it, plus demo_training.json with what training did: the
loss on a fixed training batch and the held-out perplexity, before and after, and the seconds.

The trained adapter is cached in --cache under a key hashing everything that decides its bytes
(the training data, the base weights and config, this script and the settings), so the demo trains
once per machine and retrains by itself when the corpus, the base or this script changes; OUT is a
copy of the cached folder. Training is deterministic: seeded torch and data order, float32,
`--threads` torch threads (2: the demo's budget is a few minutes on 2 cores).

Needs the `demo` extra (torch, transformers, peft): `pip install -e '.[demo]'`."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraq.pipeline.checkpoint import sha256_file

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEY_VERSION = 1


@dataclass(frozen=True)
class Settings:
    rank: int = 16
    alpha: int = 32
    steps: int = 20
    batch: int = 2
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 3
    seed: int = 0
    eval_ctx: int = 256
    eval_chunks: int = 8


def cache_key(hf: Path, corpus: Path, s: Settings, threads: int) -> str:
    """Hash of what decides the adapter's bytes; the thread count is in it because it changes the
    order of torch's float32 sums."""
    h = hashlib.sha256(f"v{KEY_VERSION}/threads={threads}".encode())
    h.update(json.dumps(asdict(s), sort_keys=True).encode())
    h.update(sha256_file(Path(__file__)).encode())
    for p in [corpus / "train.txt", corpus / "heldout.txt", *sorted(hf.glob("*.json")), *sorted(hf.glob("*.safetensors"))]:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()[:16]


def _chunks(ids: list[int], n: int, length: int) -> list[list[int]]:
    return [ids[i * length : (i + 1) * length] for i in range(min(n, len(ids) // length))]


def train(hf: Path, corpus: Path, out: Path, s: Settings, threads: int = 2, log: Any = print) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(s.seed)
    torch.use_deterministic_algorithms(True)

    tok = AutoTokenizer.from_pretrained(hf)
    train_ids = tok((corpus / "train.txt").read_text(encoding="utf-8"))["input_ids"]
    held_ids = tok((corpus / "heldout.txt").read_text(encoding="utf-8"))["input_ids"]
    windows = _chunks(train_ids, len(train_ids), s.seq_len)
    need = s.steps * s.batch
    if len(windows) < need:
        raise SystemExit(f"train.txt has {len(windows)} windows of {s.seq_len} tokens; {need} needed ({s.steps} steps x {s.batch})")
    order = list(range(len(windows)))
    random.Random(s.seed).shuffle(order)
    batches = [torch.tensor([windows[j] for j in order[i * s.batch : (i + 1) * s.batch]]) for i in range(s.steps)]
    probe = batches[0]  # the "train loss" before and after: one fixed batch the model trains on
    held = torch.tensor(_chunks(held_ids, s.eval_chunks, s.eval_ctx))
    if len(held) < s.eval_chunks:
        raise SystemExit(f"heldout.txt has {len(held_ids)} tokens; {s.eval_chunks} x {s.eval_ctx} needed")

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)

    @torch.no_grad()
    def loss_of(x: torch.Tensor) -> float:
        model.eval()
        return float(model(input_ids=x, labels=x).loss)

    def held_ppl() -> float:
        return math.exp(sum(loss_of(held[i : i + 1]) for i in range(len(held))) / len(held))

    t0 = time.monotonic()
    before = {"train_loss": loss_of(probe), "heldout_ppl": held_ppl()}
    log(f"before: train loss {before['train_loss']:.3f}, held-out PPL {before['heldout_ppl']:.2f}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    # Linear warm-up, then linear decay to a tenth: a short run needs its last steps small.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / s.warmup if i < s.warmup else 1 - 0.9 * (i - s.warmup) / max(1, s.steps - s.warmup)
    )
    t_train = time.monotonic()
    losses = []
    for i, x in enumerate(batches):
        model.train()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log(f"step {i + 1}/{s.steps}: loss {losses[-1]:.3f} ({time.monotonic() - t_train:.0f} s)")
    train_s = time.monotonic() - t_train
    after = {"train_loss": loss_of(probe), "heldout_ppl": held_ppl()}
    log(f"after: train loss {after['train_loss']:.3f}, held-out PPL {after['heldout_ppl']:.2f} ({train_s:.0f} s training)")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    report = {
        "settings": asdict(s),
        "threads": threads,
        "train_tokens": s.steps * s.batch * s.seq_len,
        "heldout_tokens": s.eval_chunks * s.eval_ctx,
        "before": before,
        "after": after,
        "step_losses": losses,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
    }
    (out / "demo_training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def cached_train(hf: Path, corpus: Path, out: Path, cache: Path, s: Settings, threads: int = 2) -> Path:
    """Train into cache/<key> unless it is there, then copy it to out (both written atomically)."""
    key = cache_key(hf, corpus, s, threads)
    cached = cache / f"smollm2-demo-lora-{key}"
    if not (cached / "adapter_model.safetensors").is_file():
        tmp = cache / f".{cached.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train(hf, corpus, tmp, s, threads)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    else:
        print(f"cached: {cached}")
    tmp_out = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    shutil.copytree(cached, tmp_out)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf", type=Path, help="the base model as a Hugging Face folder")
    ap.add_argument("corpus", type=Path, help="the folder with train.txt and heldout.txt")
    ap.add_argument("out", type=Path, help="the PEFT folder to write")
    ap.add_argument("--cache", type=Path, help="keep the trained adapter here, keyed by its inputs (default: no cache)")
    ap.add_argument("--threads", type=int, default=2)
    d = Settings()
    for f, v in asdict(d).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = ap.parse_args()
    s = Settings(**{f: getattr(a, f) for f in asdict(d)})
    if a.cache is None:
        train(a.hf, a.corpus, a.out, s, a.threads)
    else:
        a.cache.mkdir(parents=True, exist_ok=True)
        print(cached_train(a.hf, a.corpus, a.out, a.cache, s, a.threads))


if __name__ == "__main__":
    main()
