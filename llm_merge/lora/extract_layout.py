"""The extracted adapter's layout, from the finished tasks: tensor names, shapes, config file and report.

Pure: the tasks' figures (``results``) and the headers of their factor files go in; out come the
adapter's tensors in order (each with the bytes it is copied from), its config file and the report.
The fold (``llm_merge.lora.plan``) reads both formats back as W + scale * delta with scale 1 here.

* PEFT: ``base_model.model.<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r] (embeddings:
  ``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [hidden, r]); ``r`` is the most common rank,
  ``lora_alpha`` = r, and a module of another rank gets ``rank_pattern`` and ``alpha_pattern``
  entries equal to its rank. A changed tensor of an adapted module (a bias) is
  ``<module>.base_layer.<param>`` with ``"bias": "lora_only"``; any other changed tensor is stored
  under its own name and its module listed in ``modules_to_save``. When the base ties its output
  head to the embedding and the adapter changes the embedding, ``ensure_weight_tying`` is set and
  the head gets the embedding's copy (saved) or its factors transposed (LoRA), as PEFT saves them.
* PaddleNLP: ``<module>.lora_A`` [in, r] / ``<module>.lora_B`` [r, out]; one ``r`` for all modules
  (its config has no rank patterns), so lower-rank factors are padded with zeros to the largest rank.
  Biases of adapted modules get ``"trainable_bias": "lora"``; other changed tensors are listed in
  ``trainable_modules``.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Optional

from llm_merge.config.names import HEAD_NAME, embed_name
from llm_merge.errors import MergeError
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.lora.adapter import PADDLE, PADDLE_CONFIG, PEFT, PEFT_CONFIG, PEFT_PREFIX
from llm_merge.lora.extract_plan import EXCLUDED, LORA, LORA_EMBEDDING, ExtractPlan, ExtractTask

#: File names of the adapter's weights, by format.
WEIGHTS_FILE = {PEFT: "adapter_model.safetensors", PADDLE: "lora_model_state.safetensors"}
CONFIG_FILE = {PEFT: PEFT_CONFIG, PADDLE: PADDLE_CONFIG}


@dataclass(frozen=True)
class AdapterEntry:
    """One tensor of the adapter: its name and final shape, and the tensor its bytes come from
    (a smaller ``source`` is padded with zeros: PaddleNLP factors below the common rank), transposed
    when ``transpose`` (the tied output head's factors, from the embedding's)."""

    name: str
    shape: tuple[int, ...]
    source: TensorInfo
    transpose: bool = False

    @property
    def dtype(self) -> str:
        return self.source.dtype


@dataclass(frozen=True)
class AdapterLayout:
    entries: tuple[AdapterEntry, ...]
    config: dict
    rows: tuple[dict, ...]  # the report's per-tensor rows


def layout_adapter(plan: ExtractPlan, results: dict[int, dict], factors: dict[int, dict[str, TensorInfo]],
                   adapter_format: str, base_model: str) -> AdapterLayout:
    """The adapter of ``plan`` once every task has run (``results`` and ``factors`` by task index)."""
    adapted = {t.module: t for t in plan.tasks if t.kind in (LORA, LORA_EMBEDDING) and results[t.index]["rank"] > 0}
    if not adapted:
        below = any(results[t.index].get("delta_norm") for t in plan.tasks if t.kind in (LORA, LORA_EMBEDDING))
        raise MergeError(f"no LoRA module to extract: no linear weight of {plan.tuned.path} that --include/--exclude "
                         f"select differs from base {plan.base.path}"
                         + (" by a singular value above --sv_epsilon" if below else ""))
    saved = [t for t in plan.tasks if t.kind not in (LORA, LORA_EMBEDDING, EXCLUDED) and results[t.index]["differs"]]
    ranks = {module: results[t.index]["rank"] for module, t in adapted.items()}
    common = max(collections.Counter(ranks.values()).items(), key=lambda item: (item[1], item[0]))[0]
    if adapter_format == PEFT:
        entries = _peft_entries(plan, adapted, saved, factors)
        config = _peft_config(plan, adapted, saved, ranks, common, base_model)
    else:
        widest = max(ranks.values())
        entries = _paddle_entries(plan, adapted, saved, factors, widest)
        config = _paddle_config(adapted, saved, widest, base_model)
    return AdapterLayout(tuple(entries), config, tuple(_row(t, results[t.index]) for t in plan.tasks))


def _peft_entries(plan: ExtractPlan, adapted: dict[str, ExtractTask], saved: list[ExtractTask],
                  factors: dict[int, dict[str, TensorInfo]]) -> list[AdapterEntry]:
    entries = []
    for task in plan.tasks:
        if adapted.get(task.module) is task:
            infix = "lora_embedding_{}" if task.kind == LORA_EMBEDDING else "lora_{}.weight"
            for half in "AB":
                source = factors[task.index][half]
                entries.append(AdapterEntry(f"{PEFT_PREFIX}{task.module}.{infix.format(half)}", source.shape, source))
    for task in saved:
        name = task.name
        if task.module in adapted:  # PEFT keeps the wrapped layer's own parameters under base_layer
            name = f"{task.module}.base_layer.{task.name[len(task.module) + 1:]}"
        entries.append(AdapterEntry(f"{PEFT_PREFIX}{name}", task.tuned.shape, task.tuned))
    embedding = _tied_embedding(plan, adapted, saved)
    if embedding is not None:  # PEFT's ensure_weight_tying loads the tied head's copy too: the embedding's
        head = f"{PEFT_PREFIX}{HEAD_NAME.rsplit('.', 1)[0]}"
        if embedding in saved:
            entries.append(AdapterEntry(f"{head}.weight", embedding.tuned.shape, embedding.tuned))
        else:  # head delta = embedding delta = (B_e @ A_e).T: lora_A = B_e.T, lora_B = A_e.T
            a, b = factors[embedding.index]["A"], factors[embedding.index]["B"]
            entries.append(AdapterEntry(f"{head}.lora_A.weight", b.shape[::-1], b, transpose=True))
            entries.append(AdapterEntry(f"{head}.lora_B.weight", a.shape[::-1], a, transpose=True))
    return entries


def _tied_embedding(plan: ExtractPlan, adapted: dict[str, ExtractTask], saved: list[ExtractTask]) -> Optional[ExtractTask]:
    """The input embedding's task when the output head is tied to it and the adapter changes it, else None."""
    if not plan.tied:
        return None
    changed = [t for t in (*adapted.values(), *saved) if embed_name([t.name])]
    return changed[0] if changed else None


