"""Tokenizer files for GGUF tests: a byte-level BPE ``tokenizer.json`` written by hand (no tokenizers package)."""

from __future__ import annotations

import json
from pathlib import Path

#: Merges of the test tokenizer (byte-level symbols: "Ġ" is a space).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s"),
          ("r", "e"), ("a", "t"), ("Ġ", "w"), ("o", "r"), ("e", "n"), ("Ġ", "c"), ("i", "s"), ("Ġ", "o")]


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_bpe_tokenizer(directory: Path, added: list[tuple[int, str, bool]] = (), chat_template: str | None = None) -> dict:
    """tokenizer.json (+ tokenizer_config.json) of a byte-level BPE: 256 bytes, then MERGES' results, then ``added``
    (id, content, special). Returns the vocabulary (token -> id)."""
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for left, right in MERGES:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": not special, "special": special} for i, text, special in added],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[left, right] for left, right in MERGES]},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              **({"bos_token": added[0][1], "eos_token": added[1][1]} if len(added) > 1 else {})}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return {**vocab, **{text: i for i, text, _ in added}}
