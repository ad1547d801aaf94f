"""Property-based fuzzing of loraq's readers of untrusted files (issue 9, part A).

Three readers, each fed mutated and generated inputs with hypothesis (derandomized, no example
database, so CI runs the same examples every time):
  (a) the GGUF header parser: byte flips, truncations, overwritten counts and lengths, inserted
      bytes in a small valid file, and headers generated field by field;
  (b) the PEFT adapter reader: adapter_config.json and adapter_model.safetensors mutated and
      generated (then every tensor read);
  (c) the YAML config loader: generated documents around the real keys, with odd values.
The property: a reader either succeeds or raises a LoraqError (never another exception), within
the per-example deadline, allocating little (tracemalloc peak bounded). Where the GGUF parser
accepts a file, what it returns obeys llama.cpp's rules (unique names, aligned consecutive
offsets, data inside the file)."""

from __future__ import annotations

import itertools
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import hostile_files as H
from loraq.convert.peft import load_peft_adapter
from loraq.errors import LoraqError
from loraq.gguf_io.header import parse_header
from loraq.pipeline.config import load_config

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=2000,  # ms per example: a hang or a quadratic blow-up fails the test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
PEAK = 16 << 20  # bytes any one example may allocate (the inputs are a few KiB)
_ids = itertools.count()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _bounded(fn):
    """fn() under tracemalloc; returns (result or the LoraqError raised, peak bytes)."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except LoraqError as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------------------
# (a) GGUF headers
# ------------------------------------------------------------------------------------------------
VALID = H.model(
    [("blk.0.attn_q.weight", (32, 4)), ("blk.0.attn_k.weight", (32, 2)), ("output_norm.weight", (8,))],
    [
        H.kv_str("general.name", "fuzz"),
        H.kv_arr("tokenizer.ggml.tokens", H.STRING, 3, H.s("a") + H.s("bc") + H.s("\u00e9")),
        H.kv_arr("tokenizer.ggml.scores", H.FLOAT32, 3, struct.pack("<3f", 0.0, -1.0, -2.0)),
        H.kv_u32("general.alignment", 32),
    ],
)
HEADER_END = VALID.index(b"output_norm.weight") + len("output_norm.weight") + 4 + 8 + 4 + 8
BIG = st.sampled_from([0, 1, 2, 3, 4, 5, 13, 255, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])


@st.composite
def mutated_gguf(draw) -> bytes:
    b = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "u64", "u32", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, min(len(b), HEADER_END + 8)))  # mostly the header
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "u64" and pos + 8 <= len(b):
            b[pos : pos + 8] = struct.pack("<Q", draw(BIG))
        elif kind == "u32" and pos + 4 <= len(b):
            b[pos : pos + 4] = struct.pack("<I", draw(BIG) & 0xFFFFFFFF)
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del b[pos : pos + draw(st.integers(1, 16))]
    return bytes(b)


KEYS = st.sampled_from(["general.name", "general.alignment", "a", "", "general.name", "x" * 70, "\u00e9t\u00e9"])
VTYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0xFFFFFFFF])


@st.composite
def generated_gguf(draw) -> bytes:
    kvs = []
    for _ in range(draw(st.integers(0, 4))):
        vt = draw(VTYPES)
        if vt == H.STRING:
            payload = H.s(draw(st.binary(max_size=8)))
        elif vt == H.ARRAY:
            sub, n = draw(VTYPES), draw(st.one_of(st.integers(0, 4), BIG))
            payload = struct.pack("<IQ", sub, n) + draw(st.binary(max_size=40))
        else:
            payload = draw(st.binary(min_size=0, max_size=8))
        kvs.append(H.kv(draw(KEYS), vt, payload))
    infos, offset = [], 0
    for i in range(draw(st.integers(0, 4))):
        nd = draw(st.integers(0, 5))
        ne = tuple(draw(st.one_of(st.integers(0, 64), st.sampled_from([-1, 1 << 32, (1 << 63) - 1]))) for _ in range(nd))
        tid = draw(st.sampled_from([0, 1, 2, 4, 8, 12, 30, 39, 1000]))
        off = draw(st.one_of(st.just(offset), st.integers(0, 1 << 20), BIG))
        name = draw(st.sampled_from([f"t{i}", "t0", "", "\udcff"])).encode("utf-8", "surrogateescape")
        infos.append(H.info(name, ne, tid, off))
        offset += 64
    data = b"\0" * draw(st.integers(0, 512))
    return H.gguf(kvs, infos, data, n_kv=draw(st.one_of(st.none(), BIG)), n_tensors=draw(st.one_of(st.none(), BIG)))


def _check_gguf(fuzz_dir: Path, data: bytes) -> None:
    p = fuzz_dir / f"g{next(_ids)}.gguf"
    p.write_bytes(data)
    try:
        out, peak = _bounded(lambda: parse_header(p, len(data)))
    finally:
        p.unlink()
    assert peak < PEAK, peak
    if isinstance(out, LoraqError):
        assert "\n" not in str(out)
        return
    kvs, tensors = out
    keys = [kv.key for kv in kvs]
    assert len(set(keys)) == len(keys) and all(keys)
    assert len({t.name for t in tensors}) == len(tensors)
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    end = tensors[0].offset if tensors else 0
    for t in tensors:  # consecutive, aligned, inside the file
        assert t.offset == end and t.offset % align == 0 and t.offset + t.nbytes <= len(data)
        assert 1 <= len(t.ne) <= 4 and min(t.ne) >= 0 and t.n_elements < 1 << 63
        end = t.offset + -(-t.nbytes // align) * align


@settings(FUZZ, max_examples=250)
@given(data=mutated_gguf())
def test_fuzz_gguf_mutations(fuzz_dir: Path, data: bytes) -> None:
    _check_gguf(fuzz_dir, data)


@settings(FUZZ, max_examples=200)
@given(data=generated_gguf())
def test_fuzz_gguf_generated(fuzz_dir: Path, data: bytes) -> None:
    _check_gguf(fuzz_dir, data)


def test_valid_seed_parses(fuzz_dir: Path) -> None:
    """The mutation seed is itself valid, so mutations explore near-valid files."""
    p = fuzz_dir / "seed.gguf"
    p.write_bytes(VALID)
    kvs, tensors = parse_header(p, len(VALID))
    assert [t.name for t in tensors] == ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "output_norm.weight"]
    assert dict((kv.key, kv.value) for kv in kvs)["tokenizer.ggml.tokens"] == ["a", "bc", "\u00e9"]


# ------------------------------------------------------------------------------------------------
# (b) PEFT adapter folders
# ------------------------------------------------------------------------------------------------
_MOD = "base_model.model.model.layers.0.self_attn.q_proj"
_rng = np.random.default_rng(0)
_TENSORS = {
    f"{_MOD}.lora_A.weight": _rng.standard_normal((2, 8)).astype(np.float32),
    f"{_MOD}.lora_B.weight": _rng.standard_normal((8, 2)).astype(np.float16),
}
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False, "use_dora": False, "alpha_pattern": {}, "rank_pattern": {}}

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e300, -0.0, 4, 2]),
    st.text(max_size=12),
    st.sampled_from(["(a+)+$", "q_proj", "((.|..)*)*[^a-z_.0-9]", "q_proj(", r"\1", "(?<=x)q"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8
)


PATTERNS = st.sampled_from(["q_proj", "layers\\.0\\..*", "(a+)+$", "((.|..)*)*[^a-z_.0-9]", "q_proj(", "(?<=x)q", "\\1"])
HOSTILE = st.sampled_from([1e300, -1e300, 1e7, 0, -0.0, 2**70, "false", "true", "8", [], {}, None])


@st.composite
def adapter_config(draw) -> bytes:
    cfg = dict(CONFIG)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*CONFIG, "modules_to_save", "bias", "other"]))
        cfg[key] = draw(st.one_of(JSON_VALUES, HOSTILE))
    if draw(st.booleans()):
        cfg["alpha_pattern"] = {draw(PATTERNS): draw(st.one_of(st.just(8), HOSTILE))}
    raw = json.dumps(cfg).encode()
    how = draw(st.sampled_from(["none", "none", "truncate", "nan", "latin1", "deep", "bigint"]))
    if how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif how == "nan":
        raw = raw.replace(b'"lora_alpha": 4', b'"lora_alpha": NaN')
    elif how == "latin1":
        raw = raw[:-1] + b', "x": "caf\xe9"}'
    elif how == "deep":
        raw = raw[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    elif how == "bigint":
        raw = raw.replace(b'"lora_alpha": 4', b'"lora_alpha": ' + b"9" * 5000)
    return raw


def _safetensors_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_file(_TENSORS, f"{d}/a.safetensors", metadata={"format": "pt"})
        return Path(f"{d}/a.safetensors").read_bytes()


ST = _safetensors_bytes()
(_ST_N,) = struct.unpack("<Q", ST[:8])
ST_HEADER = json.loads(ST[8 : 8 + _ST_N])


@st.composite
def safetensors_file(draw) -> bytes:
    how = draw(st.sampled_from(["bytes", "header", "length"]))
    if how == "length":
        return struct.pack("<Q", draw(BIG)) + ST[8:]
    if how == "bytes":
        b = bytearray(ST)
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(b) - 1))
            b[pos] = draw(st.integers(0, 255))
        return bytes(b[: draw(st.one_of(st.just(len(b)), st.integers(0, len(b))))])
    h = json.loads(json.dumps(ST_HEADER))
    key = draw(st.sampled_from(sorted(h)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]))
    value = draw(
        st.one_of(
            JSON_VALUES,
            st.lists(st.one_of(st.integers(-1, 64), BIG), max_size=3),
            st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "F8_E4M3"]),
        )
    )
    if field == "entry":
        h[key] = value
    elif isinstance(h[key], dict):
        h[key][field] = value
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + ST[8 + _ST_N :]


def _check_adapter(fuzz_dir: Path, cfg: bytes, weights: bytes) -> None:
    d = fuzz_dir / f"a{next(_ids)}"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(cfg)
    (d / "adapter_model.safetensors").write_bytes(weights)

    def load():
        a = load_peft_adapter(d)
        for m in a.modules:
            a.read(m.key_a)
            a.read(m.key_b)
        return a

    out, peak = _bounded(load)
    assert peak < PEAK, peak
    if isinstance(out, LoraqError):
        assert "\n" not in str(out)
    else:  # accepted: the numbers and flags that reach the GGUF are sane
        assert isinstance(out.use_rslora, bool) and np.isfinite(out.lora_alpha) and abs(out.lora_alpha) <= 1e6
        assert all(np.isfinite(m.scale) and abs(m.alpha) <= 1e6 for m in out.modules)


@pytest.mark.slow  # each example converts an adapter against the base: minutes for 120 examples
@settings(FUZZ, max_examples=120)
@given(cfg=adapter_config())
def test_fuzz_adapter_config(fuzz_dir: Path, cfg: bytes) -> None:
    _check_adapter(fuzz_dir, cfg, ST)


@settings(FUZZ, max_examples=120)
@given(weights=safetensors_file())
def test_fuzz_safetensors(fuzz_dir: Path, weights: bytes) -> None:
    _check_adapter(fuzz_dir, json.dumps(CONFIG).encode(), weights)


# ------------------------------------------------------------------------------------------------
# (c) YAML configs
# ------------------------------------------------------------------------------------------------
YAML_SCALARS = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "1e300", "-1", "0", "1", "0.5", "null", "true", "~", "'x'", "9" * 30, "Q4_K_M", "f16"]),
    st.integers(-(1 << 40), 1 << 40).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)


@st.composite
def yaml_doc(draw) -> bytes:
    def val(depth: int = 0) -> str:
        if depth < 2 and draw(st.booleans()):
            return "[" + ", ".join(val(depth + 1) for _ in range(draw(st.integers(0, 2)))) + "]"
        return draw(YAML_SCALARS)

    lines = ["name: t", "workdir: wd", "base: base.gguf", "adapters:", "  - path: ad", f"    scale: {val()}"]
    lines += [
        f"quantize: {{types: [{draw(st.sampled_from(['Q8_0', 'Q4_0', 'Q9_9']))}], threads: {val()}}}",
        "compare:",
        "  text: eval.txt",
        f"  ctx: {val()}",
        f"  chunks: {val()}",
        f"  gates: {{max_kld_mean: {val()}, min_same_top: {val()}, min_effect_retention: {val()}}}",
    ]
    for _ in range(draw(st.integers(0, 2))):  # drop, duplicate or garble a line
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = draw(st.sampled_from(["", lines[i] + " x", lines[i].replace(":", ""), "  " + lines[i], "&a " + lines[i], "*a"]))
    text = "\n".join(lines) + "\n"
    raw = text.encode()
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.binary(max_size=4)) + raw[pos:]
    return raw


@settings(FUZZ, max_examples=150)
@given(doc=yaml_doc())
def test_fuzz_config(fuzz_dir: Path, doc: bytes) -> None:
    for name in ("base.gguf", "eval.txt"):
        (fuzz_dir / name).touch()
    (fuzz_dir / "ad").mkdir(exist_ok=True)
    p = fuzz_dir / f"c{next(_ids)}.yaml"
    p.write_bytes(doc)
    out, peak = _bounded(lambda: load_config(p))
    assert peak < PEAK, peak
    if isinstance(out, LoraqError):
        assert out.exit_code == 2 and "\n" not in str(out)
    else:  # accepted: every number is finite and in range
        nums = [a.scale for a in out.adapters]
        if out.compare:
            g = out.compare.gates
            nums += [x for x in (g.max_kld_mean, g.min_same_top, g.min_effect_retention) if x is not None]
        assert all(np.isfinite(x) for x in nums), nums
