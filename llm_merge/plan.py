"""From checkpoint headers to a checked, laid-out plan: no tensor data is read here."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llm_merge.config import MergeConfig, parse_size
from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.safetensors_format import TensorInfo, encode_header

log = logging.getLogger(__name__)
_SHOW = 5  # mismatches listed per message


@dataclass(frozen=True)
class OutputSlot:
    """Where a merged tensor goes: shard file name, absolute byte offset, dtype string."""

    file: str
    start: int
    dtype: str


@dataclass(frozen=True)
class TensorTask:
    """One output tensor (or a row range of one): its inputs (one per model, and the base) and its output slot.

    ``models``: the index in --model_path_list of each input (its draw key and weight), when
    not every model takes part in order (missing tensors, vocabulary rows); None: all models.
    A task that is not ``mergeable`` copies ``inputs[0]`` (converting a float to the output dtype).
    """

    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    base: Optional[TensorInfo]
    out: OutputSlot
    mergeable: bool
    models: Optional[tuple[int, ...]] = None
    #: per-tensor option values (``tensor_parameters``: gradients, filters) that override the config's
    params: Optional[dict] = dataclasses.field(default=None, compare=False)

    @property
    def numel(self) -> int:
        return self.inputs[0].numel

    @property
    def out_bytes(self) -> int:
        return self.numel * dtypes.itemsize(self.out.dtype)

    @property
    def in_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs) + (self.base.nbytes if self.base else 0)


@dataclass(frozen=True)
class Shard:
    """One output file: its name, encoded header and total size in bytes."""

    file: str
    header: bytes
    size: int
    names: tuple[str, ...]


class ShardedOutput:
    """For plans with ``tasks`` (each with ``out_bytes``) and output ``shards``: index values."""

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in the output (the index's total_size)."""
        return sum(t.out_bytes for t in self.tasks)

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: shard.file for shard in self.shards for name in shard.names}


@dataclass(frozen=True)
class MergePlan(ShardedOutput):
    """Every output tensor task and the output files' layout."""

    tasks: tuple[TensorTask, ...]
    shards: tuple[Shard, ...]
    models: tuple[Checkpoint, ...]
    base: Optional[Checkpoint]
    #: the output config.json when it must differ from the first model's (tied head, vocabulary size)
    config_json: Optional[dict] = None
    #: directory whose tokenizer files the output gets (--tokenizer_source), when not the first model
    tokenizer_from: Optional[Path] = None
    #: resolved per-tensor option values {tensor: {option: value}} (``tensor_parameters``), recorded in merge_config.json
    tensor_parameters: Optional[dict] = None

    def card_records(self, cfg: MergeConfig) -> dict:
        """{"README.md": model card} with --model_card, else {}."""
        if not cfg.model_card:
            return {}
        from llm_merge.recipes import model_card

        return {"README.md": model_card(cfg, cfg.recipe_text)}

    def merge_record(self, cfg: MergeConfig) -> dict:
        """merge_config.json: the options, and the resolved per-tensor values when any."""
        record = dataclasses.asdict(cfg)
        if self.tensor_parameters:
            record["resolved_tensor_parameters"] = self.tensor_parameters
        return record

    @property
    def records(self) -> dict[str, object]:
        """JSON files written over the copied model files."""
        return {"config.json": self.config_json} if self.config_json is not None else {}



def build_plan(cfg: MergeConfig, convert: Optional[Callable[[Path, str], Optional[Path]]] = None) -> MergePlan:
    """Open every checkpoint, check that they agree, and lay out the output shards.

    ``convert``: see ``open_checkpoint`` (pdparams inputs, ``llm_merge.io.pdparams.InputConverter``).
    """
    from llm_merge.reconcile import reconcile  # it imports check_same_names from here

    if cfg.slices:  # layer ranges: virtual checkpoints stacking the slices' sources (llm_merge/slices.py)
        from llm_merge.slices import slice_checkpoints

        models, base = slice_checkpoints(cfg.slices, cfg.base_model_path, cfg.merge_prefix, cfg.layer_pattern, convert)
    else:
        models = tuple(open_checkpoint(path, cfg.merge_prefix, convert) for path in cfg.model_path_list)
        base = open_checkpoint(cfg.base_model_path, cfg.merge_prefix, convert) if cfg.base_model_path else None
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
    for tensor in found.tensors:
        params = params_of(tensor.name) if params_of and tensor.mergeable else None
        if params:
            resolved[tensor.name] = params
        for piece in tensor.pieces:
            task = _piece_task(tensor, piece, models, base, slots[tensor.name], cfg, weights)
            tasks.append(dataclasses.replace(task, params=params) if params else task)
    tasks = tuple(tasks)
    if resolved:  # the record names every varying option's value for every merged tensor
        varying = sorted({option for values in resolved.values() for option in values})
        config_values = {option: _config_value(cfg, option) for option in varying}
        resolved = {t.name: {**config_values, **resolved.get(t.name, {})} for t in found.tensors if t.mergeable}
    config_json = found.config_json
    if cfg.slices:
        from llm_merge.reconcile import read_model_config
        from llm_merge.slices import num_layers as slice_layers

        config_json = {**(config_json or read_model_config(models[0].path)), "num_hidden_layers": slice_layers(cfg.slices)}
    config_json = _with_output_dtype(config_json, models[0].path, out_dtypes)
    return MergePlan(tasks=tasks, shards=shards, models=models, base=base, config_json=config_json,
                     tokenizer_from=found.tokenizer_from, tensor_parameters=resolved or None)


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
    from llm_merge.reconcile import read_model_config

    floats = {_CONFIG_DTYPES[d] for d in out_dtypes.values() if d in _CONFIG_DTYPES}
    config = config_json if config_json is not None else read_model_config(source)
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(config.get(k), str)]
    if len(floats) != 1 or not keys or all(config[k] == next(iter(floats)) for k in keys):
        return config_json
    return {**config, **{k: next(iter(floats)) for k in keys}}


