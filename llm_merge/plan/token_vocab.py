"""mergekit's output tokenizer (``--semantics mergekit`` with ``tokenizer_source``): built from tokenizer.json files.

The tokenizer base is the base model (else the first model), stripped of tokens at or beyond its config.json
``vocab_size``. ``base`` keeps it; a model directory takes that model's tokenizer; ``union`` appends, in input
order (base, then the models in order, each in id order), every token of another input the base lacks: plain
tokens as normal added tokens, added tokens with their own settings. Tokens named by ``tokenizer_tokens`` are
appended too when missing. Each input then gets a permutation: output id -> its own row (-1: it lacks the token).
No tensor data is read here.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import side_files

#: settings of a plain token added to the output tokenizer (those transformers' ``add_tokens(str)`` gives)
_PLAIN_ADDED = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


@dataclass(frozen=True)
class InputTokens:
    """One input's tokenizer: token -> id (with added tokens), its tokenizer.json, and its row count."""

    vocab: dict[str, int]
    tokenizer: Optional[dict]  # None: the input has no tokenizer.json (the tokenizer base's is assumed)
    rows: int  # config.json vocab_size, else the vocabulary's size


@dataclass(frozen=True)
class OutputVocab:
    tokenizer: dict  # the output tokenizer.json
    tokens: tuple[str, ...]  # token of each output id
    permutations: dict[int, np.ndarray]  # input key -> int64 [len(tokens)]: its row of each output token, -1 if none
    originals: dict[int, dict[str, int]]  # input key -> its own token -> id (every token, as mergekit looks them up)
    source: int  # input key whose tokenizer_config.json and other tokenizer files the output gets


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("--tokenizer_source with --semantics mergekit needs the tokenizers package: "
                          "pip install 'llm_merge[tokenizers]'") from None
    return tokenizers


def _vocab_of(tokenizer_json: dict, where: str) -> dict[str, int]:
    try:
        return _tokenizers().Tokenizer.from_str(json.dumps(tokenizer_json)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise MergeError(f"{where}: cannot load the tokenizer ({exc})") from None


def read_input_tokens(directory: Path, config: dict) -> Optional[InputTokens]:
    path = Path(directory) / "tokenizer.json"
    if not os.path.lexists(path):
        return None
    data = side_files.read_json(path)
    vocab = _vocab_of(data, str(path))
    rows = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else len(vocab)
    return InputTokens(vocab, data, rows)


def _stripped(tokens: InputTokens, where: str) -> tuple[dict, dict[str, int]]:
    """The tokenizer without its tokens at ids >= rows (added tokens only: a model token there is refused)."""
    data = copy.deepcopy(tokens.tokenizer)
    data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t["id"] < tokens.rows]
    beyond = [t for t, i in tokens.vocab.items() if i >= tokens.rows and t not in {a["content"] for a in tokens.tokenizer.get("added_tokens") or []}]
    if beyond:
        raise MergeError(f"{where}: tokenizer.json has {len(beyond)} model token(s) at ids >= vocab_size {tokens.rows} "
                         f"(e.g. {beyond[0]!r}); only added tokens beyond vocab_size can be dropped")
    return data, _vocab_of(data, where)


def build_output_vocab(source: str, inputs: dict[int, InputTokens], paths: dict[int, Path], base_key: int,
                       extra_tokens: tuple[str, ...]) -> OutputVocab:
    """The output tokenizer and every input's permutation. ``inputs``: key -> tokens (base key first when the base
    is an input, then the models in order); ``source``: "base", "union", or an input key as a string."""
    base = inputs.get(base_key)
    if base is None or base.tokenizer is None:
        raise MergeError(f"--tokenizer_source {source}: {paths[base_key]} (the tokenizer base: the base model, else the "
                         "first model) has no tokenizer.json")
    base_json, base_vocab = _stripped(base, str(paths[base_key] / "tokenizer.json"))
    tokens_of = {k: (t if t.tokenizer is not None else InputTokens(base_vocab, None, t.rows)) for k, t in inputs.items()}
    source_key = base_key
    if source == "base":
        out = base_json
    elif source == "union":
        out = _union(base_json, base_vocab, tokens_of)
    else:
        source_key = int(source)
        if tokens_of[source_key].tokenizer is None:
            raise MergeError(f"--tokenizer_source: {paths[source_key]} has no tokenizer.json")
        out = copy.deepcopy(tokens_of[source_key].tokenizer)
    vocab = _vocab_of(out, "output tokenizer")
    missing = [t for t in extra_tokens if t not in vocab]
    if missing:
        out = _appended(out, len(vocab), [(t, dict(_PLAIN_ADDED)) for t in missing])
        vocab = _vocab_of(out, "output tokenizer")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise MergeError(f"--tokenizer_source {source}: the output vocabulary's ids are not 0..{len(ids) - 1} without gaps")
    tokens = tuple(sorted(vocab, key=vocab.get))
    permutations = {}
    for key, own in tokens_of.items():
        p = np.array([own.vocab.get(t, -1) for t in tokens], dtype=np.int64)
        p[p >= own.rows] = -1  # rows the model does not have (tokenizer ids beyond its vocab_size)
        permutations[key] = p
    return OutputVocab(out, tokens, permutations, {k: t.vocab for k, t in tokens_of.items()}, source_key)


def _union(base_json: dict, base_vocab: dict[str, int], inputs: dict[int, InputTokens]) -> dict:
    """mergekit's union: the base tokenizer plus every other token of an input (ids below its vocab_size)."""
    plain: dict[str, None] = {}
    added: dict[str, dict] = {}
    for key, tokens in inputs.items():
        settings = {t["content"]: t for t in (tokens.tokenizer or {}).get("added_tokens") or []}
        for token, i in sorted(tokens.vocab.items(), key=lambda item: item[1]):
            if i >= tokens.rows:
                continue
            if token in settings:
                added.setdefault(token, {k: v for k, v in settings[token].items() if k not in ("id", "content")})
            else:
                plain.setdefault(token)
    new = [(t, dict(_PLAIN_ADDED)) for t in plain if t not in base_vocab and t not in added]
    new += [(t, s) for t, s in added.items() if t not in base_vocab]
    return _appended(base_json, len(base_vocab), new)


def _appended(tokenizer_json: dict, next_id: int, tokens: list[tuple[str, dict]]) -> dict:
    out = copy.deepcopy(tokenizer_json)
    out["added_tokens"] = list(out.get("added_tokens") or [])
    for offset, (token, settings) in enumerate(tokens):
        out["added_tokens"].append({"id": next_id + offset, "content": token, **{**_PLAIN_ADDED, **settings}})
    return out


def output_tokenizer_config(config: Optional[dict], vocab: OutputVocab) -> Optional[dict]:
    """The source's tokenizer_config.json with ``added_tokens_decoder`` naming every added token of the output."""
    if config is None:
        return None
    out = dict(config)
    if isinstance(out.get("added_tokens_decoder"), dict):
        decoder = dict(out["added_tokens_decoder"])
        for entry in vocab.tokenizer.get("added_tokens") or []:
            decoder.setdefault(str(entry["id"]), {k: v for k, v in entry.items() if k != "id"})
        out["added_tokens_decoder"] = decoder
    return out
