"""MoE plan: the checkpoints checked against the base and every output tensor laid out, from headers only.

Attention, norms, embeddings and the output head come from the base; expert ``e``'s MLP of layer ``i`` from
expert ``e``'s source model (plus ``noise_scale`` times counter-based normal draws, its down projection times
``residual_scale``); router weights from the gates (filled in after planning, ``with_gates``). Every problem
— a base whose architecture has no MoE form, experts whose shapes or vocabularies differ from the base's —
is raised here, before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from llm_merge.config.validate import parse_size
from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import dtypes
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.moe.arch import DROPPED_PATTERN, MLP_PATTERN, PROJECTIONS, Target, output_config, select_target
from llm_merge.moe.options import MoeConfig
from llm_merge.moe.recipe import ExpertSpec, MoeRecipe
from llm_merge.plan.layout import OutputSlot, Shard, ShardedOutput, layout_shards
from llm_merge.plan.reconcile import read_model_config
from llm_merge.plan.vocab import tokenizer_vocab

log = logging.getLogger(__name__)
_SHOW = 5  # problems listed per message
_EMBED = "model.embed_tokens.weight"
_VOCAB_HINT = ("give it the base's vocabulary first: llm-merge --merge_method linear --base_model_path BASE "
               "--model_path_list EXPERT --tokenizer_source base --output_path NEW_EXPERT (README: Messy checkpoints)")


@dataclass(frozen=True)
class Piece:
    """One source of an output tensor: a tensor of an input (None: zeros) of ``shape``, with an expert's
    ``noise_scale`` (normal draws added) and ``scale`` (``residual_scale`` of a down projection)."""

    source: Optional[TensorInfo]
    shape: tuple[int, ...]
    noise_scale: Optional[float] = None
    scale: Optional[float] = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class MoeTask:
    """One output tensor: its pieces one after another (``columns``: side by side along dimension 1, the
    shared experts' down projections), or router rows ``gate`` = (layer, "routed" | "shared") whose
    ``values`` the gates fill in."""

    name: str
    shape: tuple[int, ...]
    out: OutputSlot
    pieces: tuple[Piece, ...] = ()
    columns: bool = False
    gate: Optional[tuple[int, str]] = None
    values: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def out_bytes(self) -> int:
        return self.numel * dtypes.itemsize(self.out.dtype)

    @property
    def in_bytes(self) -> int:
        return sum(p.source.nbytes for p in self.pieces if p.source is not None) or self.out_bytes


@dataclass(frozen=True)
class MoePlan(ShardedOutput):
    """Every output tensor, the shards, and what the gates need."""

    tasks: tuple[MoeTask, ...]
    shards: tuple[Shard, ...]
    base: Checkpoint
    base_config: dict
    target: Target
    recipe: MoeRecipe
    config_json: dict
    layers: int
    hidden: int
    out_dtype: str

    def with_gates(self, routed: np.ndarray, shared: Optional[np.ndarray]) -> "MoePlan":
        """The plan with router rows: ``routed`` [layers, experts, hidden], ``shared`` [layers, 1, hidden]."""
        def fill(task: MoeTask) -> MoeTask:
            if task.gate is None:
                return task
            layer, which = task.gate
            return dataclasses.replace(task, values=(routed if which == "routed" else shared)[layer])

        return dataclasses.replace(self, tasks=tuple(fill(t) for t in self.tasks))


@dataclass(frozen=True)
class _Planned:
    """An output tensor's shape, for ``layout_shards``."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class _Layout:
    tensors: dict
    metadata: Optional[dict]


def build_moe_plan(recipe: MoeRecipe, cfg: MoeConfig) -> MoePlan:
    """Open and check every checkpoint, pick the output architecture, and lay out the output shards."""
    base = open_checkpoint(recipe.base_model, cfg.merge_prefix)
    base_config = read_model_config(base.path)
    model_type = base_config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"recipe: base_model {base.path}: config.json names no model_type, so its architecture "
                          "and MoE form are unknown")
    target = select_target(recipe.architecture, model_type, str(base.path), len(recipe.shared_experts))
    mlp = _base_mlp(base, base_config, target)
    layers = 1 + max(layer for layer, _ in mlp)
    opened: dict[str, Checkpoint] = {}
    experts = [_open_expert(spec, base, base_config, mlp, cfg.merge_prefix, opened) for spec in recipe.experts]
    shared = [_open_expert(spec, base, base_config, mlp, cfg.merge_prefix, opened) for spec in recipe.shared_experts]
    if len(recipe.experts) > 1 and len({os.path.realpath(e.source_model) for e in recipe.experts}) == 1:
        log.warning("every expert is %s: the experts compute the same, so routing changes nothing; useful only as a "
                    "start for training", recipe.experts[0].source_model)
    out_dtype = _output_dtype(recipe, base, base_config)
    intermediate = mlp[(0, "gate_proj")].shape[0]
    hidden = mlp[(0, "gate_proj")].shape[1]
    tasks = _tensor_plans(base, base_config, target, recipe, mlp, experts, shared, hidden)
    out_dtypes = {name: (out_dtype if source_dtype in dtypes.MERGEABLE else source_dtype) for name, _, source_dtype in tasks}
    layout = _Layout({name: _Planned(fields["shape"]) for name, fields, _ in tasks}, base.metadata)
    shards, slots = layout_shards(layout, out_dtypes, parse_size(cfg.max_shard_size), cfg.merge_prefix)
    planned = tuple(MoeTask(name=name, out=slots[name], **fields) for name, fields, _ in tasks)
    name_of_dtype = {v: k for k, v in dtypes.OUTPUT_DTYPES.items()}[out_dtype]
    config_json = output_config(target, base_config, experts=len(experts), experts_per_token=recipe.experts_per_token,
                                intermediate=intermediate, shared_intermediate=intermediate * len(shared), dtype=name_of_dtype)
    return MoePlan(tasks=planned, shards=shards, base=base, base_config=base_config, target=target, recipe=recipe,
                   config_json=config_json, layers=layers, hidden=hidden, out_dtype=out_dtype)


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def _base_mlp(base: Checkpoint, base_config: dict, target: Target) -> dict[tuple[int, str], TensorInfo]:
    """The base's MLP weights by (layer, projection); ConfigError when a layer lacks one, or when a tensor has no
    place in the target architecture (an MLP bias, attention biases in Mixtral ...)."""
    mlp: dict[tuple[int, str], TensorInfo] = {}
    homeless = []
    for name, info in base.tensors.items():
        match = MLP_PATTERN.match(name)
        if match:
            mlp[(int(match.group(1)), match.group(2))] = info
        elif not DROPPED_PATTERN.search(name) and not target.keeps(name, base_config):
            homeless.append(name)
    if homeless:
        raise ConfigError(f"recipe: base_model {base.path}: {len(homeless)} tensor(s) have no place in "
                          f"{target.architecture}: {_listing(homeless)}")
    if not mlp:
        raise ConfigError(f"recipe: base_model {base.path}: no MLP weights model.layers.N.mlp.gate_proj/up_proj/"
                          "down_proj.weight, so it has no MoE form")
    layers = 1 + max(layer for layer, _ in mlp)
    declared = base_config.get("num_hidden_layers", layers)
    missing = [f"model.layers.{i}.mlp.{p}.weight" for i in range(max(layers, declared)) for p in PROJECTIONS if (i, p) not in mlp]
    if missing or declared != layers:
        raise MergeError(f"{base.path}: config.json's num_hidden_layers is {declared} but the MLP weights "
                         f"{'lack ' + _listing(missing) if missing else f'span {layers} layers'}")
    for (layer, projection), info in mlp.items():
        if info.dtype not in dtypes.MERGEABLE or len(info.shape) != 2:
            raise MergeError(f"{base.path}: model.layers.{layer}.mlp.{projection}.weight is {info.dtype} {list(info.shape)}, "
                             "expected a float matrix")
    return mlp


