"""Fold plan: lora_A/lora_B paired per base weight, every shape checked, output shards laid out.

Nothing here reads base tensor data: the plan is built from safetensors headers,
the adapter's config file and the adapter tensors' shapes, and every problem
(unpaired lora_A/lora_B, targets missing from the base, shapes that do not fit)
is raised here, before any output is written. ``llm_merge.lora.fold`` executes
the plan.

The base weight is ``<module>.weight``. Its stored shape decides the layout: delta
is used as is when its shape matches, transposed when delta.T matches, else it is
an error. Square weights fit both ways; they follow the adapter's non-square
linear weights when those were all transposed, else the format's own layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from llm_merge.config.names import HEAD_NAME
from llm_merge.config.validate import parse_size
from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.lora.adapter import PEFT, PEFT_PREFIX, Adapter, AdapterTensor, base_name, open_adapter
from llm_merge.lora.options import LoraMergeConfig
from llm_merge.plan.layout import OutputSlot, Shard, ShardedOutput, layout_shards

log = logging.getLogger(__name__)
_SHOW = 5  # problems listed per message


@dataclass(frozen=True)
class LoraPair:
    """delta = left @ right ([m, r] @ [r, n]), transposed when ``transpose``; added times ``scale``."""

    module: str
    left: AdapterTensor
    right: AdapterTensor
    scale: float
    transpose: bool


@dataclass(frozen=True)
class FoldTask:
    """One output tensor: the base tensor, plus a LoRA pair to fold or a full replacement from the adapter."""

    name: str
    shape: tuple[int, ...]
    base: TensorInfo
    out: OutputSlot
    lora: Optional[LoraPair] = None
    replace: Optional[AdapterTensor] = None

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def out_bytes(self) -> int:
        return self.numel * dtypes.itemsize(self.out.dtype)

    @property
    def in_bytes(self) -> int:
        extra = self.lora.left.nbytes + self.lora.right.nbytes if self.lora else 0
        return (self.replace.nbytes if self.replace else self.base.nbytes) + extra


@dataclass(frozen=True)
class FoldPlan(ShardedOutput):
    """Every output tensor of a fold and the output shards."""

    tasks: tuple[FoldTask, ...]
    shards: tuple[Shard, ...]
    base: Checkpoint
    adapter: Adapter

    @property
    def folded(self) -> int:
        return sum(1 for t in self.tasks if t.lora)


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def pair_adapter(adapter: Adapter, base: Checkpoint) -> tuple[dict[str, LoraPair], dict[str, AdapterTensor]]:
    """Pair lora_A/lora_B per base weight and check every shape; returns (folds, replacements) by base name.

    Raises MergeError listing (the first few) unpaired tensors, targets missing from
    the base, rank or shape mismatches, and unsupported tensors, before anything is written.
    """
    halves, replacements, embedding = _sort_tensors(adapter)
    _drop_tied_head(adapter, base, halves, replacements)
    targets = _check_targets(adapter, base, halves, replacements)
    problems: list[str] = []
    pending = [p for p in (_fitted_pair(adapter, base, module, side, targets[module], problems)
                           for module, side in halves.items()) if p is not None]
    problems += _replacement_problems(base, replacements)
    if problems:
        raise MergeError(f"LoRA adapter {adapter.path} does not fit base {base.path}: {_listing(problems)}")
    square_transpose = _square_layout(adapter, pending, embedding)
    folds = {
        target: LoraPair(module, left, right, scale, square_transpose if transpose is None else transpose)
        for module, target, left, right, _, scale, transpose in pending
    }
    return folds, replacements


def _sort_tensors(adapter: Adapter) -> tuple[dict[str, dict[str, AdapterTensor]], dict[str, AdapterTensor], set[str]]:
    """(lora_A/lora_B halves by module, full replacement tensors by base name, embedding modules); MergeError
    on unsupported LoRA tensors, duplicates or a half without its pair."""
    halves: dict[str, dict[str, AdapterTensor]] = {}
    embedding: set[str] = set()
    replacements: dict[str, AdapterTensor] = {}
    problems: list[str] = []
    for name, tensor in adapter.tensors.items():
        module, which, is_embedding = base_name(adapter.format, name)
        if module is None:
            if name.endswith("lora_magnitude_vector") or ".lora_" in name:
                problems.append(f"{name}: not a lora_A/lora_B tensor (unsupported LoRA variant)")
                continue
            target = name[len(PEFT_PREFIX):] if adapter.format == PEFT and name.startswith(PEFT_PREFIX) else name
            if adapter.format == PEFT:  # PEFT stores an adapted layer's own parameters (a bias) under base_layer
                target = target.replace(".base_layer.", ".")
            replacements[target] = tensor
            continue
        side = halves.setdefault(module, {})
        if which in side:
            problems.append(f"{name}: second lora_{which} for {module} (also {side[which].name})")
        side[which] = tensor
        if is_embedding:
            embedding.add(module)
    if problems:
        raise MergeError(f"{adapter.weights_file}: {_listing(problems)}")
    unpaired = [
        f"{side[have].name} has no lora_{'B' if have == 'A' else 'A'}"
        for module, side in halves.items()
        if len(side) == 1
        for have in side
    ]
    if unpaired:
        raise MergeError(f"{adapter.weights_file}: unpaired LoRA tensors: {_listing(unpaired)}")
    return halves, replacements, embedding


def _drop_tied_head(adapter: Adapter, base: Checkpoint, halves: dict, replacements: dict) -> None:
    """PEFT's ``ensure_weight_tying`` repeats the embedding's tensors for a tied output head; a base without
    ``lm_head.weight`` (tied) takes its head from the embedding, so those copies are left out."""
    head = HEAD_NAME.rsplit(".", 1)[0]
    if adapter.ties_head and HEAD_NAME not in base.tensors and (head in halves or HEAD_NAME in replacements):
        log.info("%s: leaving out the tied output head's tensors (ensure_weight_tying; the base ties lm_head to "
                 "its embedding)", adapter.weights_file)
        halves.pop(head, None)
        replacements.pop(HEAD_NAME, None)


def _check_targets(adapter: Adapter, base: Checkpoint, halves: dict, replacements: dict) -> dict[str, str]:
    """The base weight of each LoRA module; MergeError when a target is missing or has both a pair and a full tensor."""
    targets = {module: f"{module}.weight" for module in halves}
    missing = [f"{halves[m]['A'].name} -> {t}" for m, t in targets.items() if t not in base.tensors]
    missing += [f"{tensor.name} -> {t}" for t, tensor in replacements.items() if t not in base.tensors]
    if missing:
        raise MergeError(f"adapter tensors whose target is not a weight of {base.path}: {_listing(missing)}")
    both = [t for t in replacements if t in targets.values()]
    if both:
        raise MergeError(f"{adapter.weights_file}: both a LoRA pair and a full tensor for {_listing(both)}")
    return targets


def _fitted_pair(adapter: Adapter, base: Checkpoint, module: str, side: dict[str, AdapterTensor], target: str,
                 problems: list[str]) -> Optional[tuple]:
    """(module, target, left, right, shape, scale, transpose) of one pair whose rank and shapes fit its base weight
    (transpose None: square, decided by ``_square_layout``), or None with the problem appended to ``problems``."""
    a, b = side["A"], side["B"]
    left, right = (b, a) if adapter.format == PEFT else (a, b)
    info = base.tensors[target]
    shapes = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}, base {target} {list(info.shape)}"
    if len(left.shape) != 2 or len(right.shape) != 2:
        problems.append(f"{module}: only 2-D LoRA weights can be folded ({shapes})")
        return None
    if a.dtype not in dtypes.MERGEABLE or b.dtype not in dtypes.MERGEABLE:
        problems.append(f"{module}: LoRA weights must be float (lora_A {a.dtype}, lora_B {b.dtype})")
        return None
    if left.shape[1] != right.shape[0]:
        problems.append(f"{module}: lora_A and lora_B ranks differ ({shapes})")
        return None
    r, scale = adapter.rank_and_scale(module)
    if left.shape[1] != r:
        problems.append(f"{module}: rank {left.shape[1]} in the tensors but r={r} in {adapter.config_file.name} ({shapes})")
        return None
    if info.dtype not in dtypes.MERGEABLE:
        problems.append(f"{target}: base dtype {info.dtype} is not a float type")
        return None
    delta = (left.shape[0], right.shape[1])
    direct, flipped = tuple(info.shape) == delta, tuple(info.shape) == delta[::-1]
    if not (direct or flipped):
        problems.append(f"{target}: delta {list(delta)} fits neither it nor its transpose ({shapes})")
        return None
    return module, target, left, right, info.shape, scale, (None if direct and flipped else flipped)


def _replacement_problems(base: Checkpoint, replacements: dict[str, AdapterTensor]) -> list[str]:
    """Full tensors of the adapter whose shape or dtype does not fit the base tensor they replace."""
    problems = []
    for target, tensor in replacements.items():
        info = base.tensors[target]
        if tuple(tensor.shape) != tuple(info.shape):
            problems.append(f"{tensor.name}: shape {list(tensor.shape)} but base {target} is {list(info.shape)}")
        elif (tensor.dtype in dtypes.MERGEABLE) != (info.dtype in dtypes.MERGEABLE) or (
            info.dtype not in dtypes.MERGEABLE and tensor.dtype != info.dtype
        ):
            problems.append(f"{tensor.name}: dtype {tensor.dtype} but base {target} is {info.dtype}")
    return problems


def _square_layout(adapter: Adapter, pending: list, embedding: set[str]) -> bool:
    """Layout of square weights: transposed iff every non-square linear weight was (else the format's own)."""
    decided = [t for module, _, _, _, _, _, t in pending if t is not None and module not in embedding]
    if decided and all(decided):
        if any(t is None for *_, t in pending):
            log.info("square weights are folded transposed, like the adapter's %d non-square linear weights", len(decided))
        return True
    if decided and any(decided):
        log.warning(
            "%d of %d non-square adapted weights needed delta transposed; square weights use the %s layout",
            sum(decided), len(decided), adapter.format,
        )
    return adapter.format == PEFT and adapter.fan_in_fan_out


def fitted_adapter(path: str, base: Checkpoint, allow_pickle: bool) -> tuple[Adapter, dict[str, LoraPair], dict[str, AdapterTensor]]:
    """Open the adapter at ``path`` and pair it with ``base`` (``pair_adapter``); MergeError when it holds nothing to fold."""
    adapter = open_adapter(path, allow_pickle)
    folds, replacements = pair_adapter(adapter, base)
    if not folds and not replacements:
        raise MergeError(f"{adapter.weights_file}: the adapter holds no LoRA tensors")
    return adapter, folds, replacements


def build_fold_plan(cfg: LoraMergeConfig) -> FoldPlan:
    """Open base and adapter, pair and check everything, and lay out the output shards."""
    base = open_checkpoint(cfg.model_name_or_path, cfg.merge_prefix)
    adapter, folds, replacements = fitted_adapter(cfg.lora_path, base, cfg.allow_pickle)
    out_dtypes = {
        name: (dtypes.OUTPUT_DTYPES[cfg.output_dtype] if cfg.output_dtype and info.dtype in dtypes.MERGEABLE else info.dtype)
        for name, info in base.tensors.items()
    }
    shards, slots = layout_shards(base, out_dtypes, parse_size(cfg.max_shard_size), cfg.merge_prefix)
    tasks = tuple(
        FoldTask(name=name, shape=info.shape, base=info, out=slots[name], lora=folds.get(name), replace=replacements.get(name))
        for name, info in base.tensors.items()
    )
    return FoldPlan(tasks=tasks, shards=shards, base=base, adapter=adapter)

