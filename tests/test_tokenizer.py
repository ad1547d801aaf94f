"""loraq.llama.tokenizer against llama.cpp's llama_tokenize.

Interop tests (marker `interop`, llama-cpp-python) compare token ids on the real SmolLM2 vocabulary
(byte-level BPE, pre-tokenizer "smollm"), on vocab-only GGUFs that reuse SmolLM2's tokens and
merges under the llama-bpe, qwen2, gpt-2 and default pre-tokenizers, and on a small synthetic
SentencePiece vocabulary. The other tests need neither llama.cpp nor the real model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loraq.errors import BadInput
from loraq.llama.tokenizer import PRE_TOKENIZERS, Tokenizer, pre_tokenize

GPL3 = Path("/usr/share/common-licenses/GPL-3")

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat's the capital of France?  Answer in one word.<|im_end|>\n"
    "<|im_start|>assistant\nParis<|im_end|>\n<|endoftext|>"
)
MIXED = (
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 🪿 — CJK: 你好，世界！日本語のテキスト 한국어 문장\n"
    "Accents: café naïve Ångström Ærøskøbing façade coöperate\n"
    "Arabic: مرحبا بالعالم ١٢٣\n"
    "def f(x):\n\tif x:\n\t\treturn x * 2  # tab-indented\n    else:\n        return None\n"
    "Numbers: 1234567 3.14159 -42 1e-10 2,500,000 ①②③ ２０２４\n"
    "Spaces:    many     spaces\n\n\n\nand\r\nCRLF  \t \n"
    "Contractions: don't I'LL we're you've she'd it's 'tis O'Neil ’s\n"
    "Symbols: $x += y; a<b>=c^d|e~f`g @user #tag 100% \u00a0nbsp\u2003em\u3000ideo\n"
)


def _fuzz_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab cA'sStTlL\n\r\t 0123456789.,!?-_$<>|`~é你😀\u00a0\u2003١\x1c"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _write_vocab(path: Path, *, model: str, tokens, token_types, scores=None, merges=None, pre=None) -> Path:
    """A vocab-only GGUF (llama architecture, no tensors) that llama.cpp loads with vocab_only."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_types(list(token_types))
    if scores is not None:
        w.add_token_scores(list(scores))
    if merges is not None:
        w.add_token_merges(list(merges))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- a tiny SentencePiece vocabulary -----------------------------------------------------------

SPM_PIECES = {  # piece -> score (higher merges first)
    "▁": -1.0,
    "▁t": -2.0,
    "he": -2.5,
    "▁the": -1.5,
    "▁a": -3.0,
    "ab": -3.0,
    "bc": -3.0,
    "abc": -2.0,
    "▁h": -3.0,
    "▁he": -2.8,
    "▁hel": -2.6,
    "▁hell": -2.4,
    "▁hello": -1.0,
    "ll": -4.0,
    "lo": -4.0,
    "▁w": -3.5,
    "or": -3.2,
    "ld": -3.3,
    "▁wor": -2.2,
    "▁world": -1.2,
    "▁▁": -2.0,
    "▁▁▁▁": -1.9,
    "aa": -3.0,
    "aaa": -3.0,
    "e": -5.0,
    "h": -5.0,
    "l": -5.0,
    "o": -5.0,
    "t": -5.0,
    "a": -5.0,
    "b": -5.0,
    "c": -5.0,
    "w": -5.0,
    "r": -5.0,
    "d": -5.0,
    "é": -6.0,
}