def _open_expert(spec: ExpertSpec, base: Checkpoint, base_config: dict, mlp: dict, prefix: str,
                 opened: dict[str, Checkpoint]) -> Checkpoint:
    """An expert's checkpoint, checked once per directory: the base's model type, every tensor it shares with the
    base of the same shape, every MLP weight present, and the base's vocabulary."""
    key = os.path.realpath(spec.source_model)
    if key in opened:
        return opened[key]
    if key == os.path.realpath(base.path):
        opened[key] = base
        return base
    expert = open_checkpoint(spec.source_model, prefix)
    config = read_model_config(expert.path)
    if config.get("model_type", base_config["model_type"]) != base_config["model_type"]:
        raise MergeError(f"expert {expert.path}: a {config.get('model_type')!r} model, the base is "
                         f"{base_config['model_type']!r}; experts must be fine-tunes of the base")
    embed = base.tensors.get(_EMBED)
    if embed is not None and _EMBED in expert.tensors and expert.tensors[_EMBED].shape != embed.shape:
        raise MergeError(f"expert {expert.path}: its vocabulary differs from the base's ({_EMBED} "
                         f"{list(expert.tensors[_EMBED].shape)}, base {list(embed.shape)}); {_VOCAB_HINT}")
    _check_tokenizer(expert, base)
    problems = [f"{name} {list(info.shape)} (base {list(base.tensors[name].shape)})"
                for name, info in expert.tensors.items() if name in base.tensors and info.shape != base.tensors[name].shape]
    missing = [f"model.layers.{i}.mlp.{p}.weight" for i, p in mlp if f"model.layers.{i}.mlp.{p}.weight" not in expert.tensors]
    if problems or missing:
        what = f"shapes differ from the base's: {_listing(problems)}" if problems else f"lacks {_listing(missing)}"
        raise MergeError(f"expert {expert.path}: {what}; experts must be fine-tunes of the base (same shapes)")
    for i, p in mlp:
        info = expert.tensors[f"model.layers.{i}.mlp.{p}.weight"]
        if info.dtype not in dtypes.MERGEABLE:
            raise MergeError(f"expert {expert.path}: model.layers.{i}.mlp.{p}.weight is {info.dtype}, expected a float type")
    opened[key] = expert
    return expert


