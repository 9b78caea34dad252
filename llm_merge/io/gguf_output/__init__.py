"""Merged models written as one GGUF file (llama.cpp's format), tensor by tensor as they are merged.

The merge (or LoRA fold) plans its output as usual; ``layout.plan_gguf`` turns that plan's
shards, the output's ``config.json`` and tokenizer files into the GGUF header and every
tensor's byte offset before any work (``arch``: architectures, names, hyperparameters;
``vocab``: the tokenizer). Workers then write through ``writer.GGUFTensorWriter``, which
converts each merged chunk (Q/K permutation, F32 / F16 / BF16 or a quantized type) and writes
it at its offset; ``publish`` stages, verifies and renames the file into place.

The ``gguf`` package (llama.cpp's Python reader/writer) is an optional extra, imported only
here and only when a GGUF output is asked for.
"""

from __future__ import annotations

from types import ModuleType

from llm_merge.errors import ConfigError

#: ``--gguf_type`` values: plain float types, and the types the ``gguf`` package quantizes itself.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

#: The output file's name inside ``--output_path``: ``{prefix}.gguf``.
GGUF_SUFFIX = ".gguf"


def import_gguf(flag: str = "--output_format gguf") -> ModuleType:
    """The ``gguf`` package, or a one-line ConfigError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"{flag}: needs the gguf package; install it with: pip install 'llm_merge[gguf]'") from None
    return gguf