def _spm_vocab():
    tokens, types, scores = ["<unk>", "<s>", "</s>"], [2, 3, 3], [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    for p, s in SPM_PIECES.items():
        tokens.append(p)
        types.append(1)
        scores.append(s)
    tokens += ["<tool>", "<|im_start|>"]
    types += [4, 3]  # USER_DEFINED, CONTROL
    scores += [0.0, 0.0]
    return tokens, types, scores


def _spm_tokenizer() -> Tokenizer:
    tokens, types, scores = _spm_vocab()
    return Tokenizer(
        model="llama",
        pre="",
        tokens=tokens,
        token_types=types,
        scores=scores,
        merges=None,
        bos_id=1,
        eos_id=2,
        add_bos=None,
        add_eos=None,
        add_space_prefix=None,
    )


# -- a tiny byte-level BPE vocabulary ------------------------------------------------------------


def _bpe_tokenizer(pre: str = "smollm") -> Tokenizer:
    from loraq.llama.tokenizer import _BYTE_TO_CHAR

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in", "Ġ a", "Ġa n", "Ġan d", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(_BYTE_TO_CHAR)
    tokens += ["".join(m.split(" ")) for m in merges]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return Tokenizer(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        scores=None,
        merges=merges,
        bos_id=1,
        eos_id=2,
        add_bos=False,
        add_eos=None,
        add_space_prefix=False,
    )


# ================================================================================================
# Unit tests (no llama.cpp, no real model)
# ================================================================================================


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-2", "default"])
def test_byte_level_roundtrip(pre):
    tk = _bpe_tokenizer(pre)
    for text in [MIXED, CHAT, "", " ", "\n\n", "the and in  the\n\nend", *_fuzz_texts(200, seed=sum(map(ord, pre)))]:
        assert tk.decode(tk.encode(text, add_special=False)) == text


def test_byte_level_merges_and_specials():
    tk = _bpe_tokenizer("smollm")
    tok = {t: i for i, t in enumerate(tk._texts)}
    assert tk.encode(" the and", add_special=False) == [tok["Ġthe"], tok["Ġand"]]
    assert tk.encode("x", add_special=True) == [tok["x"]]  # add_bos_token false in the GGUF
    # control tokens are text unless parse_special
    assert tk.encode("<|im_end|>", add_special=False, parse_special=True) == [2]
    assert 2 not in tk.encode("<|im_end|>", add_special=False, parse_special=False)
    assert tk.decode([2], special=False) == "" and tk.decode([2], special=True) == "<|im_end|>"


def test_pre_tokenizer_splits():
    assert pre_tokenize("Hello  world's 123", "gpt-2") == ["Hello", " ", " world", "'s", " 123"]
    assert pre_tokenize(" 123 ab", "smollm") == [" ", "1", "2", "3", " ab"]  # \p{N} first: digits alone
    assert pre_tokenize("1234567 x", "llama-bpe") == ["123", "456", "7", " x"]
    assert pre_tokenize("1234567 x", "qwen2") == list("1234567") + [" x"]
    assert pre_tokenize("I'LL don't", "llama-bpe") == ["I", "'LL", " don", "'t"]  # case-insensitive
    assert pre_tokenize("I'LL don't", "gpt-2") == ["I", "'", "LL", " don", "'t"]  # case-sensitive
    assert pre_tokenize("a\n\n  b", "llama-bpe") == ["a", "\n\n", " ", " b"]
    assert pre_tokenize("x := 12345", "default") == ["x", " ", ":=", " ", "123", "45"]  # punctuation runs first
    assert pre_tokenize("a\x1cb", "gpt-2") == ["a", "\x1c", "b"]  # U+001C is not whitespace for llama.cpp


def test_unicode_15_code_points_are_classed():
    # U+1E030 (Cyrillic Extended-D, Unicode 15.0) is a letter whatever Python's unicodedata says
    assert pre_tokenize(" a\U0001e030b", "gpt-2") == [" a\U0001e030b"]


def test_unsupported_pre_tokenizer(tmp_path):
    path = _write_vocab(tmp_path / "v.gguf", model="gpt2", pre="tekken", tokens=["a", "b", "ab"], token_types=[1, 1, 1], merges=["a b"])
    with pytest.raises(BadInput) as e:
        Tokenizer.from_gguf(path)
    msg = str(e.value)
    assert "tekken" in msg and "\n" not in msg
    assert "smollm" in PRE_TOKENIZERS and "llama-bpe" in PRE_TOKENIZERS


def test_unsupported_model(tmp_path):
    path = _write_vocab(tmp_path / "v.gguf", model="bert", tokens=["[PAD]", "a"], token_types=[3, 1])
    with pytest.raises(BadInput, match="bert"):
        Tokenizer.from_gguf(path)


def test_spm_behaviour_by_hand():
    """llama.cpp's SentencePiece algorithm: BOS, a space prefix, "▁" for spaces, the best-scoring
    adjacent pair merged first, byte fallback for unknown characters."""
    tk = _spm_tokenizer()
    tok = {t: i for i, t in enumerate(tk._texts)}
    assert tk.add_bos and tk.bos_id == 1 and tk.add_space_prefix
    assert tk.encode("hello world") == [1, tok["▁hello"], tok["▁world"]]
    assert tk.encode("hello world", add_special=False) == [tok["▁hello"], tok["▁world"]]
    # " abc" -> ▁abc: ▁a, ab and bc score the same; the leftmost pair (▁a) merges first, which
    # leaves ab no chance and abc unreachable
    assert tk.encode("abc", add_special=False) == [tok["▁a"], tok["bc"]]
    assert tk.encode("abc", add_special=False, parse_special=True) == [tok["▁a"], tok["bc"]]
    assert tk.encode("<tool>abc", add_special=False) == [tok["<tool>"], tok["▁a"], tok["bc"]]
    # unknown characters fall back to their UTF-8 bytes
    assert tk.encode("你", add_special=False) == [tok["▁"]] + [tok[f"<0x{b:02X}>"] for b in "你".encode()]
    # USER_DEFINED tokens always split out; CONTROL only with parse_special; text after a special
    # token gets the space prefix again
    assert tk.encode("a<tool>b", add_special=False) == [tok["▁a"], tok["<tool>"], tok["▁"], tok["b"]]
    assert tok["<|im_start|>"] not in tk.encode("<|im_start|>a", add_special=False)
    assert tk.encode("<|im_start|>a", add_special=False, parse_special=True) == [tok["<|im_start|>"], tok["▁a"]]
    assert tk.encode("") == [1]
    for text in ["hello world", "  the  a\n\tb", "é😀 x", *_fuzz_texts(100, seed=3)]:
        assert tk.decode(tk.encode(text)) == text


# ================================================================================================
# Interop: token ids equal llama.cpp's
# ================================================================================================


def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _assert_same(tk: Tokenizer, llm, text: str, *, add_special: bool, parse_special: bool) -> None:
    ours = tk.encode(text, add_special=add_special, parse_special=parse_special)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
    if ours != theirs:
        i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        pytest.fail(
            f"{text[:40]!r} (add_special={add_special}, parse_special={parse_special}): first "
            f"difference at token {i}: ours {ours[max(0, i - 2) : i + 4]} llama.cpp {theirs[max(0, i - 2) : i + 4]} "
            f"(lengths {len(ours)} / {len(theirs)})"
        )


@pytest.fixture(scope="module")
def smollm2(smollm2_q4_1):
    return Tokenizer.from_gguf(smollm2_q4_1), _llama(smollm2_q4_1)


@pytest.mark.interop
def test_smollm2_gpl3(smollm2):
    if not GPL3.exists():
        pytest.skip(f"{GPL3} not present (Debian's base-files ships it)")
    tk, llm = smollm2
    text = GPL3.read_text(encoding="utf-8")
    assert tk.pre == "smollm" and tk.model == "gpt2"
    for add_special in (True, False):
        _assert_same(tk, llm, text, add_special=add_special, parse_special=False)
    assert tk.decode(tk.encode(text)) == text


@pytest.mark.interop
@pytest.mark.parametrize("parse_special", [False, True])
def test_smollm2_chat_template(smollm2, parse_special):
    tk, llm = smollm2
    for add_special in (True, False):
        _assert_same(tk, llm, CHAT, add_special=add_special, parse_special=parse_special)
    ids = tk.encode(CHAT, add_special=False, parse_special=parse_special)
    assert (ids[0] == tk.bos_id == 1) == parse_special  # <|im_start|> is one token only when parsed


@pytest.mark.interop
def test_smollm2_mixed_text(smollm2):
    tk, llm = smollm2
    for parse_special in (False, True):
        _assert_same(tk, llm, MIXED, add_special=True, parse_special=parse_special)
    for text in _fuzz_texts(300, seed=1):
        _assert_same(tk, llm, text, add_special=False, parse_special=False)


@pytest.mark.interop
def test_smollm2_decode_matches_llama_cpp(smollm2):
    tk, llm = smollm2
    for special in (False, True):
        ids = tk.encode(MIXED + CHAT, add_special=False, parse_special=True)
        assert tk.decode(ids, special=special) == llm.detokenize(ids, special=special).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_q4_1):
    from loraq.gguf_io.reader import open_gguf

    g = open_gguf(smollm2_q4_1)
    return {k: g.get(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges")}


@pytest.mark.interop
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "default"])
def test_other_bpe_pre_tokenizers(pre, smollm2_vocab, tmp_path):
    """SmolLM2's tokens and merges under another pre-tokenizer: the word splits are what differs."""
    v = smollm2_vocab
    path = _write_vocab(
        tmp_path / f"vocab-{pre}.gguf", model="gpt2", pre=pre, tokens=v["tokens"], token_types=v["token_type"], merges=v["merges"]
    )
    llm = _llama(path)
    tk = Tokenizer(
        model="gpt2",
        pre=pre,
        tokens=v["tokens"],
        token_types=v["token_type"],
        scores=None,
        merges=v["merges"],
        bos_id=None,
        eos_id=None,
        add_bos=None,
        add_eos=None,
        add_space_prefix=None,
        source=str(path),
    )
    texts = [MIXED, CHAT] + _fuzz_texts(150, seed=2)
    if GPL3.exists():
        texts.append(GPL3.read_text(encoding="utf-8"))
    for text in texts:
        for parse_special in (False, True):
            _assert_same(tk, llm, text, add_special=True, parse_special=parse_special)


@pytest.mark.interop
def test_spm_synthetic_vocab(tmp_path):
    tokens, types, scores = _spm_vocab()
    path = _write_vocab(tmp_path / "spm.gguf", model="llama", tokens=tokens, token_types=types, scores=scores)
    llm = _llama(path)
    tk = Tokenizer.from_gguf(path)
    texts = [
        "hello world",
        "the abc",
        " the  a    b",
        "aaaa aaaaa",
        "",
        " ",
        "é你😀\n\tq",
        "x<tool>y <tool> z<|im_start|>the",
        "<tool>hello<tool>",
        "hello <|im_start|>world",
        MIXED,
    ]
    rng = random.Random(4)
    alphabet = "abcdehlortw \n\té你😀<>stoolim_|"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(300)]
    for text in texts:
        for add_special in (True, False):
            for parse_special in (False, True):
                _assert_same(tk, llm, text, add_special=add_special, parse_special=parse_special)
    ids = tk.encode("hello world é😀")
    assert tk.decode(ids) == llm.detokenize(ids).decode("utf-8")
