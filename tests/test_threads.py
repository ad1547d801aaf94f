"""`threads:` in the config and `--threads` on the command line reach every heavy stage: merge's
BLAS, quantize's workers, and the engine's BLAS for the reference and each score."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraq import cpus
from loraq.cli import run_cli
from loraq.errors import BadArguments
from loraq.pipeline import runner
from loraq.pipeline.config import Config, load_config


def _files(d: Path) -> dict:
    for name in ("base.gguf", "eval.txt"):
        (d / name).write_bytes(b"x")  # load_config checks that inputs exist; nothing here reads them
    (d / "adapter").mkdir(exist_ok=True)
    return {
        "name": "t",
        "workdir": "work",
        "base": "base.gguf",
        "adapters": [{"path": "adapter"}],
        "compare": {"text": "eval.txt", "runtime_lora": False},
    }


def _cfg(d: Path, **over) -> Path:
    data = _files(d)
    data.update(over)
    p = d / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_threads_key_parses_and_defaults_to_zero(tmp_path: Path) -> None:
    assert load_config(_cfg(tmp_path)).threads == 0
    assert load_config(_cfg(tmp_path, threads=3)).threads == 3


@pytest.mark.parametrize(
    ("value", "msg"),
    [
        (-1, "threads: Input should be greater than or equal to 0"),
        (5000, "less than or equal to 4096"),
        ("two", "threads: Input should be a valid integer"),
        (1.5, "threads: Input should be a valid integer"),
    ],
)
def test_threads_key_is_validated(tmp_path: Path, value: object, msg: str) -> None:
    with pytest.raises(BadArguments, match=msg):
        load_config(_cfg(tmp_path, threads=value))


def test_thread_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cpus, "available_cpus", lambda: 7)
    monkeypatch.setattr("loraq.pipeline.checkpoint.available_cpus", lambda: 7)
    cfg = load_config(_cfg(tmp_path, threads=3, quantize={"types": ["Q8_0"], "threads": 5}))
    # quantize.threads wins for quantize; the top-level key for merge and compare
    assert [runner.stage_threads(cfg, k) for k in ("merge", "quantize", "quantize-base", "compare")] == [3, 5, 5, 3]
    only_q = load_config(_cfg(tmp_path, quantize={"types": ["Q8_0"], "threads": 2}))
    assert [runner.stage_threads(only_q, k) for k in ("merge", "quantize", "compare")] == [2, 2, 2]  # configs from before `threads:`
    neither = load_config(_cfg(tmp_path))
    assert [runner.stage_threads(neither, k) for k in ("merge", "quantize", "compare")] == [7, 7, 7]  # 0: the CPUs available
    # run --threads N beats both keys; 0 means the CPUs available, over the config's numbers
    assert [runner.stage_threads(runner.with_threads(cfg, 4), k) for k in ("merge", "quantize", "compare")] == [4, 4, 4]
    assert [runner.stage_threads(runner.with_threads(cfg, 0), k) for k in ("merge", "quantize", "compare")] == [7, 7, 7]
    assert runner.with_threads(cfg, 4).root == cfg.root and cfg.threads == 3  # a copy; paths still resolve


def test_runner_passes_threads_to_every_heavy_stage(tmp_path: Path, monkeypatch) -> None:
    seen: dict[str, list[int]] = {}
    monkeypatch.setattr(runner, "set_blas_threads", lambda n: seen.setdefault("merge", []).append(n))
    monkeypatch.setattr(runner, "merge_model", lambda *a, **k: None)
    monkeypatch.setattr(runner, "quantize_many", lambda src, jobs, opts: seen.setdefault("quantize", []).append(opts.threads))
    monkeypatch.setattr(runner, "build_reference", lambda *a, **k: seen.setdefault("reference", []).append(a[6]))
    monkeypatch.setattr(runner, "score_to_file", lambda *a, **k: seen.setdefault("score", []).append(a[3]))
    cfg: Config = load_config(_cfg(tmp_path, threads=3, quantize={"types": ["Q8_0", "Q4_0"], "threads": 5}))
    for s in runner.build_stages(cfg):
        if s.kind in ("merge", "reference") or s.name.startswith("score:"):
            assert s.action is not None
            s.action()
        elif s.batch_run is not None:
            s.batch_run([s])
    assert seen == {"merge": [3], "quantize": [5, 5], "reference": [3], "score": [3, 3, 3]}


def test_threads_is_not_a_stage_setting(tmp_path: Path) -> None:
    """Threads change no output byte: changing them must not make a finished stage stale."""
    a = runner.build_stages(load_config(_cfg(tmp_path, threads=1, quantize={"types": ["Q8_0"], "threads": 1})))
    b = runner.build_stages(load_config(_cfg(tmp_path, threads=2, quantize={"types": ["Q8_0"], "threads": 2})))
    assert [s.settings for s in a] == [s.settings for s in b]


@pytest.mark.parametrize(
    "argv", [["merge", "b.gguf", "--lora", "a", "-o", "o.gguf", "--threads", "-1"], ["run", "cfg.yaml", "--threads", "5000"]]
)
def test_cli_threads_out_of_range_is_exit_2(tmp_path: Path, argv: list[str], capsys) -> None:
    assert run_cli([a if not a.endswith((".gguf", ".yaml")) else str(tmp_path / a) for a in argv]) == 2
    assert "--threads must be a finite number in [0, 4096]" in capsys.readouterr().err
