"""Calibration and evaluation text as users have it: plain text, or a JSONL of chat conversations.

* Plain text (any name not ending in `.jsonl`) is read as llama-imatrix's `-f` reads it: UTF-8,
  one trailing newline dropped, tokenized with the vocabulary's BOS and special tokens as text
  (`parse_special=False`, its default).
* A `.jsonl` file holds one conversation per line, `{"messages": [{"role": ..., "content": ...},
  ...]}`, the format fine-tunes are trained on. Each is rendered with the model's own chat template
  (`tokenizer.chat_template` in the GGUF) the way transformers' `apply_chat_template` renders it:
  jinja2's ImmutableSandboxedEnvironment (templates are untrusted code) with trim_blocks and
  lstrip_blocks, the loopcontrols extension, a `tojson` that does not HTML-escape, the globals
  `raise_exception` and `strftime_now`, the special-token strings (`bos_token`, `eos_token`, ...)
  as variables and `add_generation_prompt=False`. The rendered text contains the template's
  special tokens as text, so it is tokenized with `parse_special=True` and without adding BOS; the
  conversations' tokens are concatenated and the stream starts with BOS when the vocabulary adds
  one (as a plain text's does).

Hostile input: a line longer than MAX_LINE_BYTES, more than MAX_LINES lines, bad JSON, a missing
or malformed `messages` list or a template that refuses a conversation are one-line BadInput
errors naming the line."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..atomic import check_readable, io_error
from ..errors import BadInput
from ..gguf_io import GGUFFile, open_gguf
from .tokenizer import Tokenizer

MAX_LINE_BYTES = 16 << 20  # one conversation
MAX_LINES = 1_000_000
MAX_TEXT_BYTES = 1 << 30  # a plain text file is tokenized whole, as llama-imatrix does
_JINJA_MIN = (3, 1, 6)  # older jinja2 releases have known sandbox escapes (transformers refuses them too)
# HF's special-token variables and the GGUF keys of their ids
_SPECIAL_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass
class CalibrationTokens:
    tokens: list[int]
    kind: str  # "text" or "chat"
    conversations: int  # chat conversations rendered (0 for text)
    bos: int | None  # what replaces each chunk's first token: BOS when the vocabulary adds it


def is_chat_file(path: Path | str) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < _JINJA_MIN:
        raise BadInput(f"rendering a chat template needs jinja2 >= 3.1.6 (sandbox fixes); installed: {jinja2.__version__}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore attributes (a route to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for k in attrs:
                Namespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise BadInput(f"the model's chat template does not compile: {_first_line(exc)}") from None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    s = (str(exc).splitlines() or [type(exc).__name__])[0]
    return s if len(s) <= limit else s[:limit] + "…"


def render_chat(template: str, messages: list[dict[str, Any]], special: Mapping[str, str]) -> str:
    """One conversation through a chat template, as transformers' apply_chat_template(tokenize=False,
    add_generation_prompt=False) with the tokenizer's special tokens. Raises BadInput when the
    template refuses it (raise_exception, a sandbox violation, an undefined operation)."""
    import jinja2.exceptions

    compiled = _compile(template)
    msgs = []
    for m in messages:  # transformers aliases the reasoning fields so either name reaches the template
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        msgs.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None else dict(m))
    try:
        return str(compiled.render(messages=msgs, tools=None, documents=None, add_generation_prompt=False, **special))
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        raise BadInput(f"the model's chat template refused it: {_first_line(exc)}") from None


def special_tokens(g: GGUFFile) -> dict[str, str]:
    """bos_token, eos_token, ... as the strings HF passes to chat templates (the tokens' texts)."""
    texts = g.get_array("tokenizer.ggml.tokens", "str") or []
    out = {}
    for var, key in _SPECIAL_KEYS.items():
        tid = g.get_int(key)
        if tid is not None and 0 <= tid < len(texts):
            out[var] = texts[tid]
    return out


def _check_message(m: Any) -> str | None:
    """Why m is not a chat message, or None."""
    if not isinstance(m, dict):
        return f"a message is a {type(m).__name__}, not an object"
    if not isinstance(m.get("role"), str):
        return 'a message has no "role" string'
    c = m.get("content")
    if c is not None and not isinstance(c, (str, list)):
        return f'a message\'s "content" is a {type(c).__name__}, not a string or a list of parts'
    return None


def read_chat_jsonl(
    path: Path, template: str, special: Mapping[str, str], encode: Callable[[str], list[int]], max_tokens: int | None = None
) -> tuple[list[int], int]:
    """(tokens of the rendered conversations, concatenated; conversations read). Stops early once
    max_tokens are there: each conversation is tokenized alone, so a prefix of the file gives a
    prefix of the tokens."""
    tokens: list[int] = []
    n_conv = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; errors map to IOFailure
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    with f:
        for lineno in range(1, MAX_LINES + 2):
            if max_tokens is not None and len(tokens) >= max_tokens:
                break
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise io_error(exc, path, "read") from exc
            if not raw:
                break
            if lineno > MAX_LINES:
                raise BadInput(f"{path}: more than {MAX_LINES} lines")
            if len(raw) > MAX_LINE_BYTES:
                raise BadInput(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except RecursionError:
                raise BadInput(f"{where}: not a JSON conversation (it nests too deeply)") from None
            except ValueError as exc:  # not UTF-8 or not JSON
                raise BadInput(f"{where}: not JSON ({_first_line(exc, 120)})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                raise BadInput(
                    f'{where}: expected an object with a "messages" list, e.g. {{"messages": [{{"role": "user", "content": "..."}}]}}'
                )
            msgs = obj["messages"]
            if not msgs:
                raise BadInput(f'{where}: "messages" is empty')
            for m in msgs:
                why = _check_message(m)
                if why:
                    raise BadInput(f"{where}: {why}")
            try:
                text = render_chat(template, msgs, special)
            except BadInput as exc:
                raise BadInput(f"{where}: {exc}") from None
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
                raise BadInput(f"{where}: a string holds a lone surrogate (a \\uD800-\\uDFFF escape), which is not text") from None
            tokens += encode(text)
            n_conv += 1
    if n_conv == 0:
        raise BadInput(f"{path}: no conversations (one JSON object per line)")
    return tokens, n_conv


def calibration_tokens(model: Path | str, path: Path | str, max_tokens: int | None = None) -> CalibrationTokens:
    """The token stream of a calibration (or evaluation) file for `model`'s vocabulary.

    `max_tokens` lets a JSONL reader stop early; a plain text is always tokenized whole (its last
    token may depend on what follows, and llama-imatrix tokenizes the whole file)."""
    path = check_readable(Path(path), "calibration text")
    with open_gguf(Path(model)) as g:
        tok = Tokenizer.from_gguf(g)
        template = g.get_str("tokenizer.chat_template")
        special = special_tokens(g)
    bos = tok.bos_id if tok.add_bos else None
    if is_chat_file(path):
        if not template:
            raise BadInput(f"{model}: no tokenizer.chat_template in the metadata to render {path.name}; give plain text instead")
        ids, n = read_chat_jsonl(path, template, special, lambda s: tok.encode(s, add_special=False, parse_special=True), max_tokens)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return CalibrationTokens(ids, "chat", n, bos)
    try:
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise BadInput(f"{path}: {size} bytes; plain calibration text is limited to {MAX_TEXT_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise io_error(exc, path, "read") from exc
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if body.endswith("\n"):  # llama.cpp's -f drops one trailing newline
        body = body[:-1]
    return CalibrationTokens(tok.encode(body, add_special=True), "text", 0, bos)


OVERLAP_WORDS = 12  # a run of this many words in both texts is shared text, not a common phrase
OVERLAP_READ_BYTES = 8 << 20  # the overlap check reads at most this much of each file (it is advisory)


def _content_words(path: Path) -> list[str]:
    """The words of a text (of a chat JSONL: of its messages' contents). Bounded and lenient: an
    unreadable or malformed part is skipped (the stages reading the file report it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(OVERLAP_READ_BYTES)
    except OSError:
        return []
    text = raw.decode("utf-8", errors="replace")
    if is_chat_file(path):
        parts = []
        for line in text.splitlines():
            try:
                obj = json.loads(line)
                msgs = obj.get("messages") if isinstance(obj, dict) else None
            except (ValueError, RecursionError):
                continue
            for m in msgs if isinstance(msgs, list) else []:
                c = m.get("content") if isinstance(m, dict) else None
                if isinstance(c, list):
                    c = " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
                if isinstance(c, str):
                    parts.append(c)
        text = " ".join(parts)
    return text.split()


def text_overlap(calibration: Path | str, evaluation: Path | str) -> tuple[int, int]:
    """(passages of the evaluation text also in the calibration text, passages of the evaluation
    text): the evaluation's words cut into runs of OVERLAP_WORDS, each looked up among every such
    run of the calibration's words (so line breaks and chat formatting don't hide a copy).
    Calibration that contains the evaluation text flatters every imatrix variant's score."""
    ev, cal = _content_words(Path(evaluation)), _content_words(Path(calibration))
    n = OVERLAP_WORDS
    seen = {hash(tuple(cal[i : i + n])) for i in range(len(cal) - n + 1)}
    runs = [hash(tuple(ev[i : i + n])) for i in range(0, len(ev) - n + 1, n)]
    return sum(h in seen for h in runs), len(runs)


__all__ = ["CalibrationTokens", "calibration_tokens", "is_chat_file", "read_chat_jsonl", "render_chat", "special_tokens", "text_overlap"]
