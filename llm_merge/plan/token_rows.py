"""Each input's rows of a vocabulary tensor on mergekit's output vocabulary (``tokenizer/embed.py``'s rules).

For output token t and input m: m's own row of t when it has the token (unless the token's entry says
``force``); else the token's default row, the same for every input:
  * an entry of ``tokenizer_tokens`` with a source: zero, a model's row of t, or a model's row by id / by its own
    token text (rows of the inputs as stored);
  * otherwise, by the inputs of this tensor that have t: one -> its row; none -> zero; the base among them ->
    the base's row; else the mean of their rows.
Rows past the tokens (``pad_to_multiple_of``) are the mean of the input's rows over the tokens.
Nothing is read here: ``VirtualRows`` say which rows to read (``run.vocab_rows`` builds them).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from llm_merge.errors import ConfigError, MergeError
from llm_merge.plan.token_vocab import OutputVocab

log = logging.getLogger(__name__)

SYNTHESIZED = -1  # VirtualRows.own: a default row (VirtualRows.synthesized)
PADDING = -2  # VirtualRows.own: the mean of the rows over the tokens


@dataclass(frozen=True)
class VirtualRows:
    """One input's rows of a vocabulary tensor, one per output row."""

    key: int  # the input: model index, or the base's key
    own: np.ndarray  # int64 [n_out]: the input's own row, SYNTHESIZED or PADDING
    synthesized: dict  # output row -> ((input key, row), ...) averaged; () is a zero row
    n_tokens: int  # rows [n_tokens, n_out) are PADDING

    def is_identity(self, stored_rows: int) -> bool:
        """Whether these are the input's stored rows, unchanged."""
        return len(self.own) == stored_rows and bool(np.array_equal(self.own, np.arange(stored_rows)))


def padded_rows(n_tokens: int, multiple: Optional[int]) -> int:
    return -(-n_tokens // multiple) * multiple if multiple else n_tokens


def virtual_rows(name: str, vocab: OutputVocab, keys: tuple[int, ...], stored_rows: dict[int, int], base_key: Optional[int],
                 tokens_cfg: dict, key_of: Callable[[str], int], label: Callable[[int], str],
                 pad_to_multiple_of: Optional[int]) -> dict[int, VirtualRows]:
    """key -> VirtualRows of every input ``keys`` of tensor ``name``; MergeError/ConfigError when an entry cannot be met."""
    n_tokens = len(vocab.tokens)
    n_out = padded_rows(n_tokens, pad_to_multiple_of)
    present = np.stack([vocab.permutations[k] >= 0 for k in keys])
    forced = np.zeros(n_tokens, dtype=bool)
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for token, entry in tokens_cfg.items():
        if entry["force"]:
            forced[index[token]] = True
    defaults: dict[int, tuple[tuple[int, int], ...]] = {}
    for j in np.flatnonzero(~present.all(axis=0) | forced):
        token = vocab.tokens[j]
        entry = tokens_cfg.get(token)
        if entry is not None and entry["source"] is not None:
            defaults[int(j)] = _entry_row(name, token, int(j), entry["source"], vocab, keys, stored_rows, key_of, label)
            continue
        if entry is not None and entry["force"]:
            raise ConfigError(f"tokenizer_tokens[{token!r}]: force needs a source")
        have = [k for k, row in zip(keys, present[:, j]) if row]
        if not have:
            log.warning("%s: token %r is in no input; its row is zero", name, token)
        if len(have) > 1 and base_key in have:
            have = [base_key]
        defaults[int(j)] = tuple((k, int(vocab.permutations[k][j])) for k in have)
    out = {}
    for m, k in enumerate(keys):
        own = np.full(n_out, PADDING, dtype=np.int64)
        own[:n_tokens] = np.where(present[m] & ~forced, vocab.permutations[k], SYNTHESIZED)
        synthesized = {j: terms for j, terms in defaults.items() if own[j] == SYNTHESIZED}
        out[k] = VirtualRows(k, own, synthesized, n_tokens)
    return out


def _entry_row(name, token, j, source, vocab: OutputVocab, keys, stored_rows, key_of, label) -> tuple[tuple[int, int], ...]:
    where = f"tokenizer_tokens[{token!r}].source"
    if isinstance(source, dict) and source["kind"] == "zero":
        return ()
    model = source["model"] if isinstance(source, dict) else source
    key = key_of(model)
    if key not in keys:
        raise MergeError(f"{where}: {model} is not an input of tensor {name}, so it has no row to give")
    if isinstance(source, str):
        row = int(vocab.permutations[key][j])
        if row < 0:
            raise MergeError(f"{where}: {label(key)} has no token {token!r}")
    elif "token_id" in source:
        row = source["token_id"]
    else:
        row = vocab.originals[key].get(source["token"], -1)
        if row < 0:
            raise MergeError(f"{where}: {label(key)} has no token {source['token']!r}")
    if row >= stored_rows[key]:
        raise MergeError(f"{where}: row {row} is out of range for {name} of {label(key)} ({stored_rows[key]} rows)")
    return ((key, row),)


def input_key_finder(paths: dict[int, str]) -> Callable[[str], int]:
    """The input key of a model directory (by real path); ConfigError when it is not an input."""
    real = {}
    for key, path in paths.items():
        real.setdefault(os.path.realpath(path), key)

    def key_of(path: str) -> int:
        found = real.get(os.path.realpath(path))
        if found is None:
            raise ConfigError(f"tokenizer_tokens: {path} is not one of the input models (--model_path_list, --base_model_path)")
        return found

    return key_of
