"""Hostile files through the real command line (issue 9, part A): malformed GGUFs, adapters and
configs that loraq once accepted and re-emitted as corrupt files, hung on, or crashed on (exit 1).

Each row runs the CLI (loraq.cli.run_cli in-process; `python -m loraq` in a subprocess for the
rows that once hung, and for the sparse file) and asserts the documented exit code, a fragment
of the one error line, no traceback, no extra stderr line (e.g. a numpy RuntimeWarning), no hang,
and that nothing in the work folder changed (no output, no temporary file). The GGUF rows use
`quantize`, which on the old code re-emitted the broken file with exit 0. What llama.cpp's loader
accepts (a 0-dimensional or 0-element tensor) is accepted too, in test_what_llama_cpp_accepts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import hostile_files as H
from loraq.errors import BadInput
from loraq.gguf_io import open_gguf
from scripts import make_demo_adapter
from test_cli_errors import _changes, snapshot

ROOT = Path(__file__).resolve().parents[1]
BAD_ARGS, BAD_INPUT = 2, 4
SPARSE_SIZE = 256 << 20

Q = ["quantize", "{f}", "out.gguf", "Q8_0"]  # {f}: the row's input file


def _q(name: str) -> list[str]:
    return [a.replace("{f}", name) for a in Q]


def _convert(ad: str) -> list[str]:
    return ["convert", ad, "--base", "{f16}", "-o", "out.gguf"]


def _merge(lora: str) -> list[str]:
    return ["merge", "{f16}", "--lora", lora, "-o", "out.gguf"]


# (id, argv, exit code, fragment of the error line (case-insensitive))
CASES = [
    # GGUF containers llama.cpp's loader rejects (gguf.cpp gguf_init_from_file_impl)
    ("gguf-sparse-256mb-corrupt", _q("sparse.gguf"), BAD_INPUT, "key 0 is empty"),
    ("gguf-duplicate-tensor", _q("dup-tensor.gguf"), BAD_INPUT, "tensor 'w.weight' appears twice"),
    ("gguf-ne-product-wraps", _q("ne-wraps.gguf"), BAD_INPUT, "more than int64"),
    ("gguf-ne-negative", _q("ne-negative.gguf"), BAD_INPUT, "negative dimension"),
    ("gguf-ndims-5", _q("ndims5.gguf"), BAD_INPUT, "5 dimensions"),
    ("gguf-overlapping-offsets", _q("overlap.gguf"), BAD_INPUT, "has data offset 0, expected 512"),
    ("gguf-misaligned-offset", _q("misaligned.gguf"), BAD_INPUT, "has data offset 16, expected 32"),
    ("gguf-alignment-0", _q("align0.gguf"), BAD_INPUT, "alignment 0 is not a power of two"),
    ("gguf-alignment-3", _q("align3.gguf"), BAD_INPUT, "alignment 3 is not a power of two"),
    ("gguf-alignment-not-u32", _q("align-str.gguf"), BAD_INPUT, "general.alignment' must be uint32"),
    ("gguf-n-kv-huge", _q("nkv-huge.gguf"), BAD_INPUT, "remaining bytes"),
    ("gguf-n-tensors-huge", _q("nt-huge.gguf"), BAD_INPUT, "remaining bytes"),
    ("gguf-string-length-huge", _q("str-huge.gguf"), BAD_INPUT, "general.name"),
    ("gguf-array-length-huge", _q("arr-huge.gguf"), BAD_INPUT, "claims"),
    ("gguf-nested-arrays-10k", _q("nested.gguf"), BAD_INPUT, "array of arrays"),
    ("gguf-duplicate-key", _q("dup-key.gguf"), BAD_INPUT, "key 'general.name' appears twice"),
    ("gguf-unknown-value-type", _q("vtype.gguf"), BAD_INPUT, "unknown value type 13"),
    ("gguf-tensor-name-not-utf8", _q("name-utf8.gguf"), BAD_INPUT, "not utf-8"),
    ("gguf-tensor-name-too-long", _q("name-long.gguf"), BAD_INPUT, "more than the 63 allowed"),
    ("gguf-unknown-tensor-type", _q("ttype.gguf"), BAD_INPUT, "unknown ggml type 4"),
    ("gguf-head-count-string", _q("hc-str.gguf"), BAD_INPUT, "llama.block_count must be an integer"),
    # GGUF LoRA adapters with KVs of the wrong type (llama.cpp's typed getters assert them)
    ("lora-alpha-string", _merge("alpha-str.gguf"), BAD_INPUT, "adapter.lora.alpha must be a float32"),
    ("lora-alpha-float64", _merge("alpha-f64.gguf"), BAD_INPUT, "adapter.lora.alpha must be a float32"),
    ("lora-alpha-inf", _merge("alpha-inf.gguf"), BAD_INPUT, "adapter.lora.alpha is inf"),
    ("lora-general-type-u32", _merge("gtype-u32.gguf"), BAD_INPUT, "general.type must be a string"),
    # PEFT adapter folders
    ("adapter-catastrophic-regex", _convert("regex"), BAD_INPUT, "takes too long to match"),
    ("adapter-invalid-regex", _convert("badregex"), BAD_INPUT, "not a valid regular expression"),
    ("adapter-lora-alpha-1e300", _convert("alpha1e300"), BAD_INPUT, "lora_alpha must be a finite number"),
    ("adapter-use-rslora-string", _convert("rslora-str"), BAD_INPUT, "use_rslora must be true or false"),
    ("adapter-f64-beyond-f32", [*_convert("f64big"), "--outtype", "f32"], BAD_INPUT, "beyond float32's range"),
    ("adapter-config-deep-json", _convert("deepcfg"), BAD_INPUT, "nests json too deeply"),
    ("adapter-config-not-utf8", _convert("cfg-latin1"), BAD_INPUT, "not utf-8"),
    ("adapter-config-huge-int", _convert("cfg-bigint"), BAD_INPUT, "not valid json"),
    ("safetensors-header-past-file", _convert("st-len"), BAD_INPUT, "past the end of the file"),
    ("safetensors-offsets-out-of-range", _convert("st-range"), BAD_INPUT, "past the end of the data section"),
    ("safetensors-overlap", _convert("st-overlap"), BAD_INPUT, "overlap"),
    ("safetensors-shape-mismatch", _convert("st-shape"), BAD_INPUT, "but data_offsets"),
    ("safetensors-deep-json", _convert("st-deep"), BAD_INPUT, "nests json too deeply"),
    ("safetensors-unknown-dtype", _convert("st-dtype"), BAD_INPUT, "has dtype"),
    # configs (`status` validates the config and writes nothing else)
    ("config-nan-scale", ["status", "c-nanscale.yaml"], BAD_ARGS, "adapters.0.scale: input should be a finite number"),
    ("config-max-kld-mean-nan", ["status", "c-kldnan.yaml"], BAD_ARGS, "compare.gates.max_kld_mean: input should be a finite number"),
    ("config-scale-huge", ["status", "c-bigscale.yaml"], BAD_ARGS, "adapters.0.scale"),
    ("config-not-utf8", ["status", "c-latin1.yaml"], BAD_ARGS, "not utf-8"),
    ("config-deep-yaml", ["status", "c-deep.yaml"], BAD_ARGS, "nested"),
    ("config-alias-bomb", ["status", "c-bomb.yaml"], BAD_ARGS, "alias bomb"),
    # numbers on the command line
    ("cli-lora-scaled-nan", ["merge", "{f16}", "--lora-scaled", "ad:nan", "-o", "out.gguf"], BAD_ARGS, "--lora-scaled scale"),
    (
        "cli-max-kld-mean-nan",
        ["compare", "{f16}", "-f", "ids.json", "--lora", "ad", "-o", "wd", "-c", "8", "--chunks", "1", "--max-kld-mean", "nan"],
        BAD_ARGS,
        "--max-kld-mean",
    ),
    # the evaluation text
    (
        "json-token-id-2^31",
        ["compare", "{f16}", "-f", "big-ids.json", "--lora", "ad", "-o", "wd", "-c", "8", "--chunks", "1"],
        BAD_INPUT,
        "entry 3 is 2147483648",
    ),
    (
        "json-token-ids-nested",
        ["compare", "{f16}", "-f", "deep-ids.json", "--lora", "ad", "-o", "wd", "-c", "8"],
        BAD_INPUT,
        "nests too deeply",
    ),
]


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _sparse(path: Path) -> Path:
    """256 MiB, all holes but a header claiming 18 million KVs: zeros parse as empty keys of
    UINT8 values, so the old parser looped over 18M records (about a minute and 1 GB+)."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 18_000_000))
        f.truncate(SPARSE_SIZE)
    return path


