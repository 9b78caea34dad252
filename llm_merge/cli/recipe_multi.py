"""Running a multi-document recipe (mergekit-multi): every document translated and checked, then built in
dependency order, named ones into ``--intermediate_dir/NAME``, the final one into the output directory.

An intermediate records in its merge_config.json (``recipe_hash``) a hash of its document, the result-changing
options and its inputs (an intermediate input by its own hash, any other by its files' names, sizes and
modification times); a later run reuses an intermediate whose hash is the same and rebuilds one whose hash
differs. A directory in the intermediate place that is no intermediate (no merge_config.json with a hash)
is an error before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from llm_merge.config.references import parse_reference
from llm_merge.config.recipe_documents import (
    RecipeDocument, build_order, check_references, document_name, final_document, model_references, split_documents,
    with_outputs,
)
from llm_merge.config.recipes import recipe_to_config
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError
from llm_merge.io import side_files

log = logging.getLogger(__name__)

#: command-line options that never change a merge's result (left out of the hash)
_NEUTRAL_OPTIONS = {"n_process", "overwrite", "quiet", "dry_run", "force", "model_card", "recipe_text"}


def run_documents(documents: list[Any], recipe_path: str, output_path: str, intermediate_dir: Optional[str],
                  options: dict[str, Any]) -> None:
    """Check every document, then build them in order (reusing up-to-date intermediates)."""
    import yaml

    docs = split_documents(documents)
    order = build_order(docs)
    final = final_document(docs)
    base_dir = Path(recipe_path).resolve().parent
    names = {d.name for d in docs if d.name is not None}
    for doc in docs:
        check_references(doc, names, base_dir)
    if len(docs) > 1 and not intermediate_dir:
        raise ConfigError("recipe: a multi-document recipe needs --intermediate_dir (where its named documents are built)")
    places = {d.name: str(Path(intermediate_dir).resolve() / d.name) for d in docs if d.name is not None and d is not final}
    if final.name is not None:
        places[final.name] = output_path
    hashes: dict[str, str] = {}
    plans = []
    for doc in order:
        recipe = with_outputs(doc.recipe, places)
        digest = _document_hash(recipe, doc, hashes, base_dir, options)
        if doc.name is not None:
            hashes[doc.name] = digest
        out = output_path if doc is final else places[doc.name]
        reuse = doc is not final and _recorded_hash(out, doc) == digest
        text = yaml.safe_dump({"name": doc.name, **doc.recipe} if doc.name else doc.recipe, sort_keys=False)
        own = {**options, "recipe_text": text, "recipe_hash": digest}
        if doc is not final:
            own["overwrite"] = True  # a stale intermediate of this recipe (checked by _recorded_hash) is rebuilt
        cfg = recipe_to_config(recipe, out, base_dir=base_dir, **own)  # every document translates before any work
        resolved = not doc.uses and not reuse
        if resolved:
            cfg = resolve(cfg)  # its inputs exist: checked in full before any work
        plans.append((doc, cfg, reuse, resolved))
    if options.get("dry_run"):
        for doc, cfg, reuse, _ in plans:
            print(f"{doc.label}: {'reuse' if reuse else 'build'} {cfg.output_path}")
        return
    from llm_merge.api import merge  # after validation: keeps refusals fast

    for doc, cfg, reuse, resolved in plans:
        if reuse:
            log.info("recipe: %s is up to date in %s; reused", doc.label, cfg.output_path)
            continue
        log.info("recipe: building %s into %s", doc.label, cfg.output_path)
        merge(cfg if resolved else resolve(cfg))


def _recorded_hash(path: str, doc: RecipeDocument) -> Optional[str]:
    """The recipe_hash an existing intermediate records; None when there is none; ConfigError for a foreign directory."""
    if not os.path.lexists(path):
        return None
    record = os.path.join(path, "merge_config.json")
    recorded = side_files.read_json(record, f"{doc.label}: {record}", error=ConfigError) if os.path.isfile(record) else None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("recipe_hash"), str):
        raise ConfigError(f"recipe: {doc.label}: {path} exists and is no intermediate of a recipe "
                          "(no merge_config.json with a recipe_hash); remove it or choose another --intermediate_dir")
    return recorded["recipe_hash"]


def _document_hash(recipe: dict, doc: RecipeDocument, hashes: dict[str, str], base_dir: Path,
                   options: dict[str, Any]) -> str:
    """sha256 of the document, the result-changing options and the identity of its inputs."""
    inputs = {}
    beside = lambda path: path if os.path.isabs(path) else str(base_dir / path)  # noqa: E731
    for where, ref in sorted(model_references(doc.recipe).items()):
        name = document_name(ref, hashes)
        if name is not None:
            lora = ref[len(name) + 1:]
            inputs[where] = {"document": name, "hash": hashes[name], **({"lora": _fingerprint(beside(lora))} if lora else {})}
        elif where != "tokenizer_source" or ref not in ("base", "union"):
            reference = parse_reference(ref, f"recipe: {doc.label}: {where}", lambda path: os.path.lexists(beside(path)))
            inputs[where] = _fingerprint(beside(reference.model)) if reference.lora is None else \
                {"model": _fingerprint(beside(reference.model)), "lora": _fingerprint(beside(reference.lora))}
    payload = {"document": recipe, "name": doc.name, "inputs": inputs,
               "options": {k: v for k, v in sorted(options.items()) if k not in _NEUTRAL_OPTIONS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(path: str) -> list:
    """Names, sizes and modification times of a model directory's files (a file: its own)."""
    try:
        if os.path.isdir(path):
            entries = sorted(os.scandir(path), key=lambda e: e.name)
            return [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in entries if e.is_file()]
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    except OSError:
        return []
