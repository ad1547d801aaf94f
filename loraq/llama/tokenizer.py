"""Tokenize text exactly as llama.cpp's `llama_tokenize` does, from a GGUF's own vocabulary.

The evaluation text must become the same token ids that llama-perplexity feeds the model, so this
is a re-implementation of llama.cpp's tokenizer (src/llama-vocab.cpp, src/unicode.cpp at the
version pinned by the interop extra), not of Hugging Face's: where the two differ (llama.cpp's
hand-written pre-tokenizer state machines, its treatment of special tokens, its byte fallback),
this follows llama.cpp.

Supported vocabularies:
  * byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with the pre-tokenizers of GPT-2, SmolLM /
    StarCoder, llama-3 and Qwen2 (see `PRE_TOKENIZERS`) and llama.cpp's "default" one;
  * SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`): score-ordered merges of
    adjacent pieces with <0xXX> byte fallback, a space prefix and "▁" for spaces.

Unicode classes (letter, number, punctuation, whitespace) come from Python's `unicodedata`, with the
code points assigned in Unicode 15.0/15.1 added so that older Pythons class them as llama.cpp does.
"""

from __future__ import annotations

import heapq
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import BadInput
from ..gguf_io import GGUFFile, open_gguf

# ---------------------------------------------------------------------------------------------
# Unicode classes, as llama.cpp's unicode_cpt_flags (one bit per general category + whitespace)
# ---------------------------------------------------------------------------------------------

_UNDEF, _NUM, _LET, _SEP, _MARK, _PUNCT, _SYM, _CTRL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80
_WS = 0x100
_CAT = {"C": _CTRL, "L": _LET, "M": _MARK, "N": _NUM, "P": _PUNCT, "S": _SYM, "Z": _SEP}

# Unicode's White_Space property (llama.cpp's \s; note: not U+001C..U+001F, unlike str.isspace).
_WHITESPACE = frozenset(
    map(chr, (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000))
)

# Code points assigned in Unicode 15.0 and 15.1 (first, last, major category), which Python < 3.12
# reports as unassigned; llama.cpp's tables are built from Unicode 15.1.
_UNICODE_15 = (
    (0x00CF3, 0x00CF3, "M"),
    (0x00ECE, 0x00ECE, "M"),
    (0x02FFC, 0x02FFF, "S"),
    (0x031EF, 0x031EF, "S"),
    (0x10EFD, 0x10EFF, "M"),
    (0x1123F, 0x11240, "L"),
    (0x11241, 0x11241, "M"),
    (0x11B00, 0x11B09, "P"),
    (0x11F00, 0x11F01, "M"),
    (0x11F02, 0x11F02, "L"),
    (0x11F03, 0x11F03, "M"),
    (0x11F04, 0x11F10, "L"),
    (0x11F12, 0x11F33, "L"),
    (0x11F34, 0x11F3A, "M"),
    (0x11F3E, 0x11F42, "M"),
    (0x11F43, 0x11F4F, "P"),
    (0x11F50, 0x11F59, "N"),
    (0x1342F, 0x1342F, "L"),
    (0x13439, 0x1343F, "C"),
    (0x13440, 0x13440, "M"),
    (0x13441, 0x13446, "L"),
    (0x13447, 0x13455, "M"),
    (0x1B132, 0x1B132, "L"),
    (0x1B155, 0x1B155, "L"),
    (0x1D2C0, 0x1D2D3, "N"),
    (0x1DF25, 0x1DF2A, "L"),
    (0x1E030, 0x1E06D, "L"),
    (0x1E08F, 0x1E08F, "M"),
    (0x1E4D0, 0x1E4EB, "L"),
    (0x1E4EC, 0x1E4EF, "M"),
    (0x1E4F0, 0x1E4F9, "N"),
    (0x1F6DC, 0x1F6DC, "S"),
    (0x1F774, 0x1F776, "S"),
    (0x1F77B, 0x1F77F, "S"),
    (0x1F7D9, 0x1F7D9, "S"),
    (0x1FA75, 0x1FA77, "S"),
    (0x1FA87, 0x1FA88, "S"),
    (0x1FAAD, 0x1FAAF, "S"),
    (0x1FABB, 0x1FABD, "S"),
    (0x1FABF, 0x1FABF, "S"),
    (0x1FACE, 0x1FACF, "S"),
    (0x1FADA, 0x1FADB, "S"),
    (0x1FAE8, 0x1FAE8, "S"),
    (0x1FAF7, 0x1FAF8, "S"),
    (0x2B739, 0x2B739, "L"),
    (0x2EBF0, 0x2EE5D, "L"),
    (0x31350, 0x323AF, "L"),
)
_U15_STARTS = [r[0] for r in _UNICODE_15]


