"""Inputs and outputs under stress, in-process through `run_cli` (docs/design.md ground rule 3):
a damaged manifest, FIFOs given as inputs, outputs that are inputs (same path, hard link, symlink,
inside the adapter folder), a full disk, a read-only workdir, and an input replaced while a stage
reads it. Each case checks the exit code, the one-line message and that no input was touched."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

import loraq.quantize.driver as driver
from loraq.cli import run_cli
from loraq.convert import convert_adapter
from loraq.errors import BadInput
from loraq.gguf_io import writer as gguf_writer
from loraq.pipeline.config import load_config
from loraq.pipeline.runner import run_pipeline
from scripts import make_synthetic_model as mk_model
from tiny_project import TEXT, make_tiny_project


@pytest.fixture(scope="module")
def inputs(smollm2_q4_1, tmp_path_factory) -> Path:
    """base.gguf, a PEFT folder adapter/, the same adapter as adapter.gguf, and eval.txt."""
    d = make_tiny_project(tmp_path_factory.mktemp("io-inputs"), smollm2_q4_1)
    convert_adapter(d / "adapter", d / "base.gguf", d / "adapter.gguf")
    return d


@pytest.fixture
def proj(inputs: Path, tmp_path: Path) -> Path:
    """A private copy of the inputs: some tests replace or link them."""
    for p in inputs.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copyfile)(p, tmp_path / p.name)
    return tmp_path


def _cfg(d: Path, **over: object) -> Path:
    cfg: dict[str, object] = {
        "name": "io",
        "workdir": "work",
        "base": "base.gguf",
        "adapters": [{"path": "adapter", "scale": 1.0}],
        "quantize": {"types": ["Q8_0", "Q4_0"], "threads": 1},
    }
    cfg.update(over)
    text = yaml.safe_dump(cfg)
    p = d / f"cfg-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"  # one file per config
    p.write_text(text)
    return p


def _sha(p: Path) -> str:
    if p.is_dir():
        return json.dumps({c.name: _sha(c) for c in sorted(p.iterdir())})
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp-*"))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli([str(a) for a in argv])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# A damaged manifest: exit 4 with "delete it", never a crash
# ------------------------------------------------------------------------------------------------
DAMAGED = {
    "list": "[]",
    "stages-number": '{"stages": 3}',
    "files-entry-number": '{"files": {"x": 1}}',
    "stage-number": '{"stages": {"merge": 5}}',
    "outputs-list": '{"stages": {"merge": {"outputs": []}}}',
    "deeply-nested": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("text", list(DAMAGED.values()), ids=list(DAMAGED))
def test_damaged_manifest_is_bad_input(proj: Path, capsys, text: str) -> None:
    cfgp = _cfg(proj)
    (proj / "work").mkdir()
    (proj / "work" / "manifest.json").write_text(text)
    for cmd in ("status", "run"):
        code, err = _cli(capsys, cmd, cfgp)
        assert code == 4, err
        assert err.startswith("error:") and "damaged" in err and "delete it" in err and err.count("\n") == 1, err
    assert (proj / "work" / "manifest.json").read_text() == text


# ------------------------------------------------------------------------------------------------
# FIFOs as inputs: refused at once (exit 2), never opened for reading
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def unblock() -> Iterator[Callable[[Path], None]]:
    """Guard against a hang: after 10 s, open each registered FIFO for writing and close it, so a
    reader blocked on it sees end-of-file and the test fails on time instead of hanging."""
    fifos: list[Path] = []
    stop = threading.Event()

    def watch() -> None:
        if stop.wait(10.0):
            return
        while not stop.is_set():
            for f in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    yield fifos.append
    stop.set()
    t.join()


def _fifo_cases(d: Path) -> dict[str, tuple[list[str | Path], Path]]:
    """case -> (argv, the FIFO)."""
    fifo = d / "fifo"
    peft_fifo = d / "adapter-fifo" / "adapter_model.safetensors"
    cases: dict[str, tuple[list[str | Path], Path]] = {
        "run-base": (["run", _cfg(d, base="fifo")], fifo),
        "status-base": (["status", _cfg(d, base="fifo")], fifo),
        "run-adapter": (["run", _cfg(d, adapters=[{"path": "fifo"}])], fifo),
        "status-adapter-folder": (["status", _cfg(d, adapters=[{"path": "adapter-fifo"}])], peft_fifo),
        "run-text": (["run", _cfg(d, compare={"text": "fifo", "ctx": 32, "chunks": 2})], fifo),
        "merge-base": (["merge", fifo, "--lora", d / "adapter.gguf", "-o", d / "out.gguf"], fifo),
        "merge-adapter-folder": (["merge", d / "base.gguf", "--lora", d / "adapter-fifo", "-o", d / "out.gguf"], peft_fifo),
        "convert-adapter-folder": (["convert", d / "adapter-fifo", "--base", d / "base.gguf", "-o", d / "out.gguf"], peft_fifo),
        "compare-text": (["compare", d / "base.gguf", "--lora", d / "adapter.gguf", "-f", fifo, "-o", d / "cmp"], fifo),
    }
    return cases


FIFO_CASES = [
    "run-base",
    "status-base",
    "run-adapter",
    "status-adapter-folder",
    "run-text",
    "merge-base",
    "merge-adapter-folder",
    "convert-adapter-folder",
    "compare-text",
]


@pytest.mark.parametrize("case", FIFO_CASES)
def test_fifo_input_is_refused(proj: Path, capsys, unblock, case: str) -> None:
    shutil.copytree(proj / "adapter", proj / "adapter-fifo")
    (proj / "adapter-fifo" / "adapter_model.safetensors").unlink()
    cases = _fifo_cases(proj)
    assert set(cases) == set(FIFO_CASES)
    argv, fifo = cases[case]
    if not fifo.exists():
        os.mkfifo(fifo)
    unblock(fifo)
    t0 = time.monotonic()
    code, err = _cli(capsys, *argv)
    assert time.monotonic() - t0 < 8, "blocked on the FIFO"
    assert code == 2, err
    assert "not a regular file" in err and "(a FIFO)" in err and err.count("\n") == 1, err
    assert not (proj / "out.gguf").exists() and _temps(proj) == []


# ------------------------------------------------------------------------------------------------
# No input is ever an output
# ------------------------------------------------------------------------------------------------
def _link_cases(d: Path) -> dict[str, tuple[list[str | Path], Path]]:
    """case -> (argv, the input that must stay unchanged); links are made by _make_links."""
    w = d / "work"
    return {
        "merge-out-is-lora": (["merge", d / "base.gguf", "--lora", d / "adapter.gguf", "-o", d / "adapter.gguf"], d / "adapter.gguf"),
        "merge-out-hardlinks-base": (["merge", d / "base.gguf", "--lora", d / "adapter.gguf", "-o", d / "base-hard.gguf"], d / "base.gguf"),
        "merge-out-symlinks-lora": (
            ["merge", d / "base.gguf", "--lora", d / "adapter.gguf", "-o", d / "lora-sym.gguf"],
            d / "adapter.gguf",
        ),
        "merge-out-in-adapter-folder": (["merge", d / "base.gguf", "--lora", d / "adapter", "-o", d / "adapter" / "m.gguf"], d / "adapter"),
        "convert-out-in-adapter-folder": (
            ["convert", d / "adapter", "--base", d / "base.gguf", "-o", d / "adapter" / "a.gguf"],
            d / "adapter",
        ),
        "convert-out-hardlinks-adapter-file": (
            ["convert", d / "adapter", "--base", d / "base.gguf", "-o", d / "st-hard.gguf"],
            d / "adapter",
        ),
        "quantize-out-hardlinks-in": (["quantize", d / "base.gguf", d / "base-hard.gguf", "Q8_0"], d / "base.gguf"),
        "quantize-out-symlinks-in": (["quantize", d / "base.gguf", d / "base-sym.gguf", "Q8_0"], d / "base.gguf"),
        "compare-report-is-text": (
            ["compare", d / "base.gguf", "--lora", d / "adapter.gguf", "-f", w / "report.md", "-c", "32", "--chunks", "1", "-o", w],
            w / "report.md",
        ),
        "compare-candidate-is-reference": (
            ["compare", d / "base.gguf", "--lora", d / "adapter.gguf", "-f", d / "eval.txt", "--merged", w / "reference.kld", "-o", w],
            w / "reference.kld",
        ),
        "run-workdir-is-adapter-folder": (["run", _cfg(d, workdir="adapter")], d / "adapter"),
        "run-base-in-workdir": (["run", _cfg(d, base="work/merged-f16.gguf")], w / "merged-f16.gguf"),
        "run-text-in-workdir": (["run", _cfg(d, compare={"text": "work/report.md", "ctx": 32, "chunks": 1})], w / "report.md"),
    }


def _make_links(d: Path) -> None:
    os.link(d / "base.gguf", d / "base-hard.gguf")
    (d / "base-sym.gguf").symlink_to(d / "base.gguf")
    (d / "lora-sym.gguf").symlink_to(d / "adapter.gguf")
    os.link(d / "adapter" / "adapter_model.safetensors", d / "st-hard.gguf")
    (d / "work").mkdir()
    shutil.copyfile(d / "base.gguf", d / "work" / "merged-f16.gguf")
    (d / "work" / "report.md").write_text(TEXT)
    (d / "work" / "reference.kld").write_bytes(b"a candidate that happens to be named reference.kld")
    (d / "eval.txt").write_text(TEXT)


LINK_CASES = [
    "merge-out-is-lora",
    "merge-out-hardlinks-base",
    "merge-out-symlinks-lora",
    "merge-out-in-adapter-folder",
    "convert-out-in-adapter-folder",
    "convert-out-hardlinks-adapter-file",
    "quantize-out-hardlinks-in",
    "quantize-out-symlinks-in",
    "compare-report-is-text",
    "compare-candidate-is-reference",
    "run-workdir-is-adapter-folder",
    "run-base-in-workdir",
    "run-text-in-workdir",
]


@pytest.mark.parametrize("case", LINK_CASES)
def test_output_that_is_an_input_is_refused(proj: Path, capsys, case: str) -> None:
    _make_links(proj)
    cases = _link_cases(proj)
    assert set(cases) == set(LINK_CASES)
    argv, keep = cases[case]
    before = _sha(keep)
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    assert "write the output to a different" in err and err.count("\n") == 1, err
    assert _sha(keep) == before
    assert _temps(proj) == []


# ------------------------------------------------------------------------------------------------
# A full disk: exit 5, the temporary removed, the previous output untouched
# ------------------------------------------------------------------------------------------------
class _FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes past it fail with ENOSPC, as write(2) does."""

    def __init__(self, path: str, room: int):
        self._f = open(path, "wb", buffering=0)  # noqa: SIM115 -- closed in close()
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = len(memoryview(b))
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(b) or 0

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