def _paddle_entries(plan: ExtractPlan, adapted: dict[str, ExtractTask], saved: list[ExtractTask],
                    factors: dict[int, dict[str, TensorInfo]], rank: int) -> list[AdapterEntry]:
    entries = []
    for task in plan.tasks:
        if adapted.get(task.module) is task:
            a, b = factors[task.index]["A"], factors[task.index]["B"]
            entries.append(AdapterEntry(f"{task.module}.lora_A", (a.shape[0], rank), a))
            entries.append(AdapterEntry(f"{task.module}.lora_B", (rank, b.shape[1]), b))
    entries += [AdapterEntry(task.name, task.tuned.shape, task.tuned) for task in saved]
    return entries


def _peft_config(plan: ExtractPlan, adapted: dict[str, ExtractTask], saved: list[ExtractTask], ranks: dict[str, int],
                 common: int, base_model: str) -> dict:
    others = {re.escape(module): rank for module, rank in ranks.items() if rank != common}
    lora_only = any(task.module in adapted for task in saved)
    modules_to_save = sorted({task.module for task in saved if task.module not in adapted})
    tying = {"ensure_weight_tying": True} if _tied_embedding(plan, adapted, saved) else {}
    return {
        "peft_type": "LORA",
        "task_type": plan.task_type,
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "target_modules": target_modules(set(adapted), plan.base.tensors),
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "modules_to_save": modules_to_save or None,
        "bias": "lora_only" if lora_only else "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **tying,
    }


def _paddle_config(adapted: dict[str, ExtractTask], saved: list[ExtractTask], rank: int, base_model: str) -> dict:
    biases = [t for t in saved if t.module in adapted and t.name == f"{t.module}.bias"]
    trainable = [re.escape(t.name) for t in saved if t not in biases]
    return {
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": [re.escape(module) for module in adapted],
        "trainable_modules": trainable or None,
        "trainable_bias": "lora" if biases else None,
        "lora_dropout": 0.0,
        "merge_weights": False,
        "rslora": False,
        "scaling": 1.0,
    }


def target_modules(adapted: set[str], tensors) -> list[str]:
    """PEFT target_modules for exactly the ``adapted`` modules: a bare last name (``q_proj``) where every
    module of the model with that last name is adapted (PEFT matches it against any ``*.q_proj``), else
    the full names."""
    modules = {name.rsplit(".", 1)[0] for name in tensors if "." in name}
    every = {prefix for module in modules for prefix in _prefixes(module)}
    by_leaf: dict[str, set[str]] = collections.defaultdict(set)
    for module in adapted:
        by_leaf[module.rsplit(".", 1)[-1]].add(module)
    names = []
    for leaf, group in sorted(by_leaf.items()):
        owners = {m for m in every if m == leaf or m.endswith(f".{leaf}")}
        names += [leaf] if owners == group else sorted(group)
    return names


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _row(task: ExtractTask, result: dict) -> dict:
    """One report row: the tensor, what became of it, and for LoRA modules rank, error and energy kept."""
    row = {"tensor": task.name, "module": task.module, "shape": list(task.shape)}
    if task.kind in (LORA, LORA_EMBEDDING):
        status = task.kind if result["rank"] > 0 else ("unchanged" if result["delta_norm"] == 0 else "below_sv_epsilon")
        fields = ("rank", "relative_error", "energy_kept", "svd", "delta_norm", "max_singular_value")
        return {**row, "status": status, **{key: result[key] for key in fields}}
    if task.kind == EXCLUDED:
        return {**row, "status": "excluded", "differs": result["differs"]}
    return {**row, "status": "saved" if result["differs"] else "unchanged"}
