"""Bad inputs through the real command line: the documented exit code, one line on stderr, no
traceback, and nothing written (docs/design.md: exit codes; ground rule 3, nothing half-written).

Each case runs `python -m loraq …` in a subprocess whose working folder holds the shared
inputs; outputs are relative names in that folder. Before and after every case the folder (and
the folders of the session's model fixtures) is snapshotted — size, mtime and a content hash of
every file — and must not change: no output, no temporary file, no touched input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from scripts import make_demo_adapter

ROOT = Path(__file__).resolve().parents[1]

BAD_ARGS, BAD_INPUT, IO = 2, 4, 5

# ------------------------------------------------------------------------------------------------
# The cases: (id, argv, exit code, a fragment the error line must contain (case-insensitive)).
# Placeholders: {f16} SmolLM2 F16 base, {q4_1} the real Q4_1 SmolLM2, {s256} synthetic n_embd 256
# model (absolute paths, outside the work folder). Everything else is relative to the work folder.
# ------------------------------------------------------------------------------------------------
CASES = [
    # missing or unreadable inputs
    ("missing-base", ["merge", "nope.gguf", "--lora", "ad", "-o", "out.gguf"], BAD_ARGS, "not found"),
    ("missing-adapter-dir", ["merge", "{f16}", "--lora", "no-such-adapter", "-o", "out.gguf"], BAD_ARGS, "not found"),
    ("convert-missing-adapter", ["convert", "no-such-adapter", "--base", "{f16}", "-o", "out.gguf"], BAD_ARGS, "not found"),
    ("quantize-missing-input", ["quantize", "nope.gguf", "out.gguf", "Q8_0"], BAD_ARGS, "not found"),
    ("truncated-gguf-inspect", ["inspect", "trunc.gguf"], BAD_INPUT, "trunc.gguf"),
    ("truncated-gguf-quantize", ["quantize", "trunc.gguf", "out.gguf", "Q8_0"], BAD_INPUT, "trunc.gguf"),
    ("tiny-truncated-gguf", ["quantize", "stub.gguf", "out.gguf", "Q8_0"], BAD_INPUT, "stub.gguf"),
    ("not-gguf", ["inspect", "notes.gguf"], BAD_INPUT, "not a readable gguf"),
    ("not-gguf-quantize", ["quantize", "notes.gguf", "out.gguf", "Q4_0"], BAD_INPUT, "not a readable gguf"),
    # adapter does not fit the base
    ("adapter-other-arch", ["merge", "qwen2.gguf", "--lora", "ad256-llama.gguf", "-o", "out.gguf"], BAD_INPUT, "architecture"),
    ("adapter-other-modules", ["convert", "othermod", "--base", "{f16}", "-o", "out.gguf"], BAD_INPUT, "no counterpart"),
    ("adapter-other-width", ["convert", "ad", "--base", "{s256}", "-o", "out.gguf"], BAD_INPUT, "do not fit"),
    ("lora-is-a-model", ["merge", "{s256}", "--lora", "qwen2.gguf", "-o", "out.gguf"], BAD_INPUT, "not a gguf lora"),
    # adapter contents loraq refuses
    ("adapter-nan", ["merge", "{f16}", "--lora", "nan", "-o", "out.gguf"], BAD_INPUT, "nan"),
    ("adapter-bin-only", ["convert", "binonly", "--base", "{f16}", "-o", "out.gguf"], BAD_INPUT, "pickle"),
    ("adapter-dora", ["convert", "dora", "--base", "{f16}", "-o", "out.gguf"], BAD_INPUT, "dora"),
    # bad arguments
    ("unknown-quant-type", ["quantize", "{f16}", "out.gguf", "Q9_9"], BAD_ARGS, "unknown quantization type"),
    ("lora-scaled-no-scale", ["merge", "{f16}", "--lora-scaled", "ad", "-o", "out.gguf"], BAD_ARGS, "path:scale"),
    ("lora-scaled-bad-scale", ["merge", "{f16}", "--lora-scaled", "ad:big", "-o", "out.gguf"], BAD_ARGS, "path:scale"),
    ("requantize", ["quantize", "{q4_1}", "out.gguf", "Q8_0"], BAD_ARGS, "--allow-requantize"),
    ("merge-quantized-base", ["merge", "{q4_1}", "--lora", "ad", "-o", "out.gguf"], BAD_ARGS, "--allow-requantize"),
    ("quantize-out-is-in", ["quantize", "{f16}", "{f16}", "Q8_0"], BAD_ARGS, "different"),
    ("merge-out-is-base", ["merge", "{f16}", "--lora", "ad", "-o", "{f16}"], BAD_ARGS, "differ"),
    ("convert-out-is-base", ["convert", "ad", "--base", "{f16}", "-o", "{f16}"], BAD_ARGS, "base model"),
    ("convert-bad-outtype", ["convert", "ad", "--base", "{f16}", "-o", "out.gguf", "--outtype", "q4_0"], BAD_ARGS, "outtype"),
    # I/O: the output's folder cannot be created (a regular file is in the way; fails for root too)
    ("quantize-unwritable", ["quantize", "{f16}", "afile/sub/out.gguf", "Q8_0"], IO, "afile"),
    ("merge-unwritable", ["merge", "{f16}", "--lora", "ad", "-o", "afile/out.gguf"], IO, "afile"),
    # the config file
    ("config-near-miss-top", ["run", "c-adapterz.yaml"], BAD_ARGS, "did you mean 'adapters'"),
    ("config-near-miss-nested", ["run", "c-typez.yaml"], BAD_ARGS, "quantize.typez: unknown key; did you mean 'types'"),
    ("config-wrong-type", ["run", "c-wrongtype.yaml"], BAD_ARGS, "adapters.0.scale"),
    ("config-unknown-qtype", ["run", "c-qtype.yaml"], BAD_ARGS, "q9_9"),
    ("config-bad-yaml", ["run", "c-yaml.yaml"], BAD_ARGS, "not valid yaml"),
    ("config-missing-files", ["status", "c-missing.yaml"], BAD_ARGS, "base: file not found"),
    ("config-missing", ["run", "no-such-config.yaml"], BAD_ARGS, "config not found"),
    ("config-unwritable-workdir", ["run", "c-workdir.yaml", "--json"], IO, "afile"),
    ("config-nan-adapter", ["run", "c-nan.yaml", "--json"], BAD_INPUT, "nan"),
    # settings that do not work yet are refused, never accepted and ignored
    ("config-imatrix", ["run", "c-imatrix.yaml"], BAD_ARGS, "quantize.imatrix: always needs an imatrix section"),
    ("quantize-imatrix-missing", ["quantize", "{f16}", "out.gguf", "Q4_K_M", "--imatrix", "nope.dat"], BAD_ARGS, "imatrix file not found"),
    ("quantize-imatrix-is-text", ["quantize", "{f16}", "out.gguf", "Q4_K_M", "--imatrix", "afile"], BAD_INPUT, "neither a gguf file"),
    (
        "quantize-include-and-exclude-weights",
        ["quantize", "{f16}", "out.gguf", "Q4_K_M", "--include-weights", "attn_v", "--exclude-weights", "ffn"],
        BAD_ARGS,
        "cannot be used together",
    ),
    # messages are plain text: brackets in a path are not markup, and "[/x]" does not break the edge
    ("path-with-brackets", ["quantize", "br[run]/stub.gguf", "out.gguf", "Q8_0"], BAD_INPUT, "br[run]/stub.gguf"),
    ("path-with-markup-close", ["inspect", "m[/x]/y.gguf"], BAD_ARGS, "m[/x]/y.gguf"),
]


def _config(adapters: str = "  - path: ad\n", **over: str) -> str:
    keys = {"name": "t", "workdir": "wd", "base": "{f16}"} | over
    return "".join(f"{k}: {v}\n" for k, v in keys.items()) + "adapters:\n" + adapters + "quantize: {types: [Q8_0]}\n"


CONFIGS = {
    "c-adapterz.yaml": _config().replace("adapters:", "adapterz:"),
    "c-typez.yaml": _config().replace("{types:", "{typez:"),
    "c-wrongtype.yaml": _config(adapters="  - path: ad\n    scale: big\n"),
    "c-qtype.yaml": _config().replace("Q8_0", "Q9_9"),
    "c-yaml.yaml": _config().replace("{types: [Q8_0]}", "{types: [Q8_0}"),
    "c-missing.yaml": _config(base="missing.gguf"),
    "c-workdir.yaml": _config(workdir="afile/sub"),
    "c-nan.yaml": _config(adapters="  - path: nan\n"),
    "c-imatrix.yaml": _config().replace("{types: [Q8_0]}", "{types: [Q8_0], imatrix: always}"),
}


# ------------------------------------------------------------------------------------------------
# Inputs, built once for the module
# ------------------------------------------------------------------------------------------------
def _clone_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(d: Path, fn) -> None:
    f = d / "adapter_model.safetensors"
    tensors = fn(load_file(str(f)))
    save_file(tensors, str(f), metadata={"format": "pt"})


def _rename_arch(src: Path, dst: Path, new: bytes) -> None:
    """Copy a llama GGUF, renaming the architecture in the header (same length: offsets hold)."""
    import gguf

    r = gguf.GGUFReader(src)
    off = r.data_offset
    del r
    data = src.read_bytes()
    head = data[:off].replace(b"llama", new)
    assert len(new) == 5 and len(head) == off
    dst.write_bytes(head + data[off:])


@pytest.fixture(scope="module")
def work(smollm2_q4_1: Path, smollm2_f16: Path, synth256: Path, tmp_path_factory) -> dict:
    from loraq.convert import convert_adapter

    mk = make_demo_adapter
    w = tmp_path_factory.mktemp("cli_errors")
    ad = mk.make_adapter(smollm2_f16, w / "ad", rank=4, layers=[0, 1], seed=1)

    def nan(t):
        k = sorted(t)[0]
        t[k][0, 0] = np.nan
        return t

    _edit_tensors(_clone_adapter(ad, w / "nan"), nan)
    _edit_tensors(_clone_adapter(ad, w / "othermod"), lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})
    binonly = _clone_adapter(ad, w / "binonly")
    (binonly / "adapter_model.safetensors").unlink()
    (binonly / "adapter_model.bin").write_bytes(b"PK\x03\x04 not really a torch pickle")
    dora = _clone_adapter(ad, w / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _edit_tensors(dora, lambda t: t | {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(576, np.float32)})

    # an adapter GGUF for the llama synthetic model, and that model renamed to qwen2
    side = tmp_path_factory.mktemp("cli_errors_side")
    ad256 = mk.make_adapter(synth256, side / "ad256", rank=4, layers=[0], seed=2)
    convert_adapter(ad256, synth256, w / "ad256-llama.gguf", outtype="f32")
    _rename_arch(synth256, w / "qwen2.gguf", b"qwen2")

    data = smollm2_q4_1.read_bytes()
    (w / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (w / "stub.gguf").write_bytes(data[:1000])
    (w / "br[run]").mkdir()
    (w / "br[run]" / "stub.gguf").write_bytes(data[:1000])
    del data
    (w / "notes.gguf").write_text("these are my notes, not a model\n")
    (w / "afile").write_text("a regular file where a folder is expected\n")
    subs = {"{f16}": str(smollm2_f16), "{q4_1}": str(smollm2_q4_1), "{s256}": str(synth256)}
    for name, text in CONFIGS.items():
        for k, v in subs.items():
            text = text.replace(k, v)
        (w / name).write_text(text)
    # folders whose files must not change either (the fixtures' own folders)
    watch = [w, smollm2_f16.parent, synth256.parent]
    return {"dir": w, "subs": subs, "watch": watch}


# ------------------------------------------------------------------------------------------------
# Snapshots
# ------------------------------------------------------------------------------------------------
_FULL_HASH_LIMIT = 8 << 20


def _digest(p: Path, size: int) -> str:
    """sha256 of the file; above 8 MiB, of its first and last MiB (size and mtime cover the rest)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def snapshot(roots: list[Path]) -> dict[str, tuple[int, int, str]]:
    snap = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                st = p.lstat()
                snap[str(p)] = (st.st_size, st.st_mtime_ns, _digest(p, st.st_size) if p.is_file() else "link")
    return snap