class _FlagTable(dict[str, int]):
    """char -> llama.cpp-style flags, computed on first use."""

    def __missing__(self, ch: str) -> int:
        cat = unicodedata.category(ch)
        if cat == "Cn":
            cp = ord(ch)
            i = bisect_right(_U15_STARTS, cp) - 1
            f = _CAT[_UNICODE_15[i][2]] if i >= 0 and cp <= _UNICODE_15[i][1] else _UNDEF
        else:
            f = _CAT[cat[0]]
        if ch in _WHITESPACE:
            f |= _WS
        self[ch] = f
        return f


_FLAGS = _FlagTable()


def _flags_of(text: str) -> list[int]:
    return list(map(_FLAGS.__getitem__, text))


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers: each splitter refines a list of (start, end) spans of the text, like one entry of
# llama.cpp's regex_exprs refines its offsets. Spans never merge across an earlier boundary.
# ---------------------------------------------------------------------------------------------

Spans = list[tuple[int, int]]
Splitter = Callable[[str, list[int], Spans], Spans]

_LN = _LET | _NUM
_WLN = _WS | _LET | _NUM
_CONTRACTION_1 = frozenset("stmd")
_CONTRACTION_2 = frozenset(("re", "ve", "ll"))


def _ascii_lower(ch: str) -> str:
    # unicode_tolower only matters here for comparisons with ASCII letters, and no non-ASCII code
    # point lowercases to s, t, m, d, r, e, v or l.
    return ch.lower() if ch < "\x80" else ch


def _split_gpt2(text: str, fl: list[int], spans: Spans) -> Spans:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out: Spans = []
    add = out.append
    for ini, end in spans:
        pos = ini
        while pos < end:
            c = text[pos]
            f = fl[pos]
            if c == "'" and pos + 1 < end:
                if text[pos + 1] in _CONTRACTION_1:
                    add((pos, pos + 2))
                    pos += 2
                    continue
                if pos + 2 < end and text[pos + 1 : pos + 3] in _CONTRACTION_2:
                    add((pos, pos + 3))
                    pos += 3
                    continue
            if c == " ":
                f2 = fl[pos + 1] if pos + 1 < end else 0
                p = pos + 1
            else:
                f2 = f
                p = pos
            if f2 & _LET:
                while p < end and fl[p] & _LET:
                    p += 1
                add((pos, p))
                pos = p
                continue
            if f2 & _NUM:
                while p < end and fl[p] & _NUM:
                    p += 1
                add((pos, p))
                pos = p
                continue
            if f2 and not f2 & _WLN:
                while p < end and not fl[p] & _WLN:
                    p += 1
                add((pos, p))
                pos = p
                continue
            n = 0
            while pos + n < end and fl[pos + n] & _WS:
                n += 1
            if n > 1 and pos + n < end:  # \s+(?!\S): leave the last space to the next word
                add((pos, pos + n - 1))
                pos += n - 1
            elif n > 0:
                add((pos, pos + n))
                pos += n
            else:
                add((pos, pos + 1))
                pos += 1
    return out


