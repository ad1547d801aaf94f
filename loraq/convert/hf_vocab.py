"""The tokenizer KVs of a Hugging Face folder, as llama.cpp's convert_hf_to_gguf.py writes them for
a GPT-2 byte-level BPE tokenizer (docs/llama-cpp.md §1): token list, token types, merges, the
pre-tokenizer name, special-token ids, add_bos/add_eos, chat template.

The `tokenizers` library reads tokenizer.json (no transformers, no torch); gguf-py's SpecialVocab
reads the merges, special tokens and chat template. Written here is only what neither does:

- token types: an added token is CONTROL when it is special or looks special (`<|…|>`), else
  USER_DEFINED; a non-normalized added token is first encoded and decoded back, as the reference
  does through transformers (the same text for every real tokenizer);
- `tokenizer.ggml.pre`: llama.cpp names the pre-tokenizer by the sha256 of the token ids of a fixed
  test text (its get_vocab_base_pre), so a tokenizer llama.cpp does not know is refused there, and
  here with the same rule;
- add_bos/add_eos from the post-processor: llama.cpp's current gguf-py lets tokenizer.json's
  post-processor decide (a ByteLevel one adds neither) over tokenizer_config.json; the released
  gguf package may predate that, so the rule is applied here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

from ..errors import BadInput

# llama.cpp's pre-tokenizer test text (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs,
# emoji, digit runs, Khmer, CJK, Cyrillic, quotes and English contractions.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some "
    "tea? We'Ve a'lL"
)

# sha256(str(token ids of CHKTXT)) -> llama.cpp's pre-tokenizer name, for the tokenizers of models of
# the supported architectures (llama incl. Llama 3 / SmolLM2 / Mistral tekken / DeepSeek distills,
# qwen2, qwen3). Values as recorded in llama.cpp's convert_hf_to_gguf.py (Oct 2026 tree); a
# tokenizer not listed is refused, as llama.cpp refuses one missing from its own table.
BPE_PRE: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
}

# gguf TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

MAX_TOKENIZER_BYTES = 256 << 20  # Qwen's tokenizer.json is 11 MB; Gemma's 33 MB


class KVSink(Protocol):
    """The gguf.GGUFWriter methods the vocabulary needs (gguf-py's SpecialVocab calls more)."""

    def add_tokenizer_model(self, model: str) -> None: ...
    def add_tokenizer_pre(self, pre: str) -> None: ...
    def add_token_list(self, tokens: Any) -> None: ...
    def add_token_types(self, types: Any) -> None: ...
    def add_add_bos_token(self, value: bool) -> None: ...
    def add_add_eos_token(self, value: bool) -> None: ...


def looks_special(token: str) -> bool:
    """Added tokens that some models forget to mark special but llama.cpp treats as control."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _load_json(p: Path) -> Any:
    from .peft import read_json  # the distrusting JSON reader adapters already use

    try:
        if p.stat().st_size > MAX_TOKENIZER_BYTES:
            raise BadInput(f"{p} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB; is this the right file?")
        raw = p.read_bytes()
    except OSError as exc:
        from ..atomic import io_error

        raise io_error(exc, p, "read") from exc
    return read_json(raw, p, "re-download the model folder")


def check_supported_tokenizer(folder: Path) -> dict[str, Any]:
    """tokenizer.json as a dict, or a BadInput when loraq cannot convert the tokenizer."""
    tj = folder / "tokenizer.json"
    if (folder / "tokenizer.model").is_file():
        raise BadInput(
            f"{folder} has a SentencePiece tokenizer.model; loraq converts GPT-2 byte-level BPE tokenizers "
            "(Llama 3, SmolLM2, Qwen, Mistral tekken) only: convert this base with llama.cpp's convert_hf_to_gguf.py"
        )
    if not tj.is_file():
        raise BadInput(f"{tj} not found; loraq needs the tokenizer.json that save_pretrained writes beside the weights")
    data = _load_json(tj)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if isinstance(model, dict) else "unknown"
        fallback = " with byte_fallback (SentencePiece-style)" if isinstance(model, dict) and model.get("byte_fallback") else ""
        raise BadInput(
            f"{tj} is a {kind}{fallback} tokenizer; loraq converts GPT-2 byte-level BPE tokenizers only: "
            "convert this base with llama.cpp's convert_hf_to_gguf.py"
        )
    return data


def pre_tokenizer_name(tok: Any, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer, identified by the hash of CHKTXT's token ids."""
    ids = tok.encode(CHKTXT).ids
    h = hashlib.sha256(str(ids).encode()).hexdigest()
    name = BPE_PRE.get(h)
    if name is None:
        raise BadInput(
            f"{path}: the BPE pre-tokenizer is not one llama.cpp knows (hash {h[:16]}…); llama.cpp's converter refuses it too "
            "(update convert_hf_to_gguf.py's get_vocab_base_pre)"
        )
    return name


def gpt2_vocab(folder: Path, vocab_size: int | None) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer name) for a GPT-2 byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library's own parse errors
        raise BadInput(f"{path} is not a tokenizer the tokenizers library reads ({str(exc)[:120]}); re-download it") from None
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    n = vocab_size if vocab_size is not None else len(vocab)
    if vocab and max(vocab.values()) >= n:
        raise BadInput(f"{path} has token id {max(vocab.values())}, but config.json's vocab_size is {n}; the folder is inconsistent")
    pre = pre_tokenizer_name(tok, path)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    added_by_text = {a.content: i for i, a in added.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = reverse[i]
        if text in added_by_text:
            info = added[added_by_text[text]]
            if not info.normalized:
                # llama.cpp assumes control and user-defined tokens are pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if info.special or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    return tokens, types, pre


def post_processor_adds(tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos as tokenizer.json's post-processor decides them (llama.cpp's gguf-py rule):
    a ByteLevel processor adds neither unless something else said so; a TemplateProcessing adds
    BOS/EOS when its single-sequence template starts/ends with the BOS/EOS token."""

    def content(v: Any) -> Any:
        return v.get("content") if isinstance(v, dict) else v

    bos = content(tokenizer_config.get("bos_token")) or content(tokenizer_config.get("cls_token"))
    eos = content(tokenizer_config.get("eos_token")) or content(tokenizer_config.get("sep_token"))
    adds: dict[str, bool] = {}
    post = tokenizer_json.get("post_processor")
    if not isinstance(post, dict):
        return adds
    for proc in post.get("processors", [post]) if isinstance(post.get("processors", []), list) else []:
        if not isinstance(proc, dict):
            continue
        kind = proc.get("type")
        if kind == "ByteLevel":
            adds.setdefault("bos", False)
            adds.setdefault("eos", False)
        elif kind == "TemplateProcessing":
            single = proc.get("single") or []
            if isinstance(single, list) and len(single) > 1:
                first = (single[0].get("SpecialToken") or {}).get("id") if isinstance(single[0], dict) else None
                last = (single[-1].get("SpecialToken") or {}).get("id") if isinstance(single[-1], dict) else None
                if first:
                    adds["bos"] = first == bos or first == content(tokenizer_config.get("cls_token"))
                if last:
                    adds["eos"] = last == eos
    return adds


def tokenizer_config(folder: Path) -> dict[str, Any]:
    p = folder / "tokenizer_config.json"
    if not p.is_file():
        return {}
    cfg = _load_json(p)
    if not isinstance(cfg, dict):
        raise BadInput(f"{p} must hold a JSON object")
    return cfg


def add_gpt2_vocab(w: Any, folder: Path, vocab_size: int | None, tokenizer_json: dict[str, Any]) -> str:
    """Write the gpt2 tokenizer KVs into `w` (a gguf.GGUFWriter used as a KV collector) in the
    reference's order; returns the pre-tokenizer name."""
    import gguf

    tokens, types, pre = gpt2_vocab(folder, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    # the post-processor's word wins over tokenizer_config.json's add_*_token (see module doc)
    special.add_special_token.update(post_processor_adds(tokenizer_json, tokenizer_config(folder)))
    special.add_to_gguf(w, quiet=True)
    return pre
