"""From checkpoint headers to a checked, laid-out MergePlan: no tensor data is read here."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Mapping, Optional

from llm_merge import methods
from llm_merge.config.names import embed_name, layer_index
from llm_merge.config.options import MergeConfig
from llm_merge.config.slices import num_layers as slice_layers
from llm_merge.config.validate import parse_size
from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.plan.gradients import layer_t, num_layers_of, tensor_params
from llm_merge.plan.layout import MergePlan, OutputSlot, TensorTask, layout_shards
from llm_merge.plan import mergekit_vocab
from llm_merge.plan.chat_template import chosen_template, template_records
from llm_merge.plan.reconcile import BASE, read_model_config, reconcile, slice_rows
from llm_merge.plan.slices import position_finder, slice_checkpoints

def build_plan(cfg: MergeConfig, convert: Optional[Callable[[Path, str], Optional[Path]]] = None,
               opened: Optional[Mapping[str, Checkpoint]] = None) -> MergePlan:
    """Open every checkpoint, check that they agree, and lay out the output shards.

    ``convert``: see ``open_checkpoint`` (pdparams inputs, ``llm_merge.io.pdparams.InputConverter``).
    ``opened``: checkpoints already opened, by the reference the config names (``MODEL+LORA`` inputs,
    ``llm_merge.lora.reference.open_references``); every other reference is a directory opened here.
    """
    opened = opened or {}
    if cfg.slices:  # layer ranges: virtual checkpoints stacking the slices' sources (``plan.slices``)
        models, base = slice_checkpoints(cfg.slices, cfg.base_model_path, cfg.merge_prefix, cfg.layer_pattern, convert, opened)
    else:
        def open_model(path: str) -> Checkpoint:
            return opened[path] if path in opened else open_checkpoint(path, cfg.merge_prefix, convert)

        models = tuple(open_model(path) for path in cfg.model_path_list)
        base = open_model(cfg.base_model_path) if cfg.base_model_path else None
    found = reconcile(cfg, models, base)
    models, base = found.models, found.base
    outputs = {t.name: TensorInfo(models[0].path, t.dtype, t.shape, 0, 0) for t in found.tensors}
    reference = dataclasses.replace(models[0], tensors=outputs)
    out_dtypes = {t.name: t.dtype for t in found.tensors}
    shards, slots = layout_shards(reference, out_dtypes, parse_size(cfg.max_shard_size), cfg.merge_prefix)
    weights = cfg.weights
    tasks = []
    resolved: dict[str, dict] = {}
    params_of = _tensor_parameters(cfg, found, models)
    virtual, row_jobs = {}, ()
    if found.mergekit_vocab is not None:
        inputs = {**({BASE: base} if base is not None else {}), **dict(enumerate(models))}
        virtual, row_jobs = mergekit_vocab.row_jobs(found.mergekit_vocab.tensors, inputs, mergekit_vocab.scratch_path(cfg.output_path))
    for tensor in found.tensors:
        params = params_of(tensor.name) if params_of and tensor.mergeable else None
        if params:
            resolved[tensor.name] = params
        for piece in tensor.pieces:
            task = _piece_task(tensor, piece, models, base, slots[tensor.name], cfg, weights, virtual)
            tasks.append(dataclasses.replace(task, params=params) if params else task)
    tasks = tuple(tasks)
    if resolved:  # the record names every varying option's value for every merged tensor
        varying = sorted({option for values in resolved.values() for option in values})
        config_values = {option: _config_value(cfg, option) for option in varying}
        resolved = {t.name: {**config_values, **resolved.get(t.name, {})} for t in found.tensors if t.mergeable}
    config_json = found.config_json
    if cfg.slices:
        config_json = {**(config_json or read_model_config(models[0].path)), "num_hidden_layers": slice_layers(cfg.slices)}
    config_json = _with_output_dtype(config_json, models[0].path, out_dtypes)
    tokenizer_records = _tokenizer_records(cfg, found, models, base)
    return MergePlan(tasks=tasks, shards=shards, models=models, base=base, config_json=config_json,
                     tokenizer_from=found.tokenizer_from, tensor_parameters=resolved or None,
                     tokenizer_records=tokenizer_records or None, row_jobs=row_jobs)


def _tokenizer_records(cfg: MergeConfig, found, models, base) -> dict:
    """The output's rebuilt tokenizer files (mergekit's tokenizer merge) and chat template (--chat_template)."""
    records = dict(found.mergekit_vocab.records) if found.mergekit_vocab is not None else {}
    inputs = [*([base.path] if base is not None else []), *(m.path for m in models)]
    template = chosen_template(getattr(cfg, "chat_template", None), list(dict.fromkeys(inputs)))
    if template is not None:
        records.update(template_records(template, found.tokenizer_from or models[0].path, records))
    return records


def _config_value(cfg: MergeConfig, option: str):
    """The config's value of a per-tensor option (a per-model list: one value per model)."""
    if option == "weight_list":
        return cfg.weights
    value = getattr(cfg, option)
    if option.endswith("_list") and value is None:
        return [getattr(cfg, option.removesuffix("_list"))] * len(cfg.model_path_list)
    return value


_CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _with_output_dtype(config_json: Optional[dict], source: Path, out_dtypes: dict[str, str]) -> Optional[dict]:
    """config.json with ``torch_dtype`` / ``dtype`` naming the output's float dtype, when the source's says otherwise."""
    floats = {_CONFIG_DTYPES[d] for d in out_dtypes.values() if d in _CONFIG_DTYPES}
    config = config_json if config_json is not None else read_model_config(source)
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(config.get(k), str)]
    if len(floats) != 1 or not keys or all(config[k] == next(iter(floats)) for k in keys):
        return config_json
    return {**config, **{k: next(iter(floats)) for k in keys}}


def _tensor_parameters(cfg: MergeConfig, found, models) -> Optional[Callable[[str], Optional[dict]]]:
    """Per-tensor option values (gradients, filters, slice parameters) as a function of the tensor name, or None."""
    if cfg.slices:
        embed = embed_name(t.name for t in found.tensors)
        find = position_finder(cfg.slices, cfg.base_model_path)

        def by_slice(name: str) -> Optional[dict]:
            where = find(layer_index(name, cfg.layer_pattern), name == embed)
            return tensor_params(cfg, name, where.t, where.shared, where.per_model)

        return by_slice
    if not cfg.tensor_parameters:
        return None
    num_layers = num_layers_of([t.name for t in found.tensors], read_model_config(models[0].path), cfg.layer_pattern)
    return lambda name: tensor_params(cfg, name, layer_t(name, num_layers, cfg.layer_pattern))


def _piece_task(tensor, piece, models, base, slot: OutputSlot, cfg: MergeConfig, weights: list[float],
                virtual: Optional[dict] = None) -> TensorTask:
    """The task of one piece of an output tensor (see ``plan.reconcile.Piece``); ``virtual``: {(name, input key):
    TensorInfo} of inputs read from the scratch file of virtual vocabulary rows."""
    virtual = virtual or {}
    def info(checkpoint: Checkpoint) -> TensorInfo:
        whole = checkpoint.tensors[tensor.name]
        return whole if piece.rows is None else slice_rows(whole, *piece.rows)

    name, start = tensor.name, slot.start
    if piece.rows is not None:
        a, b = piece.rows
        name = f"{tensor.name}[{a}:{b}]"
        start += a * math.prod(tensor.shape[1:]) * dtypes.itemsize(slot.dtype)
    out = OutputSlot(slot.file, start, slot.dtype)
    if piece.copy is not None:
        source = info(base if piece.copy == BASE else models[piece.copy])
        return TensorTask(name, source.shape, (source,), None, out, False, () if piece.copy == BASE else (piece.copy,))
    indices = range(len(models)) if piece.models is None else piece.models
    inputs = tuple(virtual.get((tensor.name, i)) or info(models[i]) for i in indices)
    if tensor.mergeable and piece.models is not None and methods.get("merge", cfg.merge_type).divides_by_weight_sum and cfg.normalize:
        if sum(weights[i] for i in piece.models) == 0:
            raise MergeError(f"tensor {name}: the weights of the models that have it ({[weights[i] for i in piece.models]}) sum to 0")
    base_info = (virtual.get((tensor.name, BASE)) or info(base)) if piece.base else None
    return TensorTask(name, inputs[0].shape, inputs, base_info, out, tensor.mergeable, piece.models)