def _gguf_files(w: Path) -> None:
    m, kvs = H.model, H.BASE_KVS
    w32 = [("w.weight", (32, 4))]
    H.write(w / "dup-tensor.gguf", m([("w.weight", (32, 4)), ("w.weight", (32, 4))]))
    H.write(w / "ne-wraps.gguf", H.gguf(kvs, [H.info("w.weight", (32, 1 << 32, 1 << 32))]))  # rows: 2^64, 0 in int64
    H.write(w / "ne-negative.gguf", H.gguf(kvs, [H.info("w.weight", (32, -4))]))
    H.write(w / "ndims5.gguf", H.gguf(kvs, [H.info("w.weight", (32, 1, 1, 1, 1))], b"\0" * 128))
    data = b"\0" * 1024
    H.write(w / "overlap.gguf", H.gguf(kvs, [H.info("a.weight", (32, 4)), H.info("b.weight", (32, 4), offset=0)], data))
    H.write(w / "misaligned.gguf", H.gguf(kvs, [H.info("a.weight", (4,)), H.info("b.weight", (4,), offset=16)], b"\0" * 64))
    H.write(w / "align0.gguf", m(w32, [H.kv_u32("general.alignment", 0)]))
    H.write(w / "align3.gguf", m(w32, [H.kv_u32("general.alignment", 3)]))
    H.write(w / "align-str.gguf", m(w32, [H.kv_str("general.alignment", "32")]))
    H.write(w / "nkv-huge.gguf", H.gguf(kvs, [], n_kv=1 << 62))
    H.write(w / "nt-huge.gguf", H.gguf(kvs, [], n_tensors=1 << 40))
    H.write(w / "str-huge.gguf", m(w32, [H.kv("general.name", H.STRING, struct.pack("<Q", 1 << 40) + b"x" * 16)]))
    H.write(w / "arr-huge.gguf", m(w32, [H.kv_arr("general.tags", H.UINT32, 1 << 40, b"")]))
    nested = struct.pack("<IQ", H.ARRAY, 1) * 10_000 + struct.pack("<IQ", H.UINT8, 0)
    H.write(w / "nested.gguf", m(w32, [H.kv("general.deep", H.ARRAY, nested)]))
    H.write(w / "dup-key.gguf", m(w32, [H.kv_str("general.name", "a"), H.kv_str("general.name", "b")]))
    H.write(w / "vtype.gguf", m(w32, [H.kv("general.odd", 13, b"\0" * 8)]))
    H.write(w / "name-utf8.gguf", H.gguf(kvs, [H.info(b"w\xff.weight", (32, 4))], b"\0" * 512))
    H.write(w / "name-long.gguf", m([("blk.0." + "x" * 60 + ".weight", (32, 4))]))
    H.write(w / "ttype.gguf", H.gguf(kvs, [H.info("w.weight", (32, 4), tid=4)], b"\0" * 512))
    hc = [H.kv_str("general.architecture", "llama"), H.kv_str("llama.block_count", "one")]
    H.write(w / "hc-str.gguf", H.gguf(hc, [H.info("w.weight", (32, 4))], b"\0" * 512))
    _sparse(w / "sparse.gguf")