def _tensor_parameters(cfg: MergeConfig, found, models) -> Optional[Callable[[str], Optional[dict]]]:
    """Per-tensor option values (gradients, filters, slice parameters) as a function of the tensor name, or None."""
    from llm_merge.gradients import layer_t, num_layers_of, tensor_params
    from llm_merge.names import embed_name, layer_index

    if cfg.slices:
        from llm_merge.slices import position_finder

        embed = embed_name(t.name for t in found.tensors)
        find = position_finder(cfg.slices, cfg.base_model_path)

        def by_slice(name: str) -> Optional[dict]:
            where = find(layer_index(name, cfg.layer_pattern), name == embed)
            return tensor_params(cfg, name, where.t, where.shared, where.per_model)

        return by_slice
    if not cfg.tensor_parameters:
        return None
    from llm_merge.reconcile import read_model_config

    num_layers = num_layers_of([t.name for t in found.tensors], read_model_config(models[0].path), cfg.layer_pattern)
    return lambda name: tensor_params(cfg, name, layer_t(name, num_layers, cfg.layer_pattern))


def _piece_task(tensor, piece, models, base, slot: OutputSlot, cfg: MergeConfig, weights: list[float]) -> TensorTask:
    """The task of one piece of an output tensor (see ``llm_merge.reconcile.Piece``)."""
    from llm_merge.reconcile import BASE, slice_rows

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
    inputs = tuple(info(models[i]) for i in indices)
    if tensor.mergeable and piece.models is not None and cfg.merge_type == "linear" and cfg.normalize:
        if sum(weights[i] for i in piece.models) == 0:
            raise MergeError(f"tensor {name}: the weights of the models that have it ({[weights[i] for i in piece.models]}) sum to 0")
    return TensorTask(name, inputs[0].shape, inputs, info(base) if piece.base else None, out, tensor.mergeable, piece.models)


def check_same_names(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint must hold the same tensor names as the first."""
    reference = checkpoints[0]
    names = set(reference.tensors)
    problems = []
    for other in checkpoints[1:]:
        theirs = set(other.tensors)
        missing, extra = sorted(names - theirs), sorted(theirs - names)
        if missing or extra:
            problems.append(
                f"{other.path} vs {reference.path}: "
                + "; ".join(
                    f"{label} {len(items)} ({', '.join(items[:_SHOW])}{', ...' if len(items) > _SHOW else ''})"
                    for label, items in (("missing", missing), ("extra", extra))
                    if items
                )
            )
    if problems:
        raise MergeError("tensor names differ between models: " + " | ".join(problems) + "; see --on_missing_tensor")


def shard_file_name(prefix: str, index: int, count: int) -> str:
    """HF shard naming: ``{prefix}.safetensors`` alone, else ``{prefix}-00001-of-00003.safetensors``."""
    return f"{prefix}.safetensors" if count == 1 else f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def layout_shards(
    reference: Checkpoint, out_dtypes: dict[str, str], max_shard_bytes: int, prefix: str
) -> tuple[tuple[Shard, ...], dict[str, OutputSlot]]:
    """Greedy HF-style sharding in the first model's storage order, with every tensor's byte offset."""
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for name, info in reference.tensors.items():
        size = info.numel * dtypes.itemsize(out_dtypes[name])
        if groups[-1] and group_bytes + size > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += size
    metadata = reference.metadata if _is_str_dict(reference.metadata) else {"format": "pt"}
    shards, slots = [], {}
    for index, names in enumerate(groups):
        file = shard_file_name(prefix, index, len(groups))
        entries, offset = {}, 0
        for name in names:
            shape = reference.tensors[name].shape
            size = (reference.tensors[name].numel) * dtypes.itemsize(out_dtypes[name])
            entries[name] = {"dtype": out_dtypes[name], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header = encode_header(entries, metadata)
        for name in names:
            slots[name] = OutputSlot(file, len(header) + entries[name]["data_offsets"][0], out_dtypes[name])
        shards.append(Shard(file=file, header=header, size=len(header) + offset, names=tuple(names)))
    return tuple(shards), slots


def _is_str_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
