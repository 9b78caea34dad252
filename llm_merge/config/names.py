"""Tensor-name conventions: layer numbers, tied embeddings, vocabulary-sized tensors."""

from __future__ import annotations

import functools
import re
from typing import Optional

from llm_merge.errors import ConfigError

#: One group: the layer number (Llama / Mistral / Qwen, GPT-2, multimodal wrappers, GPT-NeoX).
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:model\.layers|transformer\.h|model\.language_model\.layers|gpt_neox\.layers)\.(\d+)\."

#: The output head that ``tie_word_embeddings: true`` models leave out.
HEAD_NAME = "lm_head.weight"

#: Input embeddings whose rows a tied model uses as its output head (first present wins).
_EMBED_PATTERN = re.compile(r"(?:^|\.)embed_tokens\.weight$|^(?:transformer\.wte|gpt_neox\.embed_in|tok_embeddings|word_embeddings)\.weight$")

#: Tensors with one row per token (besides any tensor whose first dimension is config.json's vocab_size).
_VOCAB_PATTERN = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|embed_in|embed_out|word_embeddings|tok_embeddings)\.weight$|^(?:lm_head|output)\.weight$"
)


@functools.lru_cache(maxsize=16)
def compile_layer_pattern(pattern: str) -> re.Pattern:
    """Compile ``--layer_pattern``: a regex with exactly one group, the layer number."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--layer_pattern: {pattern!r} is not a valid regular expression ({exc})") from None
    if compiled.groups != 1:
        raise ConfigError(f"--layer_pattern: {pattern!r} has {compiled.groups} groups; it needs exactly one (the layer number)")
    return compiled


def layer_index(name: str, pattern: Optional[str] = None) -> Optional[int]:
    """The layer number in a tensor name (``model.layers.12.mlp...`` -> 12), or None outside the layers."""
    match = compile_layer_pattern(pattern or DEFAULT_LAYER_PATTERN).search(name)
    if match is None:
        return None
    try:
        return int(match.group(1))
    except (TypeError, ValueError):
        raise ConfigError(f"--layer_pattern: group matched {match.group(1)!r} in {name!r}, not a layer number") from None


def embed_name(names) -> Optional[str]:
    """The input-embedding tensor among ``names`` (first in order), or None."""
    return next((name for name in names if _EMBED_PATTERN.search(name)), None)


def is_vocab_name(name: str) -> bool:
    """Whether ``name`` is an embedding or output head (one row per token) by its name alone."""
    return _VOCAB_PATTERN.search(name) is not None
