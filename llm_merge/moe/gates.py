"""Router weights of every layer, as mergekit-moe's ``get_gate_params`` makes them.

* ``random``: standard normal draws; ``uniform_random``: uniform on [-1/sqrt(hidden), 1/sqrt(hidden)) (what
  torch.nn.Linear's initialization gives a router). Counter-based, keyed by ``--seed`` and the router
  tensor's name, so a seed always gives the same router.
* ``cheap_embed``: the sum of the base's token embeddings over every token of an expert's positive prompts,
  normalized; minus the same of its negative prompts; normalized again. The same rows for every layer.
* ``hidden`` / ``hidden_last`` / ``hidden_avg``: per layer, the mean over an expert's positive prompts of the
  base's hidden state at that layer's input (of the prompt's last token; ``hidden_avg``: the mean over its
  tokens), minus the same of its negative prompts, normalized (``moe.hidden``).

Several shared experts (Qwen MoE) share one sigmoid gate: the normalized sum of their rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from llm_merge.io.reader import TensorReader
from llm_merge.moe import draws
from llm_merge.moe.hidden import check_runnable, prompt_hidden_states
from llm_merge.moe.plan import MoePlan
from llm_merge.moe.prompts import PromptTokenizer
from llm_merge.moe.recipe import HIDDEN_MODES, PROMPT_MODES

log = logging.getLogger(__name__)
#: Norms are clamped to at least this before dividing (mergekit's clamp).
NORM_FLOOR = 1e-8
#: A layer whose router rows have a condition number above this routes poorly (mergekit warns likewise).
DEGENERATE_CONDITION = 5.0
_EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class ExpertPrompts:
    """One expert's prompts as token ids."""

    positive: tuple[tuple[int, ...], ...]
    negative: tuple[tuple[int, ...], ...]


def encode_prompts(plan: MoePlan) -> Optional[tuple[ExpertPrompts, ...]]:
    """Every expert's (then every shared expert's) prompts as token ids, for the prompt gate modes (None for the
    random ones). Raises ConfigError / MergeError before any work: no tokenizer, no tokenizers package, no
    torch for ``hidden``, a prompt without tokens."""
    mode = plan.recipe.gate_mode
    if mode not in PROMPT_MODES:
        return None
    need = f"gate_mode {mode}"
    tokenizer = PromptTokenizer(plan.base.path, need)
    if mode in HIDDEN_MODES:
        check_runnable(plan.base_config, need)
    rows = plan.base.tensors[_EMBED].shape[0]
    encoded = []
    for where, group in (("experts", plan.recipe.experts), ("shared_experts", plan.recipe.shared_experts)):
        for index, expert in enumerate(group):
            def ids(prompts, kind):
                return tuple(tuple(t) for t in tokenizer.encode_all(prompts, f"{where}[{index}].{kind}", rows))

            encoded.append(ExpertPrompts(ids(expert.positive_prompts, "positive_prompts"), ids(expert.negative_prompts, "negative_prompts")))
    return tuple(encoded)


def compute_gates(plan: MoePlan, prompts: Optional[tuple[ExpertPrompts, ...]], seed: int
                  ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(routed [layers, experts, hidden], shared [layers, 1, hidden] or None) in float32."""
    mode = plan.recipe.gate_mode
    routed_count, has_shared = len(plan.recipe.experts), bool(plan.recipe.shared_experts)
    if mode in ("random", "uniform_random"):
        routed = np.stack([_drawn(mode, seed, plan.target.router_name(i), routed_count, plan.hidden) for i in range(plan.layers)])
        shared = np.stack([_drawn(mode, seed, plan.target.shared_gate_name(i), 1, plan.hidden)
                           for i in range(plan.layers)]) if has_shared else None
        return routed, shared
    rows = _prompt_rows(plan, prompts)  # [gated experts, layers, hidden]
    routed = np.ascontiguousarray(rows[:routed_count].transpose(1, 0, 2))
    _warn_degenerate(routed)
    if not has_shared:
        return routed, None
    shared = _normalized(rows[routed_count:].sum(axis=0))[:, None, :]
    return routed, np.ascontiguousarray(shared, dtype=np.float32)


def _drawn(mode: str, seed: int, name: str, count: int, hidden: int) -> np.ndarray:
    key = draws.stream_key(seed, name)
    if mode == "random":
        return draws.normal(key, 0, count * hidden).reshape(count, hidden)
    bound = math.sqrt(1.0 / hidden)
    return ((draws.uniform(key, 0, count * hidden) * 2.0 - 1.0) * bound).astype(np.float32).reshape(count, hidden)


def _prompt_rows(plan: MoePlan, prompts: tuple[ExpertPrompts, ...]) -> np.ndarray:
    """[gated experts, layers, hidden]: each expert's normalized positive-minus-negative vector per layer."""
    if plan.recipe.gate_mode == "cheap_embed":
        with TensorReader() as reader:
            info = plan.base.tensors[_EMBED]
            vectors = []
            for expert in prompts:
                vector = _embedding_vector(reader, info, expert.positive)
                if expert.negative:
                    vector = vector - _embedding_vector(reader, info, expert.negative)
                vectors.append(np.repeat(_normalized(vector)[None], plan.layers, axis=0))
        return np.stack(vectors)
    flat = [ids for expert in prompts for ids in (*expert.positive, *expert.negative)]
    last = plan.recipe.gate_mode != "hidden_avg"
    states = prompt_hidden_states(plan.base, plan.base_config, flat, plan.layers, last_token=last).astype(np.float64)
    vectors, start = [], 0
    for expert in prompts:
        positive = states[start:start + len(expert.positive)].mean(axis=0)
        start += len(expert.positive)
        if expert.negative:
            positive = positive - states[start:start + len(expert.negative)].mean(axis=0)
            start += len(expert.negative)
        vectors.append(_normalized(positive))
    return np.stack(vectors)


def _embedding_vector(reader: TensorReader, info, prompts: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """The normalized sum of the embedding rows of every token of ``prompts`` (rows read one at a time)."""
    total = np.zeros(info.shape[1], dtype=np.float64)
    row = np.empty(info.shape[1], dtype=np.float32)
    for ids in prompts:
        for token in ids:
            total += reader.read_f32(info, token * info.shape[1], row)
    return _normalized(total)


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` divided by their L2 norm along the last axis (at least NORM_FLOOR), as float32."""
    norms = np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), NORM_FLOOR)
    return (vectors / norms).astype(np.float32)


def _warn_degenerate(routed: np.ndarray) -> None:
    """Warn about layers whose router rows are nearly dependent: prompts too alike to tell the experts apart."""
    if routed.shape[1] < 2:
        return
    bad = [layer for layer in range(routed.shape[0]) if np.linalg.cond(routed[layer].astype(np.float64)) > DEGENERATE_CONDITION]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        log.warning("router rows of %d of %d layers are nearly dependent (condition number > %g; layers %s): the prompts "
                    "may be too alike, and some experts will be seldom used", len(bad), routed.shape[0], DEGENERATE_CONDITION, shown)
