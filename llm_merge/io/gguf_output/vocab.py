"""The GGUF vocabulary: tokens, token types, scores, merges, special tokens and chat template.

Read from the output's tokenizer files (those of ``--tokenizer_source`` when given), with one
token per embedding row: ids the tokenizer lacks become ``[PAD{id}]`` (type UNUSED), and a
tokenizer id beyond the embedding's rows is an error before any work. So the vocabulary
always matches the embedding, by construction.

* ``tokenizer.json`` with a byte-level BPE model (GPT-2, Llama-3, Qwen2): GGUF model ``gpt2``,
  its merges, and the pre-tokenizer name told from the ``pre_tokenizer`` section
  (``PRE_TOKENIZERS``; ``default`` when it is none of them).
* ``tokenizer.json`` with a byte-fallback BPE model (SentencePiece-style: Llama-2, Mistral):
  GGUF model ``llama``, scores ``-id`` (lower ids merge first, as in SentencePiece BPE).
* ``tokenizer.model`` (preferred where ``sentencepiece`` is installed, as by llama.cpp's converter; needed
  when ``tokenizer.json`` is not BPE): the ``gguf`` package's SentencePiece reader, GGUF model ``llama``.
* Added tokens of ``tokenizer.json`` (special: CONTROL, others: USER_DEFINED) in every case.

Special token ids, ``add_bos/eos``, and the chat template come from the ``gguf`` package's
``SpecialVocab`` (tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llm_merge.errors import MergeError
from llm_merge.io import side_files

log = logging.getLogger(__name__)

#: llama.cpp pre-tokenizer names of byte-level BPE tokenizers, by the regular expression of their Split step.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
#: A plain ByteLevel pre-tokenizer with its built-in regular expression is GPT-2's.
GPT2_PRE = "gpt-2"
#: The pre-tokenizer written when none of the above is recognized (llama.cpp's own default).
DEFAULT_PRE = "default"

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Vocabulary:
    """Everything the GGUF file says about the tokenizer, one token per embedding row."""

    model: str  # "gpt2" or "llama"
    pre: Optional[str]
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    scores: Optional[tuple[float, ...]]
    directory: Path


def read_vocabulary(gguf: Any, directory: Path, rows: int) -> Vocabulary:
    """The vocabulary of ``directory``'s tokenizer files, padded to ``rows`` tokens."""
    json_path, model_path = directory / "tokenizer.json", directory / "tokenizer.model"
    tokenizer = side_files.read_json(json_path) if json_path.is_file() else None
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if model_path.is_file() and (_has_sentencepiece() or not (isinstance(model, dict) and model.get("type") == "BPE")):
        return _from_sentencepiece(gguf, model_path, tokenizer, directory, rows)
    if tokenizer is not None:
        return _from_tokenizer_json(tokenizer, json_path, directory, rows)
    raise MergeError(f"--output_format gguf: {directory} has no tokenizer.json or tokenizer.model; "
                     "a GGUF file needs the tokenizer (--tokenizer_source picks another model's)")


def _from_tokenizer_json(tokenizer: Any, path: Path, directory: Path, rows: int) -> Vocabulary:
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise MergeError(f"--output_format gguf: {path} has a {kind!r} model; supported: BPE (byte-level or byte-fallback)")
    byte_fallback = bool(model.get("byte_fallback"))
    by_id: dict[int, tuple[str, int]] = {}
    for text, token_id in model["vocab"].items():
        kind = _BYTE if byte_fallback and _BYTE_TOKEN.fullmatch(text) else _UNKNOWN if text == model.get("unk_token") else _NORMAL
        by_id[token_id] = (text, kind)
    _add_added_tokens(by_id, tokenizer)
    tokens, types = _padded(by_id, rows, path)
    scores = tuple(-float(i) if kind == _NORMAL else 0.0 for i, kind in enumerate(types)) if byte_fallback else None
    pre = None if byte_fallback else _pre_tokenizer(tokenizer.get("pre_tokenizer"), path)
    return Vocabulary("llama" if byte_fallback else "gpt2", pre, tokens, types, scores, directory)


def _add_added_tokens(by_id: dict[int, tuple[str, int]], tokenizer: Any) -> None:
    """tokenizer.json's added tokens: special ones CONTROL, the others USER_DEFINED (spaces pre-normalized)."""
    for added in (tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None) or []:
        text = added.get("content", "")
        special = added.get("special") or _looks_special(text)
        by_id[added["id"]] = (text if special else text.replace("\u2581", " "), _CONTROL if special else _USER_DEFINED)


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401  (the gguf package reads tokenizer.model with it)
    except ImportError:
        return False
    return True


def _from_sentencepiece(gguf: Any, path: Path, tokenizer: Any, directory: Path, rows: int) -> Vocabulary:
    try:
        reader = gguf.vocab.SentencePieceVocab(directory)
    except (RuntimeError, ImportError):
        raise MergeError(f"--output_format gguf: reading {path} needs the sentencepiece package (pip install sentencepiece)") from None
    except (ValueError, OSError) as exc:
        raise MergeError(f"--output_format gguf: {path}: {exc}") from None
    by_id, scores = {}, {}
    for token_id, (text, score, kind) in enumerate(reader.all_tokens()):
        by_id[token_id] = (text.decode("utf-8", errors="replace"), int(kind))
        scores[token_id] = float(score)
    _add_added_tokens(by_id, tokenizer)
    tokens, types = _padded(by_id, rows, path)
    return Vocabulary("llama", None, tokens, types, tuple(scores.get(i, 0.0) for i in range(rows)), directory)


def _padded(by_id: dict[int, tuple[str, int]], rows: int, path: Path) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Tokens and types for ids 0 .. rows-1; ``[PAD{id}]`` (UNUSED) where the tokenizer has none."""
    beyond = sorted(i for i in by_id if not isinstance(i, int) or i < 0 or i >= rows)
    if beyond:
        raise MergeError(f"--output_format gguf: {path} has token id {beyond[-1]} but the embedding has {rows} rows; "
                         "every token needs an embedding row")
    pairs = [by_id.get(i, (f"[PAD{i}]", _UNUSED)) for i in range(rows)]
    return tuple(text for text, _ in pairs), tuple(kind for _, kind in pairs)


def _looks_special(text: str) -> bool:
    """Added tokens that act as control tokens though not marked special (as llama.cpp's converter treats them)."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _pre_tokenizer(pre: Any, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (see ``PRE_TOKENIZERS``), else DEFAULT_PRE."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    for step in steps or []:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return GPT2_PRE
        pattern = step.get("pattern") if step.get("type") == "Split" else None
        if isinstance(pattern, dict) and pattern.get("Regex") in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern["Regex"]]
    log.warning("%s: pre-tokenizer not recognized; GGUF tokenizer.ggml.pre is %r (text may split differently in llama.cpp)",
                path, DEFAULT_PRE)
    return DEFAULT_PRE


def add_vocabulary(writer: Any, gguf: Any, vocab: Vocabulary) -> None:
    """The tokenizer keys: model, pre-tokenizer, tokens, types, scores, merges, special tokens, chat template."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.types))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    try:
        special = gguf.SpecialVocab(vocab.directory, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"--output_format gguf: {vocab.directory}: tokenizer files: {exc}") from None
    special.add_to_gguf(writer, quiet=True)
