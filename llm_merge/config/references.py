"""Model references: ``MODEL`` or ``MODEL+LORA`` (mergekit's syntax), the model at MODEL with the LoRA
adapter at LORA folded into its weights (``llm_merge.lora.reference`` opens it).

Where a '+' splits: a reference that names an existing path is a model, '+' and all (a directory
``run+2``). Otherwise it is split at its '+' — mergekit's rule, which allows exactly one — or, when
it has several, at the one whose left side is an existing path (``run+2+adapter`` with a directory
``run+2``); none or several such '+' is an error: rename or link the directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from llm_merge.errors import ConfigError

SEPARATOR = "+"


@dataclass(frozen=True)
class ModelReference:
    """A model directory and, optionally, a LoRA adapter directory folded into it."""

    model: str
    lora: Optional[str] = None

    @property
    def paths(self) -> list[str]:
        """Every directory the reference reads."""
        return [self.model] + ([self.lora] if self.lora else [])

    def __str__(self) -> str:
        return f"{self.model}{SEPARATOR}{self.lora}" if self.lora else self.model


def parse_reference(text: str, where: str = "model", exists: Callable[[str], bool] = os.path.lexists) -> ModelReference:
    """``text`` as a model reference (the module docstring's rule); ``exists`` tells whether a path exists
    (relative paths: as the caller reads them). ConfigError naming ``where`` when it cannot be split."""
    if SEPARATOR not in text or exists(text):
        return ModelReference(text)
    cuts = [i for i, char in enumerate(text) if char == SEPARATOR]
    if len(cuts) > 1:
        fitting = [i for i in cuts if exists(text[:i])]
        if len(fitting) != 1:
            sides = " or ".join(repr(text[:i]) for i in fitting) if fitting else "none exists"
            raise ConfigError(f"{where}: {text!r}: cannot tell which '+' separates MODEL from LORA (the left side of "
                              f"exactly one '+' must be an existing directory; {sides}); rename or link the directory")
        cuts = fitting
    model, lora = text[: cuts[0]], text[cuts[0] + 1 :]
    if not model or not lora:
        raise ConfigError(f"{where}: {text!r}: expected MODEL+LORA (a model directory, '+', a LoRA adapter directory)")
    return ModelReference(model, lora)


def map_paths(text: str, fn: Callable[[str], str], where: str = "model", exists: Callable[[str], bool] = os.path.lexists) -> str:
    """The reference ``text`` with ``fn`` applied to each of its paths (MODEL, and LORA when there is one)."""
    return str(ModelReference(*(fn(path) for path in parse_reference(text, where, exists).paths)))


def reference_paths(text: str) -> list[str]:
    """Every directory a model reference reads (model, and adapter when there is one)."""
    return parse_reference(text).paths