def _lora_variants(good: Path, w: Path) -> None:
    """The converted LoRA with one KV record replaced (the data section is copied as it is)."""
    g = open_gguf(good)
    data_start = g.tensors[0].offset
    raw = good.read_bytes()
    records = {k: kv.raw for k, kv in g.kvs.items()}
    infos = b"".join(H.info(t.name, t.ne, t.type.id, t.offset - data_start) for t in g.tensors)

    def variant(name: str, key: str, record: bytes) -> None:
        kvs = [record if k == key else r for k, r in records.items()]
        head = b"GGUF" + struct.pack("<IQQ", 3, len(g.tensors), len(kvs)) + b"".join(kvs) + infos
        (w / name).write_bytes(head + b"\0" * (-len(head) % 32) + raw[data_start:])

    variant("alpha-str.gguf", "adapter.lora.alpha", H.kv_str("adapter.lora.alpha", "abc"))
    variant("alpha-f64.gguf", "adapter.lora.alpha", H.kv("adapter.lora.alpha", H.FLOAT64, struct.pack("<d", 8.0)))
    variant("alpha-inf.gguf", "adapter.lora.alpha", H.kv_f32("adapter.lora.alpha", float("inf")))
    variant("gtype-u32.gguf", "general.type", H.kv_u32("general.type", 1))


