"""Recipe files: a bounded read of the YAML and a parse that refuses alias bombs and recursive aliases."""

from __future__ import annotations

import os
from typing import Any

from llm_merge.config.files import parse_mapping
from llm_merge.errors import ConfigError
from llm_merge.io import side_files

#: YAML nodes a recipe may hold once its aliases are expanded (a real recipe has a few hundred).
MAX_RECIPE_NODES = 100_000


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a YAML recipe into a dict (bounded read; alias expansion bounded by MAX_RECIPE_NODES)."""
    return read_recipe(path)[1]


def read_recipe(path: str | os.PathLike) -> tuple[str, dict]:
    """A YAML recipe's text and its mapping (one bounded read)."""
    import yaml

    label = f"recipe {path}"
    text = side_files.read_text(path, label, error=ConfigError)
    recipe = parse_mapping(text, parse_yaml, yaml.YAMLError, label, "YAML", "a mapping with merge_method, models, ...")
    return text, recipe


def read_recipe_documents(path: str | os.PathLike) -> tuple[str, list[Any]]:
    """A recipe file's text and its YAML documents (``---``-separated; one bounded read, each document's
    aliases bounded as ``parse_yaml``'s)."""
    import yaml

    label = f"recipe {path}"
    text = side_files.read_text(path, label, error=ConfigError)
    loader = yaml.SafeLoader(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            _expanded_size(node, {}, set())
            documents.append(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(f"{label}: nested too deeply") from None
    finally:
        loader.dispose()
    documents = [d for d in documents if d is not None]
    if not documents:
        raise ConfigError(f"{label}: expected a mapping with merge_method, models, ...")
    return text, documents


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing recursive aliases and documents whose aliases expand past MAX_RECIPE_NODES.

    PyYAML shares an aliased node instead of copying it, so a few hundred bytes of nested aliases
    (a "billion laughs") load quickly but expand exponentially in whatever walks the result.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes under ``node`` with every alias expanded; ConfigError past MAX_RECIPE_NODES or on a cycle."""
    import yaml

    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"recipe: a YAML alias refers to itself (line {node.start_mark.line + 1}); refused")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes) for k, v in node.value)
    open_nodes.discard(key)
    if size > MAX_RECIPE_NODES:
        raise ConfigError(f"recipe: its YAML aliases expand to more than {MAX_RECIPE_NODES} nodes; refused")
    sizes[key] = size
    return size

