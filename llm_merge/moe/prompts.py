"""Prompts to token ids with the base's tokenizer (``tokenizer.json`` through the ``tokenizers`` package).

As mergekit-moe tokenizes them: the tokenizer's BOS token text (``bos_token`` of tokenizer_config.json or
special_tokens_map.json; none when it has none) before each prompt, then no other special tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import side_files


def import_tokenizers(need: str):
    """The ``tokenizers`` package, or ConfigError naming the extra that installs it."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"{need} needs the tokenizers package: pip install 'llm_merge[tokenizers]' (or 'llm_merge[moe]')") from None
    return tokenizers


class PromptTokenizer:
    """The base model's tokenizer, as mergekit-moe applies it to prompts."""

    def __init__(self, directory: Path, need: str) -> None:
        path = Path(directory) / "tokenizer.json"
        if not os.path.lexists(path):
            raise ConfigError(f"{need}: the base model {directory} has no tokenizer.json to turn the prompts into tokens")
        tokenizers = import_tokenizers(need)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(side_files.read_text(path))
        except MergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise MergeError(f"{path}: cannot load the tokenizer ({exc})") from None
        self.bos = _bos_token(Path(directory)) or ""

    def ids(self, prompt: str) -> list[int]:
        """Token ids of the BOS text followed by ``prompt``."""
        return list(self._tokenizer.encode(self.bos + prompt, add_special_tokens=False).ids)

    def encode_all(self, prompts: Sequence[str], where: str, vocab_rows: int) -> list[list[int]]:
        """Token ids of every prompt; ConfigError for a prompt with no tokens or a token beyond the embedding."""
        encoded = []
        for index, prompt in enumerate(prompts):
            ids = self.ids(prompt)
            if not ids:
                raise ConfigError(f"recipe: {where}[{index}]: {prompt!r} has no tokens")
            if max(ids) >= vocab_rows:
                raise MergeError(f"recipe: {where}[{index}]: token id {max(ids)} is beyond the base's {vocab_rows} embedding rows")
            encoded.append(ids)
        return encoded


def _bos_token(directory: Path) -> Optional[str]:
    """The BOS token text from tokenizer_config.json, else special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not os.path.lexists(path):
            continue
        config = side_files.read_json(path)
        token = config.get("bos_token") if isinstance(config, dict) else None
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return token
        if isinstance(config, dict) and "bos_token" in config:
            return None
    return None