def _make_llama3_like(max_digits: int) -> Splitter:
    """llama-3 (max_digits=3) and Qwen2 (max_digits=1):
    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,k}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|
    \\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"""

    def split(text: str, fl: list[int], spans: Spans) -> Spans:
        out: Spans = []
        add = out.append
        for ini, end in spans:
            pos = ini
            while pos < end:
                c = text[pos]
                f = fl[pos]
                if c == "'" and pos + 1 < end:
                    c1 = _ascii_lower(text[pos + 1])
                    if c1 in _CONTRACTION_1:
                        add((pos, pos + 2))
                        pos += 2
                        continue
                    if pos + 2 < end and c1 + _ascii_lower(text[pos + 2]) in _CONTRACTION_2:
                        add((pos, pos + 3))
                        pos += 3
                        continue
                # [^\r\n\p{L}\p{N}]?\p{L}+
                if not (c == "\r" or c == "\n" or f & _NUM) and (f & _LET or (pos + 1 < end and fl[pos + 1] & _LET)):
                    p = pos + 1
                    while p < end and fl[p] & _LET:
                        p += 1
                    add((pos, p))
                    pos = p
                    continue
                # \p{N}{1,k}
                if f & _NUM:
                    p = pos
                    while p < end and fl[p] & _NUM and p - pos < max_digits:
                        p += 1
                    add((pos, p))
                    pos = p
                    continue
                # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
                if c == " ":
                    f2 = fl[pos + 1] if pos + 1 < end else 0
                    p = pos + 1
                else:
                    f2 = f
                    p = pos
                if not f2 & _WLN:  # (f is never 0 inside a span)
                    while p < end and not fl[p] & _WLN:
                        p += 1
                    while p < end and text[p] in "\r\n":
                        p += 1
                    add((pos, p))
                    pos = p
                    continue
                n = 0
                last_rn = 0
                while pos + n < end and fl[pos + n] & _WS:
                    if text[pos + n] in "\r\n":
                        last_rn = pos + n + 1
                    n += 1
                if last_rn:  # \s*[\r\n]+
                    add((pos, last_rn))
                    pos = last_rn
                elif n > 1 and pos + n < end:  # \s+(?!\S)
                    add((pos, pos + n - 1))
                    pos += n - 1
                elif n > 0:
                    add((pos, pos + n))
                    pos += n
                else:
                    add((pos, pos + 1))
                    pos += 1
        return out

    return split


_split_llama3 = _make_llama3_like(3)
_split_qwen2 = _make_llama3_like(1)


def _split_matches(is_match: Callable[[str, int], bool], runs: bool) -> Splitter:
    """A splitter for a one-class regex: `[class]` (runs=False) or `[class]+` (runs=True).
    Every match is a span, and so is every stretch between matches (std::regex_iterator use in
    unicode_regex_split_stl)."""

    def split(text: str, fl: list[int], spans: Spans) -> Spans:
        out: Spans = []
        add = out.append
        for ini, end in spans:
            gap = ini
            pos = ini
            while pos < end:
                if is_match(text[pos], fl[pos]):
                    if pos > gap:
                        add((gap, pos))
                    p = pos + 1
                    if runs:
                        while p < end and is_match(text[p], fl[p]):
                            p += 1
                    add((pos, p))
                    pos = gap = p
                else:
                    pos += 1
            if end > gap:
                add((gap, end))
        return out

    return split


def _is_number(ch: str, f: int) -> bool:  # \p{N}: ASCII digits, or any non-ASCII N*
    return ch in "0123456789" if ch < "\x80" else bool(f & _NUM)


# "[\p{P}\$\+<=>\^~\|]": llama.cpp maps \p{P} to P* above ASCII and to ASCII punctuation except
# $+<=>^`|~ below, then adds $+<=>^~| back; so every ASCII punctuation/symbol except the backtick.
_ASCII_DEFAULT_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_{|}~")


def _is_default_punct(ch: str, f: int) -> bool:
    return ch in _ASCII_DEFAULT_PUNCT if ch < "\x80" else bool(f & _PUNCT)


def _split_ascii_digit_triples(text: str, fl: list[int], spans: Spans) -> Spans:
    """[0-9][0-9][0-9]: left-to-right groups of three ASCII digits become their own spans."""
    out: Spans = []
    add = out.append
    for ini, end in spans:
        gap = ini
        pos = ini
        while pos + 3 <= end:
            if text[pos] in "0123456789" and text[pos + 1] in "0123456789" and text[pos + 2] in "0123456789":
                if pos > gap:
                    add((gap, pos))
                add((pos, pos + 3))
                pos = gap = pos + 3
            else:
                pos += 1
        if end > gap:
            add((gap, end))
    return out


