"""Built-in chat templates, by the names mergekit's ``chat_template:`` accepts (chatml, llama3, mistral, alpaca,
exaone).

The Jinja texts here are written for llm_merge (mergekit's own files are LGPL-3.0): each renders the named
prompt format; whitespace may differ from mergekit's files.
"""

from __future__ import annotations

from importlib import resources

#: mergekit's test for a template name rather than a Jinja text: short, one line, no ``{``.
NAME_MAX_CHARS = 256
#: a literal template shorter than this (or without ``{``) is refused, as by mergekit.
LITERAL_MIN_CHARS = 20


def names() -> tuple[str, ...]:
    """The built-in template names."""
    return tuple(sorted(p.name.removesuffix(".jinja") for p in resources.files(__name__).iterdir()
                        if p.name.endswith(".jinja")))


def looks_like_name(value: str) -> bool:
    return len(value) < NAME_MAX_CHARS and "\n" not in value and "{" not in value


def text(name: str) -> str:
    """The Jinja text of a built-in template."""
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")