def _adapters(ad: Path, w: Path) -> None:
    import shutil

    def clone(name: str, **cfg_over) -> Path:
        d = w / name
        shutil.copytree(ad, d)
        if cfg_over:
            p = d / "adapter_config.json"
            p.write_text(json.dumps(json.loads(p.read_text()) | cfg_over, indent=2))
        return d

    clone("regex", alpha_pattern={r"((.|..)*)*[^a-z_.0-9]": 8})
    clone("badregex", alpha_pattern={r"q_proj(": 8})
    clone("alpha1e300", lora_alpha=1e300)
    clone("rslora-str", use_rslora="false")
    from safetensors.numpy import load_file, save_file

    t = load_file(str(ad / "adapter_model.safetensors"))
    t = {k: v.astype(np.float64) for k, v in t.items()}
    t[sorted(t)[0]][0, 0] = 1e300  # finite in F64; inf once cast to the GGUF's float32
    save_file(t, str(clone("f64big") / "adapter_model.safetensors"), metadata={"format": "pt"})
    (clone("deepcfg") / "adapter_config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (clone("cfg-latin1") / "adapter_config.json").write_bytes(b'{"lora_alpha": 8, "peft_type": "LORA", "x": "caf\xe9"}')
    (clone("cfg-bigint") / "adapter_config.json").write_text('{"lora_alpha": ' + "9" * 5000 + "}")

    st = ad / "adapter_model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def with_header(name: str, h: dict | bytes, length: int | None = None) -> None:
        hb = h if isinstance(h, bytes) else json.dumps(h).encode()
        (clone(name) / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + body)

    keys = sorted(k for k in header if k != "__metadata__")
    k0, k1 = keys[0], keys[1]
    with_header("st-len", header, length=len(raw) * 2)
    h = json.loads(json.dumps(header))
    lo, hi = h[k0]["data_offsets"]
    h[k0]["data_offsets"] = [lo + len(body), hi + len(body)]
    with_header("st-range", h)
    h = json.loads(json.dumps(header))
    h[k1]["data_offsets"] = h[k0]["data_offsets"]
    h[k1]["shape"], h[k1]["dtype"] = h[k0]["shape"], h[k0]["dtype"]
    with_header("st-overlap", h)
    h = json.loads(json.dumps(header))
    h[k0]["shape"] = [1 << 32, 1 << 32]  # 2^64 elements: wraps to 0 in int64
    with_header("st-shape", h)
    with_header("st-deep", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    h = json.loads(json.dumps(header))
    h[k0]["dtype"] = "F8_E4M3"
    with_header("st-dtype", h)


def _config(f16: Path, adapters: str = "  - path: ad\n", extra: str = "") -> str:
    return f"name: t\nworkdir: wd\nbase: {f16}\nadapters:\n{adapters}quantize: {{types: [Q8_0]}}\n{extra}"


def _configs(f16: Path, w: Path) -> None:
    (w / "eval.txt").write_text("hello world " * 50)
    (w / "c-nanscale.yaml").write_text(_config(f16, "  - path: ad\n    scale: .nan\n"))
    (w / "c-bigscale.yaml").write_text(_config(f16, "  - path: ad\n    scale: 1e300\n"))
    (w / "c-kldnan.yaml").write_text(_config(f16, extra="compare:\n  text: eval.txt\n  gates: {max_kld_mean: .nan}\n"))
    (w / "c-latin1.yaml").write_bytes(_config(f16).encode() + b"# caf\xe9\n")
    (w / "c-deep.yaml").write_text(_config(f16) + "x: " + "[" * 10_000 + "]" * 10_000 + "\n")
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        bomb += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    (w / "c-bomb.yaml").write_text(_config(f16, extra=bomb + "quantize_x: *a8\n"))
    (w / "ids.json").write_text(json.dumps(list(range(1, 100))))
    (w / "big-ids.json").write_text(json.dumps([1, 2, 3, 2**31, 5, 6, 7, 8, 9]))
    (w / "deep-ids.json").write_text("[" * 100_000 + "]" * 100_000)


@pytest.fixture(scope="module")
def work(smollm2_f16: Path, tmp_path_factory) -> dict:
    from loraq.convert import convert_adapter

    w = tmp_path_factory.mktemp("hostile")
    side = tmp_path_factory.mktemp("hostile_side")
    ad = make_demo_adapter.make_adapter(smollm2_f16, w / "ad", rank=4, layers=[0], seed=1, targets=["q_proj", "v_proj"])
    convert_adapter(ad, smollm2_f16, side / "good-lora.gguf", outtype="f32")
    _gguf_files(w)
    _lora_variants(side / "good-lora.gguf", w)
    _adapters(ad, w)
    _configs(smollm2_f16, w)
    return {"dir": w, "subs": {"{f16}": str(smollm2_f16)}, "watch": [w, smollm2_f16.parent]}


def _args(work: dict, argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in work["subs"].items():
            a = a.replace(k, v)
        out.append(a)
    return out


def run_subprocess(work: dict, argv: list[str], timeout: float = 60) -> tuple[int, str, str]:
    """`python -m loraq ARGV` in the work folder: (exit code, stdout, stderr); a hang fails."""
    args = _args(work, argv)
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "loraq", *args], cwd=work["dir"], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loraq {' '.join(args)} hung (no answer in {timeout} s)")
    return proc.returncode, proc.stdout, proc.stderr


def run_inprocess(work: dict, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The same through loraq.cli.run_cli (fast); a warning counts as one more stderr line, as
    it would be outside pytest, which otherwise captures warnings itself."""
    from loraq.cli import run_cli

    monkeypatch.chdir(work["dir"])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_cli(_args(work, argv))
    out, err = capsys.readouterr()
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return code, out, err


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
# rows that once hung run in a subprocess, so a regression fails on a timeout instead of hanging pytest
SUBPROCESS = {"adapter-catastrophic-regex", "config-alias-bomb"}


@pytest.mark.parametrize("argv,code,fragment,sub", [pytest.param(a, c, f, i in SUBPROCESS, id=i) for i, a, c, f in CASES])
def test_hostile_input(work: dict, argv: list[str], code: int, fragment: str, sub: bool, capsys, monkeypatch) -> None:
    before = snapshot(work["watch"])
    t0 = time.monotonic()
    rc, out, err = run_subprocess(work, argv) if sub else run_inprocess(work, argv, capsys, monkeypatch)
    elapsed = time.monotonic() - t0
    shown = f"loraq {' '.join(_args(work, argv))}\n--- exit {rc}, stdout:\n{out}--- stderr:\n{err}"
    assert _changes(before, snapshot(work["watch"])) == [], shown
    assert "Traceback" not in out + err, shown
    assert rc == code, shown
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), shown
    assert fragment.lower() in lines[0].lower(), shown
    assert elapsed < 20, f"{elapsed:.1f} s\n{shown}"


def test_sparse_corrupt_file_via_cli(work: dict, tmp_path: Path) -> None:
    """The real command line on the 256 MiB sparse file: exit 4 at once, with the memory of a bare
    start (the old parser: a minute or more and over 1 GB)."""
    rss = tmp_path / "maxrss"
    script = (
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of a big pytest
        # process would report the parent's peak; VmHWM belongs to the new program's memory map.
        "import re, sys; from loraq.cli import run_cli; rc = run_cli(sys.argv[2:]); "
        "st = open('/proc/self/status').read(); "
        "open(sys.argv[1], 'w').write(re.search(r'VmHWM:\\s+(\\d+) kB', st).group(1)); sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(rss), *_q("sparse.gguf")],
            cwd=work["dir"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loraq quantize on the sparse file hung")
    elapsed = time.monotonic() - t0
    assert proc.returncode == BAD_INPUT and "key 0 is empty" in proc.stderr, proc.stderr
    assert elapsed < 10, elapsed
    assert int(rss.read_text()) < 200 << 10, f"max RSS {int(rss.read_text()) >> 10} MiB"  # KiB; a bare start is ~60 MiB


def test_sparse_corrupt_file_is_not_read(work: dict) -> None:
    """A 256 MiB file (all holes) whose header is corrupt: rejected at once, reading one chunk.
    The old parser re-read 8, 32, 128 and 256 MiB prefixes (65 s and 1.3 GB on a slow disk)."""
    p = work["dir"] / "sparse.gguf"
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(BadInput, match="key 0 is empty"):
            open_gguf(p)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"


def test_what_llama_cpp_accepts(tmp_path: Path) -> None:
    """gguf.cpp accepts n_dims 0 (one element, every ne is 1) and 0-element tensors: so does loraq
    (the old parser crashed on n_dims 0 with an IndexError, exit 1)."""
    p = H.write(tmp_path / "odd.gguf", H.gguf(H.BASE_KVS, [H.info("s.weight", ()), H.info("z.weight", (0, 4), offset=32)], b"\0" * 32))
    f = open_gguf(p)
    assert [(t.name, t.ne, t.nbytes, t.n_elements) for t in f.tensors] == [("s.weight", (1,), 4, 1), ("z.weight", (0, 4), 0, 0)]
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "loraq", "inspect", str(p)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "z.weight" in proc.stdout, proc.stderr
    for t in ("Q4_0", "Q8_0"):  # quantize copies the 0-element tensor as 0 bytes of the new type (was ZeroDivisionError, exit 1)
        out = tmp_path / f"odd-{t}.gguf"
        proc = subprocess.run(
            [sys.executable, "-m", "loraq", "quantize", str(p), str(out), t], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        z = open_gguf(out).tensor("z.weight")
        assert (z.ne, z.nbytes, z.type.name) == ((0, 4), 0, t.lower())


def test_smollm2_header_parses_fast(smollm2_q4_1: Path) -> None:
    """The single-pass parser keeps the old speed on a real 49k-token vocabulary."""
    from loraq.gguf_io.header import parse_header

    size = smollm2_q4_1.stat().st_size
    best = min(_timed(lambda: parse_header(smollm2_q4_1, size)) for _ in range(3))
    assert best < 0.5, best  # about 0.1 s on a loaded 2-core machine


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_catastrophic_tensor_type_pattern(monkeypatch) -> None:
    """--tensor-type / quantize.tensor_types patterns are matched under a time limit too (with
    `re`, this search takes hours on a 36-character tensor name)."""
    from loraq.errors import BadArguments
    from loraq.quantize.rules import _TimedPattern

    monkeypatch.setattr(_TimedPattern, "TIMEOUT_S", 0.2)
    p = _TimedPattern("((.|..)*)*[^a-z_.0-9]")
    t0 = time.monotonic()
    with pytest.raises(BadArguments, match="takes too long to match"):
        p.search("blk.0.ffn_down.weight.something.long")
    assert time.monotonic() - t0 < 5
    assert _TimedPattern("attn_(q|k)").search("blk.0.attn_q.weight")
    with pytest.raises(BadArguments, match="not a valid regular expression"):
        _TimedPattern("attn_(q")