_split_each_number = _split_matches(_is_number, runs=False)
_split_number_runs = _split_matches(_is_number, runs=True)
_split_default_punct = _split_matches(_is_default_punct, runs=True)

_PRE_DEFAULT = (_split_default_punct, _split_gpt2, _split_number_runs, _split_ascii_digit_triples)
_PRE_GPT2 = (_split_gpt2,)
_PRE_SMOLLM = (_split_each_number, _split_gpt2)
_PRE_LLAMA3 = (_split_llama3,)
_PRE_QWEN2 = (_split_qwen2,)

# tokenizer.ggml.pre -> (splitters, ignore_merges, default add_bos), as llama_vocab::impl::load.
PRE_TOKENIZERS: dict[str, tuple[tuple[Splitter, ...], bool, bool]] = {
    "default": (_PRE_DEFAULT, False, False),
    **{n: (_PRE_GPT2, False, False) for n in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4")},
    **{
        n: (_PRE_SMOLLM, False, False)
        for n in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")
    },
    **{n: (_PRE_LLAMA3, True, True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")},
    **{n: (_PRE_LLAMA3, False, False) for n in ("dbrx", "smaug-bpe")},
    **{n: (_PRE_QWEN2, False, False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2")},
}


def pre_tokenize(text: str, pre: str = "default") -> list[str]:
    """The words llama.cpp's byte-level BPE pre-tokenizer `pre` splits `text` into (before byte
    encoding); special tokens are not split out here."""
    spec = PRE_TOKENIZERS.get(pre or "default")
    if spec is None:
        raise BadInput(f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    fl = _flags_of(text)
    spans: Spans = [(0, len(text))] if text else []
    for split in spec[0]:
        spans = split(text, fl, spans)
    return [text[s:e] for s, e in spans]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}

# ---------------------------------------------------------------------------------------------
# Token attributes (llama_token_attr) and the text-based fix-ups llama.cpp applies at load time
# ---------------------------------------------------------------------------------------------

A_UNKNOWN, A_UNUSED, A_NORMAL, A_CONTROL, A_USER_DEFINED, A_BYTE = 1, 2, 4, 8, 16, 32
A_LSTRIP, A_RSTRIP = 128, 256
# tokenizer.ggml.token_type -> attr (UNDEFINED=0, NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6)
_TYPE_TO_ATTR = {0: 0, 1: A_NORMAL, 2: A_UNKNOWN, 3: A_CONTROL, 4: A_USER_DEFINED, 5: A_UNUSED, 6: A_BYTE}

_EOG_TEXTS = frozenset(
    (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    )
)
# FIM tokens found by text when the GGUF does not name them: (keys naming it, texts)
_FIM_TEXTS = (
    (
        ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
        ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    ),
    (
        ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
        ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    ),
    (
        ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
        ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>"),
    ),
    (("tokenizer.ggml.fim_pad_token_id",), ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    (("tokenizer.ggml.fim_rep_token_id",), ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    (("tokenizer.ggml.fim_sep_token_id",), ("<|file_sep|>",)),
)
_C_SPACE = frozenset(" \t\n\v\f\r")  # C isspace()


class Tokenizer:
    """llama.cpp's tokenizer for one GGUF vocabulary. Build with `Tokenizer.from_gguf`."""

    def __init__(
        self,
        *,
        model: str,
        pre: str,
        tokens: Sequence[str],
        token_types: Sequence[int] | None,
        scores: Sequence[float] | None,
        merges: Sequence[str] | None,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool | None,
        add_eos: bool | None,
        add_space_prefix: bool | None,
        model_name: str = "",
        fim_named: Iterable[str] = (),
        source: str = "vocabulary",
    ):
        self.model = model
        self.pre = pre
        n = len(tokens)
        self.n_vocab = n
        if model == "gpt2":
            spec = PRE_TOKENIZERS.get(pre or "default")
            if spec is None:
                raise BadInput(
                    f"{source}: pre-tokenizer {pre!r} is not supported (supported: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))}); use a model with one of these tokenizers"
                )
            self._splitters, self._ignore_merges, default_add_bos = spec
            default_bos, default_eos = 11, 11
            default_add_eos = False
            default_space_prefix = False
        elif model == "llama":
            self._splitters, self._ignore_merges = (), False
            default_bos, default_eos = 1, 2
            default_add_bos, default_add_eos = True, False
            default_space_prefix = True
        else:
            raise BadInput(f"{source}: tokenizer model {model!r} is not supported (supported: gpt2, llama)")

        # token text -> id (a later duplicate wins; empty texts get a placeholder), as llama.cpp.
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._texts = texts
        self._tok = {t: i for i, t in enumerate(texts)}
        self._scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        if token_types is not None:
            if len(token_types) < n:
                raise BadInput(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {n} tokens")
            attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in token_types[:n]]
        else:
            attrs = [A_NORMAL] * n
        if scores is not None and len(scores) < n:
            raise BadInput(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")

        self._ranks: dict[str, int] = {}
        if model == "gpt2":
            if merges is None:
                raise BadInput(f"{source}: BPE vocabulary without tokenizer.ggml.merges; regenerate the GGUF")
            for i, m in enumerate(merges):
                if m.find(" ", 1) >= 0:
                    self._ranks.setdefault(m, i)

        def valid(i: int | None, default: int | None) -> int | None:
            d = default if default is not None and default < n else None
            if i is None:
                return d
            return int(i) if 0 <= int(i) < n else d

        self.bos_id = valid(bos_id, default_bos)
        self.eos_id = valid(eos_id, default_eos)
        self.add_bos = default_add_bos if add_bos is None else bool(add_bos)
        self.add_eos = default_add_eos if add_eos is None else bool(add_eos)
        self.add_space_prefix = default_space_prefix if add_space_prefix is None else bool(add_space_prefix)

        self._attrs = attrs
        self._fix_attrs(set(fim_named))
        # special tokens, longest first (llama.cpp's sort is not stable; ties here go by id)
        special = A_CONTROL | A_USER_DEFINED | A_UNKNOWN
        self._special = sorted((i for i in range(n) if attrs[i] & special), key=lambda i: (-len(texts[i]), i))
        self._apply_model_strip_rules(model_name)
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, src: GGUFFile | Path | str) -> Tokenizer:
        """From a GGUF path or an open `loraq.gguf_io.reader.GGUFFile`."""
        g = src if isinstance(src, GGUFFile) else open_gguf(Path(src))
        model = g.get_str("tokenizer.ggml.model")
        if model is None:
            raise BadInput(f"{g.path}: no tokenizer.ggml.model in the metadata; use a GGUF that carries its vocabulary")
        tokens = g.get_array("tokenizer.ggml.tokens", "str")
        if not tokens:
            raise BadInput(f"{g.path}: no tokenizer.ggml.tokens in the metadata; use a GGUF that carries its vocabulary")
        fim_named = [k for keys, _ in _FIM_TEXTS for k in keys if g.get(k) is not None]
        return cls(
            model=model,
            pre=g.get_str("tokenizer.ggml.pre", "") or "",
            tokens=tokens,
            token_types=g.get_array("tokenizer.ggml.token_type", "int"),
            scores=g.get_array("tokenizer.ggml.scores", "float"),
            merges=g.get_array("tokenizer.ggml.merges", "str"),
            bos_id=g.get_int("tokenizer.ggml.bos_token_id"),
            eos_id=g.get_int("tokenizer.ggml.eos_token_id"),
            add_bos=g.get_bool("tokenizer.ggml.add_bos_token"),
            add_eos=g.get_bool("tokenizer.ggml.add_eos_token"),
            add_space_prefix=g.get_bool("tokenizer.ggml.add_space_prefix"),
            model_name=g.get_str("general.name", "") or "",
            fim_named=fim_named,
            source=str(g.path),
        )

    def _fix_attrs(self, fim_named: set[str]) -> None:
        """The text-based attribute fix-ups of llama_vocab::impl::load that change which tokens are
        special: end-of-generation and FIM tokens are forced to CONTROL, a few gpt-oss tokens to
        USER_DEFINED."""
        attrs, tok = self._attrs, self._tok
        for keys, texts in _FIM_TEXTS:
            if any(k in fim_named for k in keys):
                continue
            for t in texts:
                if t in tok:
                    attrs[tok[t]] |= A_CONTROL
                    break
        for t in _EOG_TEXTS:
            if t in tok:
                attrs[tok[t]] |= A_CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if t in tok:
                attrs[tok[t]] = A_USER_DEFINED
        present = {t for t in _EOG_TEXTS if t in tok}
        if "<|end|>" in present and (
            ("<|return|>" in present and "<|call|>" in present) or ("<|calls|>" in present and "<|flush|>" in present)
        ):
            attrs[tok["<|end|>"]] = A_USER_DEFINED
        if "</s>" in present and "<|tool_response>" in present:
            attrs[tok["</s>"]] = A_NORMAL

    def _apply_model_strip_rules(self, model_name: str) -> None:
        """Phi-3's special tokens swallow the whitespace after them (llama.cpp sets RSTRIP by name)."""
        name = model_name.lower()
        if "phi-3" in name or "phi3" in name:
            for i in self._special:
                self._attrs[i] |= A_RSTRIP
            if "</s>" in self._tok:
                self._attrs[self._tok["</s>"]] |= A_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in self._tok:
                    self._attrs[self._tok[t]] &= ~A_RSTRIP

    # -- encode --------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as `llama_tokenize(vocab, text, add_special, parse_special)`."""
        out: list[int] = []
        frags = self._partition(text, parse_special) if text else []
        if self.model == "llama":
            if add_special and self.add_bos:
                out.append(self._need(self.bos_id, "BOS"))
            prev_special = True
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        fr = " " + fr
                    self._spm(fr.replace(" ", "\u2581"), out)
                    prev_special = False
            if add_special and self.add_eos:
                out.append(self._need(self.eos_id, "EOS"))
            return out

        if add_special and self.add_bos:
            out.append(self._need(self.bos_id, "BOS"))
        for fr in frags:
            if isinstance(fr, int):
                out.append(fr)
            else:
                self._bpe_text(fr, out)
        if add_special and self.add_eos:
            out.append(self._need(self.eos_id, "EOS"))
        return out

    def _need(self, tid: int | None, what: str) -> int:
        if tid is None:
            raise BadInput(f"the vocabulary asks for a {what} token but has none; tokenize with add_special=False")
        return tid

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens (tokenizer_st_partition): longest first; CONTROL and UNKNOWN
        tokens only when parse_special, USER_DEFINED ones always."""
        frags: list[str | int] = [text]
        attrs, texts = self._attrs, self._texts
        for tid in self._special:
            a = attrs[tid]
            if not parse_special and a & (A_CONTROL | A_UNKNOWN):
                continue
            t = texts[tid]
            if not any(isinstance(fr, str) and t in fr for fr in frags):
                continue
            new: list[str | int] = []
            for fr in frags:
                if isinstance(fr, int) or t not in fr:
                    new.append(fr)
                    continue
                base, end, nt = 0, len(fr), len(t)
                m = fr.find(t, base, end)
                while m >= 0:
                    left_end = m
                    if a & A_LSTRIP:
                        while left_end > base and fr[left_end - 1] in _C_SPACE:
                            left_end -= 1
                    if left_end > base:
                        new.append(fr[base:left_end])
                    new.append(tid)
                    base = m + nt
                    if a & A_RSTRIP:
                        while base < end and fr[base] in _C_SPACE:
                            base += 1
                    m = fr.find(t, base, end) if base < end else -1
                if base < end:
                    new.append(fr[base:end])
            frags = new
        return frags

    def _bpe_text(self, text: str, out: list[int]) -> None:
        fl = _flags_of(text)
        spans: Spans = [(0, len(text))]
        for split in self._splitters:
            spans = split(text, fl, spans)
        cache = self._cache
        for s, e in spans:
            word = text[s:e]
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word("".join(_BYTE_TO_CHAR[b] for b in word.encode("utf-8")))
                if len(cache) > 200_000:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Byte-level BPE of one pre-tokenized word (llm_tokenizer_bpe_session::tokenize)."""
        tok = self._tok
        if self._ignore_merges and word in tok:
            return (tok[word],)
        n = len(word)
        size = [1] * n  # symbol i covers word[i : i + size[i]]; merged-away symbols have size 0
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        ranks = self._ranks
        heap: list[tuple[int, int, int, str]] = []  # (merge rank, left, right, merged text)

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            lt = word[left : left + size[left]]
            rt = word[right : right + size[right]]
            r = ranks.get(lt + " " + rt)
            if r is not None:
                heapq.heappush(heap, (r, left, right, lt + rt))

        for i in range(1, n):
            push(i - 1, i)
        while heap:  # lowest rank first, leftmost on ties; skip pairs made stale by earlier merges
            _, left, right, merged = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or word[left : right + size[right]] != merged:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        pieces = [word[i : i + size[i]] for i in range(n) if size[i]]
        ids: list[int] = []
        for p in pieces:
            t = tok.get(p)
            if t is not None:
                ids.append(t)
            else:  # llama.cpp looks each UTF-8 byte of the piece up as a one-byte token
                for b in p.encode("utf-8"):
                    t = tok.get(chr(b)) if b < 0x80 else None
                    if t is not None:
                        ids.append(t)
        return tuple(ids)

    def _spm(self, text: str, out: list[int]) -> None:
        """SentencePiece-style merging (llm_tokenizer_spm_session): repeatedly merge the adjacent
        pair whose concatenation is the highest-scoring token (leftmost on ties); characters left
        unmerged and not in the vocabulary become <0xXX> byte tokens."""
        tok, scores = self._tok, self._scores
        n = len(text)
        if n == 0:
            return
        size = [1] * n
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            t = tok.get(text[left : right + size[right]])
            if t is not None:
                heapq.heappush(heap, (-scores[t], left, size[left] + size[right]))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, sz = heapq.heappop(heap)
            right = nxt[left]
            if size[left] == 0 or right < 0 or size[right] == 0 or size[left] + size[right] != sz:
                continue
            size[left] = sz
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        i = 0
        while i >= 0:
            piece = text[i : i + size[i]]
            t = tok.get(piece)
            if t is not None:
                out.append(t)
            else:
                for b in piece.encode("utf-8"):
                    out.append(self._spm_byte(b))
            i = nxt[i]

    def _spm_byte(self, b: int) -> int:
        t = self._tok.get(f"<0x{b:02X}>")
        if t is None and b < 0x80:
            t = self._tok.get(chr(b))
        if t is None:
            raise BadInput(f"the vocabulary has no byte token <0x{b:02X}> for a character of the text; llama.cpp cannot tokenize it either")
        return t

    # -- decode --------------------------------------------------------------------------------
    def piece(self, tid: int, special: bool = False) -> bytes:
        """The bytes one token stands for (llama_token_to_piece with lstrip=0)."""
        a = self._attrs[tid]
        text = self._texts[tid]
        if a & (A_UNKNOWN | A_CONTROL):
            return text.encode("utf-8") if special else b""
        if a & A_USER_DEFINED:
            return text.encode("utf-8")
        if a & A_NORMAL:
            if self.model == "llama":
                return text.replace("\u2581", " ").encode("utf-8")
            out = bytearray()
            for ch in text:
                b = _CHAR_TO_BYTE.get(ch)
                if b is not None:
                    out.append(b)
                else:  # llama_decode_text's marker for a character outside the byte table
                    u = ch.encode("utf-8")
                    out += b"[UNK_BYTE_0x" + u.hex().encode() + text.encode("utf-8") + b"]"
            return bytes(out)
        if a & A_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of `ids`: the token pieces joined (control tokens only when `special`), invalid
        UTF-8 replaced; for vocabularies that prefix a space (SentencePiece), that one leading space
        is dropped. No other clean-up of spaces."""
        data = b"".join(self.piece(int(i), special) for i in ids)
        if self.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"
