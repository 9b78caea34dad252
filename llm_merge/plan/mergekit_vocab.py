"""mergekit's tokenizer merge in the plan: the output tokenizer, and each input's virtual vocabulary tensors.

An input whose rows of a vocabulary tensor are not its stored rows unchanged (a permuted, extended or
padded vocabulary) is read from a scratch file of float32 rows beside the output, which
``run.vocab_rows`` fills before the merge, chunk by chunk; the merge then runs as for any tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from llm_merge.config.names import is_vocab_name
from llm_merge.config.options import MergeConfig
from llm_merge.errors import MergeError
from llm_merge.io import side_files, writer
from llm_merge.io.checkpoint import Checkpoint
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.plan.token_rows import VirtualRows, input_key_finder, padded_rows, virtual_rows
from llm_merge.plan.token_vocab import OutputVocab, build_output_vocab, output_tokenizer_config, read_input_tokens

BASE_KEY = -1  # the base model's input key (as plan.reconcile.BASE)
_F32_BYTES = 4


@dataclass(frozen=True)
class VocabTensor:
    name: str
    n_out: int
    rows: dict  # input key -> VirtualRows


@dataclass(frozen=True)
class MergekitVocab:
    vocab: OutputVocab
    tensors: dict  # name -> VocabTensor
    tokenizer_dir: Path  # the input whose other tokenizer files the output gets
    records: dict  # tokenizer.json (and tokenizer_config.json) of the output


@dataclass(frozen=True)
class RowJob:
    """Fill ``target`` (float32 rows in the scratch file) with ``rows`` of tensor ``name``; ``sources``: input key ->
    that input's stored tensor."""

    name: str
    target: TensorInfo
    rows: VirtualRows
    sources: dict


def plan_mergekit_vocab(cfg: MergeConfig, models: Sequence[Checkpoint], base: Optional[Checkpoint], configs: list[dict],
                        names: Sequence[str]) -> MergekitVocab:
    inputs = {**({BASE_KEY: base} if base is not None else {}), **dict(enumerate(models))}
    config_of = {**({BASE_KEY: configs[-1]} if base is not None else {}), **dict(enumerate(configs[: len(models)]))}
    paths = {k: Path(c.path) for k, c in inputs.items()}
    key_of = input_key_finder({k: str(p) for k, p in paths.items()})
    base_key = BASE_KEY if base is not None else 0
    tokens = {k: read_input_tokens(c.path, config_of[k]) for k, c in inputs.items()}
    present = {k: t for k, t in tokens.items() if t is not None}
    if base_key not in present:
        raise MergeError(f"--tokenizer_source {cfg.tokenizer_source}: {paths[base_key]} (the tokenizer base: the base model, "
                         "else the first model) has no tokenizer.json")
    for k in inputs:  # mergekit: a model without a tokenizer is assumed to share the base's (with its own row count)
        if k not in present:
            present[k] = type(present[base_key])(present[base_key].vocab, None, _rows_of(inputs[k], names, present[base_key].rows))
    source = cfg.tokenizer_source if cfg.tokenizer_source in ("base", "union") else str(key_of(cfg.tokenizer_source))
    tokens_cfg = cfg.tokenizer_tokens or {}
    vocab = build_output_vocab(source, present, paths, base_key, tuple(tokens_cfg))
    preferred = BASE_KEY if base is not None else None
    tensors = {}
    for name in names:
        keys = tuple(k for k in inputs if name in inputs[k].tensors)
        stored = {k: inputs[k].tensors[name].shape[0] for k in keys}
        widths = {inputs[k].tensors[name].shape[1:] for k in keys}
        if len(widths) > 1:
            raise MergeError(f"tensor {name}: row shapes differ between inputs ({sorted(widths)}), so rows cannot be matched by token")
        rows = virtual_rows(name, vocab, keys, stored, preferred, tokens_cfg, key_of, lambda k: str(paths[k]),
                            cfg.pad_to_multiple_of)
        tensors[name] = VocabTensor(name, padded_rows(len(vocab.tokens), cfg.pad_to_multiple_of), rows)
    records = {"tokenizer.json": vocab.tokenizer}
    source_dir = paths[vocab.source]
    config_path = source_dir / "tokenizer_config.json"
    if os.path.lexists(config_path):
        tokenizer_config = side_files.read_json(config_path)
        if isinstance(tokenizer_config, dict):
            records["tokenizer_config.json"] = output_tokenizer_config(tokenizer_config, vocab)
    return MergekitVocab(vocab, tensors, source_dir, records)


def _rows_of(checkpoint: Checkpoint, names: Sequence[str], default: int) -> int:
    return next((checkpoint.tensors[n].shape[0] for n in names if n in checkpoint.tensors), default)


def vocab_names(order) -> list[str]:
    """The tensors with one row per token, by name."""
    return [name for name in order if is_vocab_name(name)]


def scratch_path(output_path: str) -> Path:
    """The scratch file of virtual rows, beside the output (one per process: ranks never share it; one a killed
    run left is removed by the next run: ``io.writer.scratch_file``)."""
    return writer.scratch_file(Path(output_path), "vocab-rows")


def row_jobs(tensors: dict, inputs: dict, scratch: Path) -> tuple[dict, tuple[RowJob, ...]]:
    """({(name, key): scratch TensorInfo}, jobs) for every input whose virtual rows are not its stored rows."""
    offset, infos, jobs = 0, {}, []
    for name, tensor in tensors.items():
        sources = {k: inputs[k].tensors[name] for k in tensor.rows}
        for key, rows in tensor.rows.items():
            stored = sources[key]
            if rows.is_identity(stored.shape[0]):
                continue
            shape = (tensor.n_out, *stored.shape[1:])
            nbytes = math.prod(shape) * _F32_BYTES
            infos[(name, key)] = TensorInfo(scratch, "F32", shape, offset, nbytes)
            jobs.append(RowJob(name, infos[(name, key)], rows, sources))
            offset += nbytes
    return infos, tuple(jobs)
