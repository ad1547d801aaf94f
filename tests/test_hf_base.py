"""`loraq convert-base` (Hugging Face folder -> F16 GGUF) against llama.cpp's convert_hf_to_gguf.py.

The oracle is the converter of the llama.cpp tree inside the llama-cpp-python sdist, run in a
subprocess with its own gguf-py first on the path (it needs torch and transformers; the test skips
with the reason when either is missing). Folders: SmolLM2 written back as an HF folder from its
GGUF (scripts/hf_folder.py: F16 safetensors, Q/K un-permuted, tokenizer.json rebuilt with the
`tokenizers` library), a synthetic qwen2 (BF16, two shards with an index, q/k/v biases) and a
synthetic qwen3 (F32, tied embeddings, q_norm/k_norm, chat_template.jinja) and a synthetic
MistralForCausalLM (llama: BF16, 8 query / 2 KV heads so K's permutation differs from Q's, Llama 3
rope scaling so the converter adds rope_freqs.weight).

Compared: every KV (type and bytes), every tensor (name, shape, type, bytes), the order of both,
and then the whole file. No KV is exempt: loraq writes the same general.* metadata (gguf-py's
Metadata from the same folder). Token ids of loraq's file agree with the reference file's, with
the HF tokenizer itself, and with llama.cpp's tokenizer on loraq's file. Peak RSS of loraq's
conversion (VmHWM of a child process) stays below 2x the largest tensor + 150 MB."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraq.convert.hf_base import convert_hf_base
from loraq.convert.hf_vocab import CHKTXT
from loraq.errors import BadArguments, BadInput
from loraq.gguf_io import open_gguf
from scripts import hf_folder

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = Path(
    os.environ.get("LORAQ_LLAMA_CPP_SRC", Path.home() / ".cache/loraq/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
).expanduser()
CONVERTER = LLAMA_CPP / "convert_hf_to_gguf.py"
RSS_SLACK = 150 << 20

TEXTS = [
    CHKTXT,
    "<|im_start|>user\nWhat's 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "Hello world!  Tabs\tand\nnewlines, café, 你好, 😀 and 3.14159 and I'll say 'RE.",
    "def f(x):\n    return x ** 2  # 2024-12-01\r\n",
]


def reference(folder: Path, out: Path, outtype: str = "f16") -> Path:
    """convert_hf_to_gguf.py's output for `folder` (skips when the script or torch is missing)."""
    if not CONVERTER.is_file():
        pytest.skip(f"llama.cpp's converter not found at {CONVERTER} (set LORAQ_LLAMA_CPP_SRC to a llama.cpp tree)")
    for mod in ("torch", "transformers", "sentencepiece"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"convert_hf_to_gguf.py needs {mod}, which is not installed")
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(CONVERTER), str(folder), "--outtype", outtype, "--outfile", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}"
    return out


