"""Tokenizer vocabularies: token id -> string from a model's tokenizer.json, and the check that the models agree."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import side_files
from llm_merge.io.checkpoint import Checkpoint

def label(checkpoint: Checkpoint) -> str:
    return str(checkpoint.path)


def tokenizer_vocab(directory: Path, use_tokenizers: bool = False) -> Optional[dict[int, str]]:
    """Token id -> string from ``directory/tokenizer.json`` (None without one)."""
    path = Path(directory) / "tokenizer.json"
    if not os.path.lexists(path):
        return None
    text = side_files.read_text(path)
    if use_tokenizers:
        try:
            import tokenizers
        except ImportError:
            raise ConfigError(
                "--tokenizer_source union needs the tokenizers package: pip install 'llm_merge[tokenizers]'"
            ) from None
        try:
            vocab = tokenizers.Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise MergeError(f"{path}: cannot load the tokenizer ({exc})") from None
        return {i: s for s, i in vocab.items()}
    try:
        data = json.loads(text)
        model_vocab = data.get("model", {}).get("vocab", {})
        if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
            out = {i: entry[0] for i, entry in enumerate(model_vocab)}
        else:
            out = {int(i): s for s, i in model_vocab.items()}
        out.update({int(t["id"]): t["content"] for t in data.get("added_tokens") or []})
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise MergeError(f"{path}: cannot read the vocabulary ({exc})") from None
    return out


def check_vocab_agreement(vocabs: list[tuple[Checkpoint, dict[int, str]]]) -> None:
    """Every token id must mean the same string in every tokenizer that has it."""
    seen: dict[int, tuple[str, Checkpoint]] = {}
    for checkpoint, vocab in vocabs:
        for token_id, text in vocab.items():
            known = seen.setdefault(token_id, (text, checkpoint))
            if known[0] != text:
                raise MergeError(
                    f"token id {token_id} is {known[0]!r} in {known[1].path}/tokenizer.json but {text!r} in "
                    f"{checkpoint.path}/tokenizer.json: the vocabularies do not match by id, so their embedding "
                    "rows cannot be merged by id; --semantics mergekit --tokenizer_source union|base|MODEL "
                    "builds one tokenizer and puts every input's rows on it, token by token (mergekit's tokenizer merge)"
                )