@pytest.mark.parametrize("where", ["final-flush", "mid-file", "fsync"])
def test_disk_full_is_io_error(proj: Path, capsys, monkeypatch, where: str) -> None:
    out = proj / "merged.gguf"
    argv = ["merge", proj / "base.gguf", "--lora", proj / "adapter.gguf", "-o", out]
    assert _cli(capsys, *argv)[0] == 0
    size = out.stat().st_size
    out.write_bytes(b"previous output")
    if where == "fsync":

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        room = size - 1 if where == "final-flush" else size // 2
        real_open = builtins.open

        def full_open(file, mode="r", *a, **k):
            if ".tmp-" in str(file) and "w" in mode:
                return io.BufferedWriter(_FullDisk(str(file), room))
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(gguf_writer, "open", full_open, raising=False)
    code, err = _cli(capsys, *argv)
    assert code == 5, err
    assert "disk is full" in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"previous output"
    assert _temps(proj) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, where the system lets this user mount one (root, not in every container)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        if (
            os.geteuid() != 0
            or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode
        ):
            pytest.skip("cannot mount a tmpfs here (needs root)")
    except OSError:
        pytest.skip("no mount command")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk(inputs: Path, tiny_disk: Path, capsys) -> None:
    out = tiny_disk / "merged.gguf"
    out.write_bytes(b"previous output")
    code, err = _cli(capsys, "merge", inputs / "base.gguf", "--lora", inputs / "adapter.gguf", "-o", out)
    assert code == 5 and "disk is full" in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"previous output" and _temps(tiny_disk) == []