def loraq_in_child(folder: Path, out: Path, outtype: str = "f16") -> int:
    """Convert in a fresh process and return its peak RSS in bytes (VmHWM)."""
    code = (
        "import sys\n"
        "from loraq.convert.hf_base import convert_hf_base\n"
        "convert_hf_base(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(out), outtype], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split()[-1]) * 1024


def largest_tensor_bytes(folder: Path) -> int:
    from loraq.convert.hf_base import index_tensors

    return max(s.hi - s.lo for s in index_tensors(folder))


def assert_same_gguf(ours: Path, ref: Path) -> None:
    with open_gguf(ours) as a, open_gguf(ref) as b:
        assert list(a.kvs) == list(b.kvs), f"KV keys differ: only ours {set(a.kvs) - set(b.kvs)}, only llama.cpp {set(b.kvs) - set(a.kvs)}"
        for k in a.kvs:
            assert a.kvs[k].raw == b.kvs[k].raw, f"KV {k}: ours {str(a.kvs[k].value)[:80]!r}, llama.cpp {str(b.kvs[k].value)[:80]!r}"
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for t in a.tensors:
            u = b.tensor(t.name)
            assert (t.ne, t.type.name, t.n_dims) == (u.ne, u.type.name, u.n_dims), t.name
            assert a.read_raw(t).tobytes() == b.read_raw(u).tobytes(), f"tensor {t.name} bytes differ"
    assert ours.read_bytes() == ref.read_bytes()  # header padding and tensor offsets too


@pytest.fixture(scope="module")
def folders(smollm2_f16, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    smol = hf_folder.from_gguf(smollm2_f16, root / "SmolLM2-135M-Instruct", dtype="F16")
    q2 = hf_folder.synthetic(root / "qwen2-tiny", smol, arch="qwen2", dtype="BF16", shards=2, model_type=False)
    q3_tok = hf_folder.tokenizer_from_gguf(smollm2_f16, root / "tok-jinja", jinja_file=True)
    q3 = hf_folder.synthetic(root / "qwen3-tiny", q3_tok, arch="qwen3", dtype="F32", tied=True)
    llama3_rope = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    mistral = hf_folder.synthetic(
        root / "mistral-tiny", smol, arch="llama", hf_arch="MistralForCausalLM", n_head=8, n_head_kv=2, rope_scaling=llama3_rope
    )
    return {"smollm2": smol, "qwen2": q2, "qwen3": q3, "mistral": mistral}


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize(
    ("name", "outtype"), [("smollm2", "f16"), ("qwen2", "f16"), ("qwen3", "f16"), ("mistral", "f16"), ("qwen3", "bf16"), ("qwen2", "f32")]
)
def test_equals_convert_hf_to_gguf(folders, tmp_path, name, outtype):
    folder = folders[name]
    ref = reference(folder, tmp_path / "ref.gguf", outtype)
    ours = tmp_path / "loraq.gguf"
    peak = loraq_in_child(folder, ours, outtype)
    assert_same_gguf(ours, ref)
    bound = 2 * largest_tensor_bytes(folder) + RSS_SLACK
    assert peak < bound, f"peak RSS {peak >> 20} MiB >= bound {bound >> 20} MiB"


@pytest.mark.slow
@pytest.mark.real
def test_token_ids_agree(folders, tmp_path):
    """loraq's file tokenizes as the reference file, as the HF tokenizer, and (llama.cpp) as itself."""
    from tokenizers import Tokenizer as HFTokenizer

    from loraq.llama.tokenizer import Tokenizer

    folder = folders["smollm2"]
    ours = convert_hf_base(folder, tmp_path / "ours.gguf").out
    ref = reference(folder, tmp_path / "ref.gguf")
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tk_ours, tk_ref = Tokenizer.from_gguf(ours), Tokenizer.from_gguf(ref)
    llm = None
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(ours), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tk_ours.encode(text, add_special=False, parse_special=True)
        assert ids == tk_ref.encode(text, add_special=False, parse_special=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text[:40]
        if llm is not None:
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text[:40]


# -- refusals and checks (fast: a tiny qwen3 with SmolLM2's tokenizer) ------------------------


@pytest.fixture(scope="module")
def tiny(smollm2_q4_1, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tok = hf_folder.tokenizer_from_gguf(smollm2_q4_1, root / "tok")
    return hf_folder.synthetic(root / "qwen3", tok, arch="qwen3", n_layer=1, dtype="BF16")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_tiny_converts_with_expected_layout(tiny, tmp_path):
    res = convert_hf_base(tiny, tmp_path / "t.gguf", "f16")
    assert (res.arch, res.pre) == ("qwen3", "smollm")
    with open_gguf(res.out) as g:
        types = {t.name: t.type.name for t in g.tensors}
        assert types["token_embd.weight"] == "f16" and types["blk.0.attn_q.weight"] == "f16"
        assert types["blk.0.attn_q_norm.weight"] == "f32" and types["output_norm.weight"] == "f32"
        assert g.get("qwen3.attention.key_length") == 64 and g.get("general.file_type") == 1
        assert g.get("tokenizer.ggml.add_bos_token") is False  # SmolLM2's ByteLevel post-processor


def test_unsupported_architecture_one_line(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "gemma")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "loraq", "convert-base", str(bad), str(tmp_path / "o.gguf")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 4
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Gemma3ForCausalLM" in lines[0] and "qwen3" in lines[0] and "llama" in lines[0]
    assert not (tmp_path / "o.gguf").exists()


def test_missing_shard_and_truncation_refused(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "sharded")
    idx = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors", "model.norm.weight": "model-2.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(BadInput, match="missing"):
        convert_hf_base(bad, tmp_path / "o.gguf")
    (bad / "model.safetensors.index.json").unlink()
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(BadInput, match="past the end"):
        convert_hf_base(bad, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_sentencepiece_and_unknown_pretokenizer_refused(tiny, tmp_path):
    spm = _copy(tiny, tmp_path / "spm")
    (spm / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(BadInput, match="SentencePiece"):
        convert_hf_base(spm, tmp_path / "o.gguf")
    odd = _copy(tiny, tmp_path / "odd")
    tj = json.loads((odd / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True  # a pre-tokenizer no llama.cpp model has
    (odd / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(BadInput, match=r"pre-tokenizer is not one llama\.cpp knows"):
        convert_hf_base(odd, tmp_path / "o.gguf")


def test_output_never_over_an_input(tiny):
    for name in ("model.safetensors", "tokenizer.json"):
        with pytest.raises(BadArguments, match="write the output to a different file"):
            convert_hf_base(tiny, tiny / name)


# -- the `base` stage: `base:` may be a Hugging Face folder ----------------------------------


def test_run_with_hf_folder_base(smollm2_q4_1, tmp_path):
    """A config whose base is an HF folder: the base stage checkpoints base-f16.gguf, whose tensors
    are the GGUF's the folder was written from, and the merge equals the merge into that GGUF."""
    import yaml

    from loraq.pipeline.config import load_config
    from loraq.pipeline.runner import run_pipeline, stage_status
    from tiny_project import make_tiny_project

    d = make_tiny_project(tmp_path / "p", smollm2_q4_1)
    hf_folder.from_gguf(d / "base.gguf", d / "hf-base", dtype="F32")  # F32: the F32 norms stay exact
    runs = {}
    for base in ("base.gguf", "hf-base"):
        cfg_path = d / f"{base}.yaml"
        cfg = {"name": "t", "workdir": f"work-{base}", "base": base, "adapters": [{"path": "adapter"}], "quantize": {"types": ["Q8_0"]}}
        cfg_path.write_text(yaml.safe_dump(cfg))
        runs[base] = load_config(cfg_path)
    hf = runs["hf-base"]
    first = run_pipeline(hf, until="merge")
    assert [r.name for r in first if r.status == "ran"] == ["base", "check", "convert", "merge"]
    assert [r.name for r in run_pipeline(hf, until="merge") if r.status == "ran"] == []
    assert {r.name: r.reason for r in stage_status(hf)}["base"] == "up-to-date"
    run_pipeline(runs["base.gguf"], until="merge")
    wd_hf, wd_gguf = hf.workdir_path, runs["base.gguf"].workdir_path
    with open_gguf(wd_hf / "base-f16.gguf") as a, open_gguf(d / "base.gguf") as b:
        assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
        for t in a.tensors:
            assert a.read_raw(t).tobytes() == b.read_raw(b.tensor(t.name)).tobytes(), t.name
    with open_gguf(wd_hf / "merged-f16.gguf") as a, open_gguf(wd_gguf / "merged-f16.gguf") as b:
        for t in b.tensors:
            assert a.read_raw(a.tensor(t.name)).tobytes() == b.read_raw(t).tobytes(), t.name


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden_size", "256"),
        ("num_hidden_layers", -1),
        ("rms_norm_eps", -1e-5),
        ("rope_theta", True),
        ("rope_scaling", {"rope_type": "yarn", "factor": "x"}),
        ("rope_scaling", [1, 2]),
        ("architectures", "Qwen3ForCausalLM"),
    ],
)
def test_hostile_config_is_one_line(tiny, tmp_path, key, value):
    bad = _copy(tiny, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=key):
        convert_hf_base(bad, tmp_path / "o.gguf")


@pytest.mark.slow
def test_cli_merge_takes_an_hf_folder_base(smollm2_q4_1, tmp_path):
    """`loraq merge HF_DIR` converts the folder first: the result equals merging into the GGUF it
    was written from (F32 safetensors, so every tensor survives the round trip exactly)."""
    from tiny_project import make_tiny_project

    d = make_tiny_project(tmp_path / "p", smollm2_q4_1)
    hf_folder.from_gguf(d / "base.gguf", d / "hf", dtype="F32")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for base, out in (("hf", "m-hf.gguf"), ("base.gguf", "m-gguf.gguf")):
        r = subprocess.run(
            [sys.executable, "-m", "loraq", "merge", str(d / base), "--lora", str(d / "adapter"), "-o", str(d / out)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    with open_gguf(d / "m-hf.gguf") as a, open_gguf(d / "m-gguf.gguf") as b:
        for t in b.tensors:
            assert a.read_raw(a.tensor(t.name)).tobytes() == b.read_raw(t).tobytes(), t.name
    r = subprocess.run(
        [sys.executable, "-m", "loraq", "merge", str(d / "hf"), "--lora", str(d / "adapter"), "-o", str(d / "hf" / "x.gguf")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "different folder" in r.stderr
