"""Calibration data as users have it (loraq/llama/calibration.py).

Oracle for chat rendering: transformers' own renderer (`render_jinja_template`, what
`tokenizer.apply_chat_template(..., tokenize=False)` calls with the tokenizer's special tokens)
given the same template string, conversations and special tokens. Hostile JSONL: one-line
BadInput errors naming the line, through the library and the CLI (exit 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraq.cli import run_cli
from loraq.errors import BadInput
from loraq.gguf_io import open_gguf
from loraq.llama import calibration
from loraq.llama.calibration import calibration_tokens, render_chat, special_tokens
from loraq.llama.tokenizer import Tokenizer

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# Templates that exercise what HF's environment sets: trim_blocks / lstrip_blocks whitespace,
# bos/eos variables, loop controls, namespace, tojson without HTML escaping, raise_exception.
TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}\n  {% if m['role'] == 'user' %}\n[INST] {{ m['content'] | trim }} [/INST]\n  {% else %}\n{{ m['content'] }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}<{{ ns.n }}|{{ m.role }}>{{ m.content | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}",
    "{%- for m in messages -%}\n    {{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' -}}\n{%- endfor -%}",
]
CHATS = [
    [{"role": "user", "content": 'Hi <b>&</b> "é" 日本'}, {"role": "assistant", "content": "  Hello!\n\n  indented"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\tb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ],
]


def _hf_render(template: str, chat: list[dict], special: dict[str, str]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[chat], chat_template=template, add_generation_prompt=False, **special)
    return rendered[0]


@pytest.mark.parametrize("ti", range(len(TEMPLATES)))
@pytest.mark.parametrize("ci", range(len(CHATS)))
def test_render_matches_transformers(ti: int, ci: int) -> None:
    pytest.importorskip("transformers")
    want = _hf_render(TEMPLATES[ti], CHATS[ci], SPECIAL)
    assert render_chat(TEMPLATES[ti], CHATS[ci], SPECIAL) == want


def test_smollm2_template_matches_transformers(smollm2_q4_1: Path) -> None:
    pytest.importorskip("transformers")
    with open_gguf(smollm2_q4_1) as g:
        template = g.get_str("tokenizer.chat_template")
        special = special_tokens(g)
    assert template and special["eos_token"] == "<|im_end|>"
    for chat in CHATS:
        assert render_chat(template, chat, special) == _hf_render(template, chat, special)


def test_raise_exception_and_sandbox_are_bad_input() -> None:
    with pytest.raises(BadInput, match="refused it: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", CHATS[0], SPECIAL)
    with pytest.raises(BadInput, match="refused it"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", CHATS[0], SPECIAL)
    with pytest.raises(BadInput, match="refused it"):
        render_chat("{% set ns = namespace(_x=1) %}", CHATS[0], SPECIAL)
    with pytest.raises(BadInput, match="does not compile"):
        render_chat("{% for %}", CHATS[0], SPECIAL)


def _jsonl(p: Path, chats: list) -> Path:
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    return p


def test_chat_tokens_are_rendered_conversations(smollm2_q4_1: Path, tmp_path: Path) -> None:
    """The stream is each rendered conversation tokenized with its special tokens parsed, concatenated."""
    f = _jsonl(tmp_path / "cal.jsonl", CHATS)
    cal = calibration_tokens(smollm2_q4_1, f)
    tok = Tokenizer.from_gguf(smollm2_q4_1)
    with open_gguf(smollm2_q4_1) as g:
        template, special = g.get_str("tokenizer.chat_template"), special_tokens(g)
    assert template is not None
    want = []
    for c in CHATS:
        want += tok.encode(render_chat(template, c, special), add_special=False, parse_special=True)
    if tok.add_bos and want[0] != tok.bos_id:
        want.insert(0, tok.bos_id)
    assert (cal.kind, cal.conversations, cal.tokens) == ("chat", 2, want)
    im_start = tok.encode("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1 and cal.tokens.count(im_start[0]) >= 5  # special tokens, not their text


def test_plain_text_drops_one_trailing_newline(smollm2_q4_1: Path, tmp_path: Path) -> None:
    """As llama.cpp's -f: one trailing newline is dropped before tokenizing with BOS."""
    tok = Tokenizer.from_gguf(smollm2_q4_1)
    f = tmp_path / "t.txt"
    f.write_text("Hello world.\n\n", encoding="utf-8")
    assert calibration_tokens(smollm2_q4_1, f).tokens == tok.encode("Hello world.\n", add_special=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": [\n', r"cal\.jsonl:2: not JSON"),
        ('\n{"conversation": []}\n', r'cal\.jsonl:2: expected an object with a "messages" list'),
        ("[1, 2]\n", r'cal\.jsonl:1: expected an object with a "messages" list'),
        ('{"messages": []}\n', r'cal\.jsonl:1: "messages" is empty'),
        ('{"messages": ["hi"]}\n', r"cal\.jsonl:1: a message is a str"),
        ('{"messages": [{"content": "x"}]}\n', r'cal\.jsonl:1: a message has no "role"'),
        ('{"messages": [{"role": "user", "content": 5}]}\n', r'cal\.jsonl:1: a message\'s "content" is a int'),
        ("\n\n", r"no conversations"),
        ('{"messages": [{"role": "user", "content": "\\ud800"}]}\n', r"cal\.jsonl:1: .*lone surrogate"),
        ('{"messages": [{"role": "user", "content": "ok"}]}\n' + "[" * 100000 + "\n", r"cal\.jsonl:2: not a JSON conversation \(it nests"),
    ],
)
def test_hostile_jsonl(smollm2_q4_1: Path, tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "cal.jsonl"
    f.write_text(body, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(BadInput, match=message) as ei:
        calibration_tokens(smollm2_q4_1, f)
    assert "\n" not in str(ei.value)


def test_bounded_lines(smollm2_q4_1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 100}]}) + "\n"
    f = tmp_path / "cal.jsonl"
    f.write_text(line * 3, encoding="utf-8")
    monkeypatch.setattr(calibration, "MAX_LINE_BYTES", 50)
    with pytest.raises(BadInput, match=r"cal\.jsonl:1: line longer than 50 bytes"):
        calibration_tokens(smollm2_q4_1, f)
    monkeypatch.setattr(calibration, "MAX_LINE_BYTES", 1 << 20)
    monkeypatch.setattr(calibration, "MAX_LINES", 2)
    with pytest.raises(BadInput, match="more than 2 lines"):
        calibration_tokens(smollm2_q4_1, f)


def test_template_refusal_names_the_line(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "cal.jsonl", [CHATS[0], CHATS[1]])
    tpl = "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}x"
    with pytest.raises(BadInput, match=r"cal\.jsonl:2: the model's chat template refused it: too long"):
        calibration.read_chat_jsonl(f, tpl, SPECIAL, lambda s: [0])


def test_cli_bad_jsonl_exits_4(smollm2_q4_1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "cal.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "ok"}]}\nnot json\n', encoding="utf-8")
    rc = run_cli(["imatrix", str(smollm2_q4_1), "-f", str(f), "-o", str(tmp_path / "o.gguf"), "-c", "16"])
    err = capsys.readouterr().err
    assert rc == 4 and "cal.jsonl:2: not JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o.gguf").exists()
