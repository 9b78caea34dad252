"""``MODEL+LORA`` merge inputs: the model's checkpoint with the adapter folded in on the fly.

The view holds the model's own tensors, except those the adapter changes: a weight with a LoRA pair
becomes a ``DerivedTensor`` (W + scale * delta, computed row block by row block when read and
rounded to the weight's dtype), a full tensor of the adapter (``modules_to_save``, a trained bias)
replaces the model's, in the model's dtype. The pairing, shape checks and scales are those of
``llm-merge-lora`` (``lora.plan.pair_adapter``), so a merge of the view equals, byte for byte, a
merge of the model folded first by ``llm-merge-lora``; every problem is raised here, before any
work. Nothing is written: no folded model on disk, no tensor held beyond a reader's chunk.
The model's config and tokenizer files are used as they are (an adapter changes weights only).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional

from llm_merge.config.options import MergeConfig
from llm_merge.config.references import parse_reference
from llm_merge.config.slices import check_slices
from llm_merge.errors import MergeError
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.derived import DerivedTensor, LowRankDelta, Stored
from llm_merge.lora.adapter import AdapterTensor
from llm_merge.lora.plan import fitted_adapter

log = logging.getLogger(__name__)


def merge_references(cfg: MergeConfig) -> list[str]:
    """The model references of a merge that are opened as checkpoints: models, base and slice sources."""
    found = [*cfg.model_path_list, *([cfg.base_model_path] if cfg.base_model_path else [])]
    if cfg.slices is not None:
        found += [src.model for s in check_slices(cfg.slices) for src in s.sources]
    return list(dict.fromkeys(found))


def open_references(cfg: MergeConfig, convert: Optional[Callable[[Path, str], Optional[Path]]] = None) -> dict[str, Checkpoint]:
    """The folded view of every ``MODEL+LORA`` reference of ``cfg`` (``merge_references``), by its text."""
    opened = {}
    for text in merge_references(cfg):
        reference = parse_reference(text)
        if reference.lora is not None:
            if not Path(reference.lora).is_dir():
                problem = "not a directory" if Path(reference.lora).exists() else "no such directory"
                raise MergeError(f"model reference {text}: LoRA adapter {reference.lora}: {problem}")
            opened[text] = folded_checkpoint(open_checkpoint(reference.model, cfg.merge_prefix, convert), reference.lora,
                                             cfg.allow_pickle)
    return opened


def folded_checkpoint(model: Checkpoint, lora: str, allow_pickle: bool = False) -> Checkpoint:
    """``model`` with the adapter at ``lora`` folded in (the module docstring); MergeError when it does not fit."""
    adapter, folds, replacements = fitted_adapter(lora, model, allow_pickle)
    tensors = {}
    for name, info in model.tensors.items():
        pair, whole = folds.get(name), replacements.get(name)
        if pair is not None:
            delta = LowRankDelta(_stored(pair.left), _stored(pair.right), pair.scale, pair.transpose, f"{adapter.path}: {pair.module}")
            tensors[name] = DerivedTensor.of(info, info.dtype, delta)
        elif whole is not None and whole.info is not None and whole.dtype == info.dtype:
            tensors[name] = whole.info  # read from the adapter's file as it is
        elif whole is not None:
            tensors[name] = DerivedTensor.of(_stored(whole), info.dtype, file=adapter.weights_file)
        else:
            tensors[name] = info
    log.info("%s+%s: %d LoRA pair(s) folded on the fly (%s, r=%d, lora_alpha=%g%s), %d tensor(s) replaced",
             model.path, adapter.path, len(folds), adapter.format, adapter.r, adapter.lora_alpha,
             ", rslora" if adapter.rslora else "", len(replacements))
    return dataclasses.replace(model, tensors=tensors)


def _stored(tensor: AdapterTensor) -> Stored:
    return tensor.info if tensor.info is not None else tensor.array