def _changes(before: dict, after: dict) -> list[str]:
    out = [f"new: {p}" for p in after.keys() - before.keys()]
    out += [f"removed: {p}" for p in before.keys() - after.keys()]
    out += [f"modified: {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------
# Each case is a `python -m loraq` start (about a second of CPU): make test runs one case per exit
# code and kind of input, make test-slow the rest.
FAST = {"missing-base", "truncated-gguf-quantize", "adapter-nan", "unknown-quant-type", "merge-unwritable", "config-near-miss-nested"}


@pytest.mark.parametrize(
    "argv,code,fragment", [pytest.param(a, c, f, id=i, marks=() if i in FAST else pytest.mark.slow) for i, a, c, f in CASES]
)
def test_bad_input(work: dict, argv: list[str], code: int, fragment: str) -> None:
    args = []
    for a in argv:
        for k, v in work["subs"].items():
            a = a.replace(k, v)
        args.append(a)
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))  # a narrow console must not wrap the line
    before = snapshot(work["watch"])
    proc = subprocess.run([sys.executable, "-m", "loraq", *args], cwd=work["dir"], env=env, capture_output=True, text=True, timeout=120)
    after = snapshot(work["watch"])
    shown = f"loraq {' '.join(args)}\n--- stdout:\n{proc.stdout}--- stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode == code, shown
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, shown
    assert lines[0].startswith("error:"), shown
    assert fragment.lower() in lines[0].lower(), shown
    assert _changes(before, after) == [], shown