def _check_tokenizer(expert: Checkpoint, base: Checkpoint) -> None:
    """Token id i must mean the same token in the expert as in the base (where both have a tokenizer.json)."""
    base_vocab, expert_vocab = tokenizer_vocab(base.path), tokenizer_vocab(expert.path)
    if base_vocab is None or expert_vocab is None or base_vocab == expert_vocab:
        return
    differ = sorted(set(base_vocab) ^ set(expert_vocab)) or sorted(i for i in base_vocab if base_vocab[i] != expert_vocab[i])
    token = differ[0]
    raise MergeError(f"expert {expert.path}: its tokenizer differs from the base's (token id {token} is "
                     f"{expert_vocab.get(token)!r}, in the base {base_vocab.get(token)!r}); {_VOCAB_HINT}")


def _output_dtype(recipe: MoeRecipe, base: Checkpoint, base_config: dict) -> str:
    """The recipe's dtype, else the base config's torch_dtype / dtype, else its embedding's."""
    for name in (recipe.dtype, base_config.get("torch_dtype"), base_config.get("dtype")):
        if isinstance(name, str) and name.removeprefix("torch.") in dtypes.OUTPUT_DTYPES:
            return dtypes.OUTPUT_DTYPES[name.removeprefix("torch.")]
    embed = base.tensors.get(_EMBED)
    return embed.dtype if embed is not None and embed.dtype in dtypes.OUTPUT_DTYPES.values() else "BF16"


def _tensor_plans(base: Checkpoint, base_config: dict, target: Target, recipe: MoeRecipe, mlp: dict,
                  experts: list[Checkpoint], shared: list[Checkpoint], hidden: int) -> list[tuple[str, dict, str]]:
    """(name, MoeTask fields, source dtype) of every output tensor, in the base's order: each layer's router
    (and shared expert gate) before its experts."""
    out: list[tuple[str, dict, str]] = []
    routed_layers: set[int] = set()
    for name, info in base.tensors.items():
        match = MLP_PATTERN.match(name)
        if match is None:
            if DROPPED_PATTERN.search(name):
                log.info("%s: a rotary buffer, left out", name)
                continue
            out.append((name, {"shape": info.shape, "pieces": (Piece(info, info.shape),)}, info.dtype))
            bias = name.removesuffix(".weight") + ".bias"
            if target.model_type == "qwen2_moe" and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) \
                    and bias not in base.tensors:
                out.append((bias, {"shape": info.shape[:1], "pieces": (Piece(None, info.shape[:1]),)}, info.dtype))
            continue
        layer, projection = int(match.group(1)), match.group(2)
        if layer not in routed_layers:
            routed_layers.add(layer)
            out.append((target.router_name(layer), {"shape": (len(experts), hidden), "gate": (layer, "routed")}, "F32"))
            if shared:
                out.append((target.shared_gate_name(layer), {"shape": (1, hidden), "gate": (layer, "shared")}, "F32"))
        for index, (spec, checkpoint) in enumerate(zip(recipe.experts, experts)):
            out.append((target.expert_name(layer, index, projection),
                        {"shape": info.shape, "pieces": (_piece(spec, checkpoint, name, projection),)}, info.dtype))
        if shared:
            pieces = tuple(_piece(spec, checkpoint, name, projection) for spec, checkpoint in zip(recipe.shared_experts, shared))
            columns = projection == "down_proj"  # [hidden, n * intermediate]; gate/up: [n * intermediate, hidden]
            shape = (info.shape[0], info.shape[1] * len(shared)) if columns else (info.shape[0] * len(shared), info.shape[1])
            out.append((target.shared_name(layer, projection), {"shape": shape, "pieces": pieces, "columns": columns}, info.dtype))
    return out


def _piece(spec: ExpertSpec, checkpoint: Checkpoint, name: str, projection: str) -> Piece:
    info = checkpoint.tensors[name]
    scale = spec.residual_scale if projection == "down_proj" else None
    return Piece(info, info.shape, noise_scale=spec.noise_scale or None, scale=scale)
