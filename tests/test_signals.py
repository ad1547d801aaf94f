"""Signals, kill -9 and concurrent runs, through the real command line (docs/design.md: exit codes,
Checkpoints: lock and temporaries).

Each case runs `loraq run` in a subprocess on a small synthetic model, through a wrapper
(slow_loraq.py, written below) that forces the quantize worker pool on and sleeps after every
tensor, so there is time to signal it at a known point: while the merge writes, while quantize
workers run, while the reference is written, while compare scores. SIGINT, SIGTERM and SIGHUP
must exit 128+N with no temporary left and no worker alive; after SIGKILL the workers must die
with their parent, `status` must report the leftovers, and the next `run` must remove them and
produce files byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from loraq.pipeline.config import load_config
from loraq.pipeline.runner import run_pipeline
from tiny_project import make_tiny_project

# slow: every case starts `loraq run` subprocesses and waits on them (make test-slow)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find worker processes")]

ROOT = Path(__file__).resolve().parents[1]
EVENT_SCHEMA = json.loads((ROOT / "docs" / "events.schema.json").read_text())

# A loraq run with pauses; its own temporaries are kept while it lives (atomic.pid_in_use).
WRAPPER = '''
"""loraq with the worker pool forced on and a pause after each tensor, for signal tests."""
if __name__ == "__main__":
    import os, sys, time
    from pathlib import Path

    import loraq.compare.stage as stage
    import loraq.quantize.driver as driver
    from loraq.compare import kld_file
    from loraq.gguf_io import writer

    driver.PARALLEL_MIN_ELEMENTS = 0
    driver.USE_THREADS = False  # worker processes: the pool whose signal handling is under test
    slow = float(os.environ.get("LORAQ_TEST_SLOW", "0.05"))
    mark = Path(os.environ["LORAQ_TEST_MARK"])

    def slowed(f, name):
        def g(*a, **k):
            mark.joinpath(name).touch()
            time.sleep(slow)
            return f(*a, **k)
        return g

    writer.GGUFStreamWriter.end = slowed(writer.GGUFStreamWriter.end, "write")
    kld_file.ReferenceWriter.add_chunk = slowed(kld_file.ReferenceWriter.add_chunk, "reference")
    stage.score = slowed(stage.score, "compare")
    from loraq.cli import main

    main()
'''

TYPES = ["Q8_0", "Q4_0"]


def _cfg(d: Path, workdir: str, compare: bool) -> Path:
    cfg = {
        "name": "sig",
        "workdir": workdir,
        "base": "base.gguf",
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": TYPES, "threads": 2},
    }
    if compare:
        cfg["compare"] = {"text": "eval.txt", "ctx": 32, "chunks": 2, "runtime_lora": False}
    p = d / f"{workdir}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _hashes(work: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(work.iterdir()) if p.suffix in (".gguf", ".kld")}


@pytest.fixture(scope="module")
def proj(smollm2_q4_1, tmp_path_factory) -> Path:
    d = make_tiny_project(tmp_path_factory.mktemp("signals"), smollm2_q4_1)
    (d / "slow_loraq.py").write_text(WRAPPER)
    run_pipeline(load_config(_cfg(d, "uninterrupted", compare=True)))
    return d


def _prepare(d: Path, name: str, done: tuple[str, ...]) -> Path:
    """A workdir where the stages `done` are already up to date (copied from the uninterrupted
    run), so a run goes straight to the stage under test."""
    work = d / name
    work.mkdir()
    src = d / "uninterrupted"
    m = json.loads((src / "manifest.json").read_text())
    m["stages"] = {k: v for k, v in m["stages"].items() if k.split(":")[0] in done}
    m["files"] = {}
    for rec in m["stages"].values():
        for out in rec["outputs"]:
            shutil.copyfile(src / out, work / out)
    (work / "manifest.json").write_text(json.dumps(m))
    return work


def _env(d: Path, slow: float = 0.05) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["LORAQ_TEST_MARK"] = str(d)
    env["LORAQ_TEST_SLOW"] = str(slow)
    return env


def _loraq(d: Path, *args: str, slow: float = 0.0) -> subprocess.Popen[str]:
    """`loraq ARGS` in the background; with `slow`, through the wrapper, pausing that long per tensor."""
    prog = [str(d / "slow_loraq.py")] if slow else ["-m", "loraq"]
    return subprocess.Popen(
        [sys.executable, *prog, *args], cwd=d, env=_env(d, slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _loraq_run(d: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraq", *args], cwd=d, env=_env(d), capture_output=True, text=True, timeout=120)


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (spawned workers, multiprocessing's resource tracker)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(p.name))
    return out


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":  # a zombie is dead; only its parent (here pid 1) has not reaped it yet
            alive.append(pid)
    return alive


def _temps(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if ".tmp-" in p.name) if work.exists() else []


def _wait_for(cond, what: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# (point, signal, compare stage in the config)
CASES = [
    ("merge", signal.SIGHUP, False),
    ("quantize", signal.SIGINT, False),
    ("quantize", signal.SIGTERM, False),
    ("reference", signal.SIGTERM, True),
    ("compare", signal.SIGINT, True),
    ("compare", signal.SIGTERM, True),
    ("merge", signal.SIGKILL, False),
    ("quantize", signal.SIGKILL, False),
    ("reference", signal.SIGKILL, True),
]
DONE_BEFORE = {"merge": ("convert",), "quantize": ("convert", "merge"), "reference": ("convert", "merge", "quantize")}
DONE_BEFORE["compare"] = (*DONE_BEFORE["reference"], "reference")


@pytest.mark.parametrize(("point", "sig", "compare"), CASES, ids=[f"{p}-{s.name}" for p, s, _ in CASES])
def test_signal(proj: Path, point: str, sig: signal.Signals, compare: bool) -> None:
    if sig == signal.SIGHUP and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        pytest.skip("SIGHUP is ignored in this session (nohup): loraq, started from it, keeps it ignored, as nohup asks")
    d = proj
    name = f"w-{point}-{sig.name}"
    cfgp = _cfg(d, name, compare)
    work = _prepare(d, name, DONE_BEFORE[point])
    for m in ("write", "reference", "compare"):
        (d / m).unlink(missing_ok=True)
    proc = _loraq(d, "run", str(cfgp), slow=0.05)
    if point == "merge":
        _wait_for(lambda: any(t.startswith(".merged-f16.gguf.tmp-") for t in _temps(work)), "the merge's temporary file", proc)
    elif point == "quantize":  # the pool's workers are up and the outputs half-written
        _wait_for(
            lambda: any(t.startswith(".merged-Q8_0.gguf.tmp-") for t in _temps(work)) and len(_children(proc.pid)) >= 2,
            "quantize workers",
            proc,
        )
    elif point == "reference":
        _wait_for(lambda: any(t.startswith(".reference.kld.tmp-") for t in _temps(work)), "the reference's temporary file", proc)
    else:
        _wait_for(lambda: (d / "compare").exists(), "compare scoring", proc)
    kids = _children(proc.pid)
    assert kids or point in ("merge", "reference", "compare")
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    deadline = time.monotonic() + 3.0
    while _alive(kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(kids), f"processes of the {sig.name}-ed run still alive: {_alive(kids)}"

    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig, err
        assert f"interrupted ({sig.name})" in err and "Traceback" not in err, err
        assert _temps(work) == [], "an interrupted run left temporary files"
        recorded = json.loads((work / "manifest.json").read_text())["stages"] if (work / "manifest.json").exists() else {}
        assert "compare" not in recorded and not (point == "merge" and "merge" in recorded)
        return

    assert proc.returncode == -signal.SIGKILL
    left = _temps(work)
    assert left, "the killed run should have left its temporary file (or the test signalled too late)"
    status = _loraq_run(d, "status", str(cfgp))
    assert status.returncode == 0, status.stderr
    assert "leftover temporary file" in status.stdout and all(t in status.stdout.replace("\n", "") for t in left), status.stdout
    assert _temps(work) == left, "status must not remove anything"
    rerun = _loraq_run(d, "run", str(cfgp), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {len(left)} leftover temporary file(s)" in rerun.stderr, rerun.stderr
    events = _events(rerun.stdout)
    assert events[0]["event"] == "leftovers" and sorted(Path(p).name for p in events[0]["removed"]) == sorted(left), events[0]
    assert _temps(work) == []
    reference = _hashes(d / "uninterrupted")
    got = _hashes(work)
    assert got and got == {k: v for k, v in reference.items() if k in got}
    assert set(got) >= {"merged-f16.gguf", *(f"merged-{t}.gguf" for t in TYPES)}


def _events(stdout: str) -> list[dict]:
    """`run --json` output, each event checked against the documented schema."""
    events = [json.loads(line) for line in stdout.splitlines()]
    for e in events:
        jsonschema.validate(e, EVENT_SCHEMA)
    return events


def test_concurrent_runs_wait_or_exit_2(proj: Path) -> None:
    """A second run on the workdir waits for the first (one line on stderr), then finds every
    stage up to date; with --no-wait it exits 2 at once; `status` says a run is in progress."""
    d = proj
    cfgp = _cfg(d, "w-concurrent", compare=False)
    work = _prepare(d, "w-concurrent", DONE_BEFORE["quantize"])
    first = _loraq(d, "run", str(cfgp), slow=0.3)  # the run must outlast three process start-ups on a busy machine
    _wait_for(lambda: any(t.startswith(".merged-Q8_0.gguf.tmp-") for t in _temps(work)), "the first run's quantize", first)

    t0 = time.monotonic()
    nowait, status, second = (
        _loraq(d, "run", str(cfgp), "--no-wait"),
        _loraq(d, "status", str(cfgp)),
        _loraq(d, "run", str(cfgp), "--json"),
    )
    out, err = nowait.communicate(timeout=60)
    assert nowait.returncode == 2 and f"pid {first.pid}" in err, err
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0 and f"a run is in progress in {work} (pid {first.pid})" in out.replace("\n", ""), out + err
    assert first.poll() is None, "the first run ended too early for this test; slow it down"
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert err.count("waiting for the run in") == 1 and f"(pid {first.pid}) to finish" in err, err
    events = _events(out)
    assert events[0] == {"schema_version": 1, "event": "waiting", "workdir": str(work), "pid": first.pid}
    stages = [e for e in events if e["event"].startswith("stage_")]
    assert stages and all(e["event"] == "stage_skipped" for e in stages), stages
    assert time.monotonic() - t0 < 120
