"""Extraction plan: base and fine-tune checked against each other, every tensor given one task.

Built from safetensors headers only; every problem (tensors only one model has, shapes that differ,
vocabularies of different sizes, float against non-float) is raised here, before any work.

Each tensor that ``--include`` / ``--exclude`` select gets a task by what it is:

* ``lora``: a 2-D float ``<module>.weight`` (a linear layer; with ``--embed_mode lora`` also an
  output head): the truncated SVD of fine-tune - base gives its factors;
* ``lora_embedding``: an input embedding with ``--embed_mode lora`` (PEFT's ``lora_embedding_A/B``);
* ``save``: anything else (norms, biases, embeddings and heads with ``--embed_mode save``, buffers):
  compared with the base, and stored whole when it differs.

A tensor left out by ``--include`` / ``--exclude`` gets an ``excluded`` task: compared only, so that
the report can name the changes the adapter leaves out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from llm_merge.config.names import HEAD_NAME, embed_name, is_vocab_name
from llm_merge.errors import MergeError
from llm_merge.io import dtypes, side_files
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.lora.extract_options import ExtractConfig
from llm_merge.run.pool import PartFile

LORA, LORA_EMBEDDING, SAVE, EXCLUDED = "lora", "lora_embedding", "save", "excluded"
_SHOW = 5  # problems listed per message


@dataclass(frozen=True)
class ExtractTask:
    """One tensor of the base and the fine-tune, and what to do with it (``kind``)."""

    index: int
    name: str
    kind: str
    base: TensorInfo
    tuned: TensorInfo
    out: PartFile

    @property
    def module(self) -> str:
        """The module that owns the tensor: its name without the last component."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def in_bytes(self) -> int:
        return self.base.nbytes + self.tuned.nbytes

    @property
    def out_bytes(self) -> int:  # progress is counted in bytes read
        return self.in_bytes


@dataclass(frozen=True)
class ExtractPlan:
    """Every task of an extraction, in the base's tensor order, and the two checkpoints.

    ``tied``: the base's config.json ties the output head to the input embedding and neither
    checkpoint holds ``lm_head.weight`` (the head follows the embedding). ``task_type``: PEFT's
    ``CAUSAL_LM`` for a ``*ForCausalLM`` architecture, else None.
    """

    tasks: tuple[ExtractTask, ...]
    base: Checkpoint
    tuned: Checkpoint
    tied: bool = False
    task_type: Optional[str] = None


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def build_extract_plan(cfg: ExtractConfig) -> ExtractPlan:
    """Open both checkpoints, check that they pair up, and give every tensor its task."""
    base = open_checkpoint(cfg.base_model_path, cfg.merge_prefix)
    tuned = open_checkpoint(cfg.model_path, cfg.merge_prefix)
    check_pairing(base, tuned)
    tasks = tuple(
        ExtractTask(index, name, _kind(cfg, name, info), info, tuned.tensors[name], PartFile(f"{index:06d}"))
        for index, (name, info) in enumerate(base.tensors.items())
    )
    path = base.path / "config.json"
    config = side_files.read_json(path) if path.is_file() else None
    config = config if isinstance(config, dict) else {}
    tied = config.get("tie_word_embeddings") is True and HEAD_NAME not in base.tensors and embed_name(base.tensors) is not None
    architectures = config.get("architectures")
    causal = isinstance(architectures, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures)
    return ExtractPlan(tasks=tasks, base=base, tuned=tuned, tied=tied, task_type="CAUSAL_LM" if causal else None)


def check_pairing(base: Checkpoint, tuned: Checkpoint) -> None:
    """MergeError unless both hold the same tensor names, shapes and kinds of dtype (float or not)."""
    only_base = [name for name in base.tensors if name not in tuned.tensors]
    only_tuned = [name for name in tuned.tensors if name not in base.tensors]
    if only_base or only_tuned:
        found = [f"only in the base: {_listing(only_base)}"] * bool(only_base)
        found += [f"only in the fine-tune: {_listing(only_tuned)}"] * bool(only_tuned)
        raise MergeError(f"{tuned.path} and base {base.path} hold different tensors ({'; '.join(found)}); "
                         "an adapter can only describe changes of the same tensors")
    vocab, shapes, kinds = [], [], []
    for name, info in base.tensors.items():
        other = tuned.tensors[name]
        if tuple(info.shape) != tuple(other.shape):
            rows_only = len(info.shape) == len(other.shape) >= 1 and info.shape[1:] == other.shape[1:]
            target = vocab if rows_only and (is_vocab_name(name) or embed_name([name])) else shapes
            target.append(f"{name}: {list(other.shape)} in the fine-tune, {list(info.shape)} in the base")
        elif (info.dtype in dtypes.MERGEABLE) != (other.dtype in dtypes.MERGEABLE):
            kinds.append(f"{name}: {other.dtype} in the fine-tune, {info.dtype} in the base")
    if vocab:
        raise MergeError(f"the vocabularies differ ({_listing(vocab)}); an adapter cannot change the vocabulary: "
                         "give the base the fine-tune's vocabulary first (llm-merge --tokenizer_source, see "
                         "'Vocabularies of different sizes' in README.md), then extract against that")
    if shapes:
        raise MergeError(f"tensor shapes differ between {tuned.path} and base {base.path}: {_listing(shapes)}")
    if kinds:
        raise MergeError(f"float and non-float tensors do not pair up: {_listing(kinds)}")


def _kind(cfg: ExtractConfig, name: str, info: TensorInfo) -> str:
    if not _selected(cfg, name):
        return EXCLUDED
    if len(info.shape) != 2 or info.dtype not in dtypes.MERGEABLE or not name.endswith(".weight"):
        return SAVE
    if embed_name([name]):
        return LORA_EMBEDDING if cfg.embed_mode == "lora" else SAVE
    if is_vocab_name(name):
        return LORA if cfg.embed_mode == "lora" else SAVE
    return LORA


def _selected(cfg: ExtractConfig, name: str) -> bool:
    if cfg.include and not any(re.search(pattern, name) for pattern in cfg.include):
        return False
    return not any(re.search(pattern, name) for pattern in cfg.exclude)