# ------------------------------------------------------------------------------------------------
# A read-only workdir
# ------------------------------------------------------------------------------------------------
def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make `folder` read-only: chmod where that binds, else (root) fail every write under it with EROFS."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    root = str(folder.resolve())

    def inside(p: object) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(root)

    def erofs(p: object) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))  # type: ignore[arg-type]

    real_open, real_os_open = builtins.open, os.open

    def ro_open(file, mode="r", *a, **k):
        if inside(file) and any(c in mode for c in "wax+"):
            raise erofs(file)
        return real_open(file, mode, *a, **k)

    def ro_os_open(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            raise erofs(path)
        return real_os_open(path, flags, *a, **k)

    def refuse(real):
        def f(path, *a, **k):
            if inside(path):
                raise erofs(path)
            return real(path, *a, **k)

        return f

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(io, "open", ro_open)
    monkeypatch.setattr(os, "open", ro_os_open)
    for name in ("replace", "rename", "unlink", "mkdir", "rmdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))


def test_read_only_workdir(proj: Path, capsys, monkeypatch) -> None:
    """Up to date: `run` succeeds and says it cannot remove a leftover, which `status` reports.
    A stage to run: exit 5 naming the workdir, and nothing in it changes."""
    cfgp = _cfg(proj, quantize={"types": ["Q8_0"], "threads": 1})
    run_pipeline(load_config(cfgp))
    work = proj / "work"
    (work / ".merged-Q4_0.gguf.tmp-999999999").write_bytes(b"x" * 100)  # a pid that cannot exist
    snap = {p.name: _sha(p) for p in work.iterdir()}
    _read_only(monkeypatch, work)
    try:
        code, err = _cli(capsys, "status", cfgp)
        assert code == 0, err
        code, err = _cli(capsys, "run", cfgp)
        assert code == 0, err
        assert "cannot remove leftover" in err and ".merged-Q4_0.gguf.tmp-999999999" in err, err
        cfgp = _cfg(proj, quantize={"types": ["Q8_0", "Q4_0"], "threads": 1})
        code, err = _cli(capsys, "run", cfgp)
        assert code == 5, err
        assert str(work) in err and ("read-only" in err or "permission denied" in err), err
        assert {p.name: _sha(p) for p in work.iterdir()} == snap
    finally:
        monkeypatch.undo()
        work.chmod(0o755)


def test_status_reports_leftovers(proj: Path, capsys) -> None:
    cfgp = _cfg(proj, quantize={"types": ["Q8_0"], "threads": 1})
    run_pipeline(load_config(cfgp))
    work = proj / "work"
    (work / ".merged-Q8_0.gguf.tmp-999999999").write_bytes(b"x" * 100)
    (work / f".merged-Q4_0.gguf.tmp-{os.getpid()}").write_bytes(b"live")  # a live loraq writer's: kept
    capsys.readouterr()
    assert run_cli(["status", str(cfgp)]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "1 leftover temporary file(s)" in out and ".merged-Q8_0.gguf.tmp-999999999" in out, out
    assert (work / ".merged-Q8_0.gguf.tmp-999999999").exists()
    code, err = _cli(capsys, "run", cfgp)
    assert code == 0 and "removed 1 leftover temporary file(s)" in err, err
    assert _temps(work) == [f".merged-Q4_0.gguf.tmp-{os.getpid()}"]


# ------------------------------------------------------------------------------------------------
# An input replaced while a stage reads it: exit 4, the stage not recorded, no output written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["quantize-pool", "quantize", "merge"])
def test_input_replaced_mid_stage(proj: Path, monkeypatch, case: str) -> None:
    pool = case == "quantize-pool"
    cfgp = _cfg(proj, quantize={"types": ["Q8_0", "Q4_0"], "threads": 2 if pool else 1})
    cfg = load_config(cfgp)
    work = proj / "work"
    if case != "merge":
        run_pipeline(cfg, until="merge")
    if pool:
        monkeypatch.setattr(driver, "PARALLEL_MIN_ELEMENTS", 0)
    victim = work / "merged-f16.gguf" if case != "merge" else proj / "base.gguf"
    during = "merged-Q8_0.gguf" if case != "merge" else "merged-f16.gguf"
    other = proj / "other.gguf"
    mk_model.make_model(other, proj / "base.gguf", n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=2, seed=7)
    end = gguf_writer.GGUFStreamWriter.end
    replaced = []

    def end_and_replace(self) -> None:
        end(self)
        if self.path.name == during and not replaced and self._next == 2:
            os.replace(other, victim)  # another process writing the file, as a second run would
            replaced.append(1)

    monkeypatch.setattr(gguf_writer.GGUFStreamWriter, "end", end_and_replace)
    stage = "quantize:Q8_0" if case != "merge" else "merge"
    with pytest.raises(BadInput, match=f"{victim} changed while stage {stage} was reading it; run again"):
        run_pipeline(cfg)
    assert replaced
    recorded = json.loads((work / "manifest.json").read_text())["stages"] if (work / "manifest.json").exists() else {}
    assert stage not in recorded and "quantize:Q4_0" not in recorded
    assert not (work / "merged-Q8_0.gguf").exists() and not (work / "merged-Q4_0.gguf").exists()
    assert _temps(work) == []
    monkeypatch.undo()
    assert [r.name for r in run_pipeline(cfg) if r.status == "ran"][-2:] == ["quantize:Q8_0", "quantize:Q4_0"]


def test_stale_scratch_folder_reported_and_removed(proj: Path, capsys, monkeypatch, tmp_path: Path) -> None:
    """A kill -9 while merge converts a PEFT folder leaves `$TMPDIR/loraq-<pid>-*` behind: status
    reports it, the next run removes it; a live process's scratch folder is kept."""
    import tempfile

    scratch_root = tmp_path / "systmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    cfgp = _cfg(proj, quantize={"types": ["Q8_0"], "threads": 1})
    run_pipeline(load_config(cfgp))
    dead = scratch_root / "loraq-999999999-abc123"
    (dead / "sub").mkdir(parents=True)
    (dead / "adapter-f32.gguf").write_bytes(b"x" * 3000)
    live = scratch_root / f"loraq-{os.getpid()}-zzz"
    live.mkdir()
    capsys.readouterr()
    assert run_cli(["status", str(cfgp)]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "1 leftover temporary file(s)" in out and "loraq-999999999-abc123" in out and "2.9 KiB" in out, out
    assert dead.exists()
    code, err = _cli(capsys, "run", cfgp)
    assert code == 0 and "removed 1 leftover temporary file(s)" in err and "loraq-999999999-abc123" in err, err
    assert not dead.exists() and live.exists()


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("bad", [0x7E00, 0xFC00])
def test_nan_or_inf_in_f16_input_is_refused(synth256: Path, tmp_path: Path, monkeypatch, ftype: str, pool: bool, bad: int) -> None:
    """llama-quantize refuses an F16 input holding NaN or Inf; so does loraq, on every path (the
    compiled F16 -> Q8_0 / Q4_0 kernels, the float32 one, in-process or in worker threads), and
    no output appears."""
    from loraq.gguf_io import open_gguf

    src = tmp_path / "nan.gguf"
    shutil.copyfile(synth256, src)
    with open_gguf(src) as f:
        t = f.tensor("blk.2.ffn_up.weight")
        assert t.type.name == "f16"
        offset = t.offset + 2 * (t.n_elements // 2 + 7)
    with open(src, "r+b") as fh:
        fh.seek(offset)
        fh.write(bad.to_bytes(2, "little"))
    if pool:
        monkeypatch.setattr(driver, "PARALLEL_MIN_ELEMENTS", 0)
    out = tmp_path / "out.gguf"
    with pytest.raises(BadInput, match=r"blk\.2\.ffn_up\.weight has invalid data"):
        driver.quantize_model(src, out, ftype, driver.QuantizeOptions(threads=2 if pool else 1))
    assert not out.exists()
