"""A vocabulary grown by a fine-tune (resize_token_embeddings + new tokens), carried into the merged GGUF.

The adapter's token_embd/output have more rows than the base; the new tokens' text comes from the
tokenizer files saved in the adapter folder (tokenizer.json, else added_tokens.json). As
convert_hf_to_gguf.py writes them: an added special token is CONTROL, another added token
USER_DEFINED, a row with no token (padding to a multiple) `[PAD<id>]` UNUSED; scores, where the base
has them, are -1000 for the new ids. Merges the tokenizer adds after the base's are appended.
The GGUF token list, types, scores, merges and <arch>.vocab_size change together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFValueType as V

from ..atomic import io_error
from ..convert.peft import read_json
from ..errors import BadInput
from ..gguf_io import GGUFFile
from ..gguf_io.writer import encode_kv

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
MAX_TOKENIZER_BYTES = 256 << 20  # a tokenizer.json is a few MiB


def _read(p: Path) -> Any:
    try:
        if p.stat().st_size > MAX_TOKENIZER_BYTES:
            raise BadInput(f"{p} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB; is this a tokenizer file?")
        return read_json(p.read_bytes(), p, "re-save the tokenizer with save_pretrained")
    except OSError as exc:
        raise io_error(exc, p, "read") from exc


def new_tokens(folder: Path) -> tuple[dict[int, tuple[str, bool]], list[str]]:
    """({id: (text, special)} of the folder's tokenizer, its merges as "a b" strings)."""
    tj, aj = folder / "tokenizer.json", folder / "added_tokens.json"
    vocab: dict[int, tuple[str, bool]] = {}
    merges: list[str] = []
    if tj.is_file():
        doc = _read(tj)
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict):
            raise BadInput(f"{tj} has no tokenizer model; re-save the tokenizer with save_pretrained")
        mv = model.get("vocab", {})
        if isinstance(mv, dict):
            vocab.update({i: (t, False) for t, i in mv.items() if isinstance(i, int) and not isinstance(i, bool)})
        for m in model.get("merges") or []:
            merges.append(m if isinstance(m, str) else " ".join(map(str, m)))
        for a in doc.get("added_tokens") or []:
            if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str):
                vocab[a["id"]] = (a["content"], bool(a.get("special")))
    elif aj.is_file():
        doc = _read(aj)
        if not isinstance(doc, dict):
            raise BadInput(f"{aj} must map token text to ids")
        vocab.update({i: (t, False) for t, i in doc.items() if isinstance(i, int) and not isinstance(i, bool)})
    return vocab, merges


def grown_vocab_kvs(base: GGUFFile, n_new: int, folder: Path | None) -> dict[str, bytes]:
    """The KV records that change when the vocabulary grows from the base's to `n_new` tokens."""
    tokens = list(base.get("tokenizer.ggml.tokens") or [])
    n_base = len(tokens)
    where = f"the adapter grows the vocabulary from {n_base} to {n_new} tokens"
    if folder is None:
        raise BadInput(f"{where}, but it is not a PEFT folder with tokenizer files naming the new tokens")
    vocab, merges = new_tokens(folder)
    if not vocab:
        raise BadInput(
            f"{where}, but {folder} has no tokenizer.json or added_tokens.json naming the new tokens; "
            "save the tokenizer with the adapter (tokenizer.save_pretrained)"
        )
    if max(vocab) >= n_new:
        raise BadInput(f"{where}, but {folder}'s tokenizer has token id {max(vocab)}; the adapter's embeddings do not cover it")
    named = sum(1 for i in range(n_base, n_new) if i in vocab)
    if named == 0:
        raise BadInput(
            f"{where}, but {folder}'s tokenizer names none of the new ids {n_base}..{n_new - 1}; is it the tokenizer of this fine-tune?"
        )
    types = list(base.get("tokenizer.ggml.token_type") or [NORMAL] * n_base)
    add_t, add_ty = [], []
    for i in range(n_base, n_new):
        text, special = vocab.get(i, (f"[PAD{i}]", False))
        add_t.append(text)
        add_ty.append(UNUSED if i not in vocab else CONTROL if special else USER_DEFINED)
    out = {
        "tokenizer.ggml.tokens": encode_kv("tokenizer.ggml.tokens", V.ARRAY, tokens + add_t, V.STRING),
        "tokenizer.ggml.token_type": encode_kv("tokenizer.ggml.token_type", V.ARRAY, types + add_ty, V.INT32),
    }
    scores = base.get("tokenizer.ggml.scores")
    if scores is not None:
        out["tokenizer.ggml.scores"] = encode_kv("tokenizer.ggml.scores", V.ARRAY, [*scores, *[-1000.0] * len(add_t)], V.FLOAT32)
    old = list(base.get("tokenizer.ggml.merges") or [])
    if base.get("tokenizer.ggml.merges") is not None and len(merges) > len(old) and merges[: len(old)] == old:
        out["tokenizer.ggml.merges"] = encode_kv("tokenizer.ggml.merges", V.ARRAY, merges, V.STRING)
    key = f"{base.arch}.vocab_size"
    if base.get(key) is not None:
        out[key] = encode_kv(key, V.UINT32, n_new)
    return out
