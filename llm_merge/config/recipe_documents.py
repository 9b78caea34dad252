"""Multi-document recipes (mergekit-multi): YAML documents separated by ``---``, each a recipe with a ``name``.

A later document refers to an earlier one's output by its name wherever a model goes (``base_model``,
``models``, slice ``sources``, ``tokenizer_source``, the ``tokenizer:`` section), also with a LoRA adapter
folded into it (``NAME+LORA``). Named documents are built into
``--intermediate_dir/NAME``; the final output is the unnamed document (at most one), else the last one,
which no other document may use. Everything here is checked before any work: duplicate or malformed
names, a reference that is neither a document name nor an existing path, and cycles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from llm_merge.errors import ConfigError


@dataclass(frozen=True)
class RecipeDocument:
    """One document of a recipe file: its name (None: the unnamed final one), the recipe, the names it uses."""

    index: int
    name: Optional[str]
    recipe: dict
    uses: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"document {self.index + 1}" + (f" ({self.name})" if self.name else "")


def split_documents(documents: list[Any]) -> list[RecipeDocument]:
    """The documents with their names popped and their references to other documents found (not yet replaced)."""
    named: dict[str, int] = {}
    unnamed = []
    recipes = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise ConfigError(f"recipe: document {i + 1}: expected a mapping with merge_method, models, ...")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is None:
            unnamed.append(i)
        elif not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"recipe: document {i + 1}: name {name!r} must be a non-empty string without / or \\")
        elif name in named:
            raise ConfigError(f"recipe: document {i + 1}: name {name} is already the name of document {named[name] + 1}")
        else:
            named[name] = i
        recipes.append((name, doc))
    if len(unnamed) > 1:
        raise ConfigError(f"recipe: documents {', '.join(str(i + 1) for i in unnamed)} have no name; "
                          "only the final one may omit it")
    return [RecipeDocument(i, name, doc, tuple(sorted({document_name(ref, named) for ref in model_references(doc).values()}
                                                        - {None})))
            for i, (name, doc) in enumerate(recipes)]


def document_name(ref: str, names) -> Optional[str]:
    """The document a model reference names: ``NAME`` or ``NAME+LORA`` (an adapter folded into its output), else None."""
    if ref in names:
        return ref
    head, plus, _ = ref.partition("+")
    return head if plus and head in names else None


def final_document(docs: list[RecipeDocument]) -> RecipeDocument:
    """The unnamed document, else the last; ConfigError when another document uses it."""
    unnamed = [d for d in docs if d.name is None]
    final = unnamed[0] if unnamed else docs[-1]
    users = [d.label for d in docs if final.name is not None and final.name in d.uses]
    if users:
        raise ConfigError(f"recipe: the final {final.label} is used by {', '.join(users)}; "
                          "the final output is the unnamed document, else the last one, which no document may use")
    return final


def build_order(docs: list[RecipeDocument]) -> list[RecipeDocument]:
    """The documents in dependency order (file order among independent ones); ConfigError on a cycle."""
    by_name = {d.name: d for d in docs if d.name is not None}
    state: dict[int, str] = {}
    order: list[RecipeDocument] = []

    def visit(doc: RecipeDocument, path: list[str]) -> None:
        if state.get(doc.index) == "done":
            return
        if state.get(doc.index) == "open":
            cycle = path[path.index(doc.name):] + [doc.name]
            raise ConfigError(f"recipe: documents refer to each other in a cycle: {' -> '.join(cycle)}")
        state[doc.index] = "open"
        for name in doc.uses:
            visit(by_name[name], path + [doc.name or "(final)"])
        state[doc.index] = "done"
        order.append(doc)

    for doc in docs:
        visit(doc, [])
    return order


def check_references(doc: RecipeDocument, names: set[str], base_dir: Path) -> None:
    """Every model reference of ``doc`` is a document name or an existing path (read beside the recipe)."""
    for where, ref in model_references(doc.recipe).items():
        if document_name(ref, names) or ref in ("base", "union") and where == "tokenizer_source":
            continue
        path = ref if os.path.isabs(ref) else base_dir / ref
        if not os.path.lexists(path) and "+" not in ref:
            valid = ", ".join(sorted(names)) or "none"
            raise ConfigError(f"recipe: {doc.label}: {where} {ref!r} is neither a document name (valid: {valid}) "
                              f"nor an existing path ({path})")


def with_outputs(recipe: dict, outputs: dict[str, str]) -> dict:
    """``recipe`` with every reference to a document name (``NAME`` or ``NAME+LORA``) replaced by that document's
    output path (and ``+LORA``)."""
    def output_of(where: str, ref: str) -> str:
        name = document_name(ref, outputs)
        return ref if name is None else outputs[name] + ref[len(name):]

    return _map_references(recipe, output_of)


def model_references(recipe: dict) -> dict[str, str]:
    """{where: model reference} of every place a recipe names a model."""
    found: dict[str, str] = {}

    def note(where: str, ref: str) -> str:
        found[where] = ref
        return ref

    _map_references(recipe, note)
    return found


def _map_references(recipe: dict, fn: Callable) -> dict:
    """A copy of ``recipe`` with ``fn(where, reference)`` in place of each string model reference."""
    def apply(where: str, ref: Any) -> Any:
        return fn(where, ref) if isinstance(ref, str) else ref

    out = dict(recipe)
    if "base_model" in out:
        out["base_model"] = apply("base_model", out["base_model"])
    if "tokenizer_source" in out:
        out["tokenizer_source"] = apply("tokenizer_source", out["tokenizer_source"])
    if isinstance(out.get("tokenizer"), dict):
        out["tokenizer"] = _map_tokenizer(out["tokenizer"], apply)
    if isinstance(out.get("models"), list):
        out["models"] = [_map_entry(f"models[{i}]", e, apply) for i, e in enumerate(out["models"])]
    if isinstance(out.get("slices"), list):
        out["slices"] = [
            {**s, "sources": [_map_entry(f"slices[{i}].sources[{j}]", src, apply) for j, src in enumerate(s["sources"])]}
            if isinstance(s, dict) and isinstance(s.get("sources"), list) else s
            for i, s in enumerate(out["slices"])
        ]
    return out


def _map_tokenizer(section: dict, apply: Callable[[str, Any], Any]) -> dict:
    """The ``tokenizer:`` section's model references: its source (named as tokenizer_source: base and union are
    no models) and each token entry's source model."""
    out = dict(section)
    if "source" in out:
        out["source"] = apply("tokenizer_source", out["source"])
    if isinstance(out.get("tokens"), dict):
        tokens = {}
        for token, entry in out["tokens"].items():
            source = entry.get("source") if isinstance(entry, dict) else None
            where = f"tokenizer.tokens[{token!r}].source"
            if isinstance(source, dict) and "model" in source:
                entry = {**entry, "source": {**source, "model": apply(where, source["model"])}}
            elif isinstance(source, str):
                entry = {**entry, "source": apply(where, source)}
            tokens[token] = entry
        out["tokens"] = tokens
    return out


def _map_entry(where: str, entry: Any, apply: Callable[[str, Any], Any]) -> Any:
    if isinstance(entry, str):
        return apply(where, entry)
    if isinstance(entry, dict) and "model" in entry:
        return {**entry, "model": apply(where, entry["model"])}
    return entry
