"""Output architectures of an MoE: which dense models each is built from, its tensor names and its config.json.

Tensor names are the per-expert ones every loader reads (transformers 4 and 5, vLLM, llama.cpp's converter):
transformers 5 fuses the experts of a layer into one tensor when it loads them (its weight conversion for
``mixtral`` and ``qwen2_moe``, also used for ``qwen3_moe``).

* **Mixtral** (``MixtralForCausalLM``), from Llama or Mistral models: expert ``e`` of layer ``i`` is
  ``model.layers.i.block_sparse_moe.experts.e.w1/w2/w3.weight`` (gate / down / up projections), the router
  ``model.layers.i.block_sparse_moe.gate.weight`` [experts, hidden]. No shared experts.
* **Qwen MoE** (``Qwen2MoeForCausalLM``), from Llama, Mistral or Qwen2 models: ``model.layers.i.mlp.experts.e.*``,
  the router ``mlp.gate.weight``, and one or more shared experts: their MLPs side by side along the
  intermediate dimension in ``mlp.shared_expert.*`` (which then computes the sum of their outputs exactly),
  gated by ``mlp.shared_expert_gate.weight`` [1, hidden] (sigmoid). Attention biases that the base lacks
  (Llama, Mistral) are written as zeros, as Qwen2-MoE attention has them.
* **Qwen3 MoE** (``Qwen3MoeForCausalLM``), from Qwen3 models: ``mlp.experts.e.*`` and ``mlp.gate.weight``.
  No shared experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from llm_merge.errors import ConfigError

#: The projections of a dense MLP (Llama naming).
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: ``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` -> (layer, projection).
MLP_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_COMMON = (r"model\.embed_tokens\.weight", r"lm_head\.weight", r"model\.norm\.weight",
           r"model\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm)\.weight",
           r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
#: Buffers some checkpoints hold that no loader needs; left out of the output.
DROPPED_PATTERN = re.compile(r"\.rotary_emb\.inv_freq$")
_MIXTRAL_PROJECTIONS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

#: Defaults of the dense config classes (transformers' LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config) for
#: the keys whose defaults differ in the MoE classes: written into the output's config.json when the base's
#: leaves them out, so that the MoE keeps the base's attention and norms.
_DENSE_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "sliding_window": 4096, "num_key_value_heads": 8},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128},
}
_ROPE_THETA_DEFAULT = 10000.0


@dataclass(frozen=True)
class Target:
    """One output architecture."""

    name: str  # mergekit's name, which recipes' ``architecture`` abbreviates ("Mixtral", "Qwen MoE", "Qwen3 MoE")
    architecture: str
    model_type: str
    inputs: tuple[str, ...]  # dense model types it is built from
    shared_expert: bool  # True: needs one or more shared experts; False: takes none
    extra_tensors: tuple[str, ...] = ()  # base tensors it keeps beyond _COMMON (regular expressions)

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        if self.model_type == "mixtral":
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_PROJECTIONS[projection]}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"

    def router_name(self, layer: int) -> str:
        block = "block_sparse_moe" if self.model_type == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def shared_name(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def keeps(self, name: str, base_config: dict) -> bool:
        """Whether a base tensor outside the MLPs has a place in this architecture (copied as it is)."""
        patterns = _COMMON + self.extra_tensors
        if self.model_type == "qwen3_moe" and base_config.get("attention_bias"):
            patterns += (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias",)
        return any(re.fullmatch(p, name) for p in patterns)


TARGETS = (
    Target("Mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), shared_expert=False),
    Target("Qwen MoE", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"), shared_expert=True,
           extra_tensors=(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias",)),
    Target("Qwen3 MoE", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), shared_expert=False,
           extra_tensors=(r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight",)),
)
#: Names the ``architecture`` key may also give in full (case-insensitive): class name or model type.
_ALIASES = {alias.lower(): target for target in TARGETS for alias in (target.architecture, target.model_type)}
_SUPPORTED = "mixtral (MixtralForCausalLM), qwen (Qwen2MoeForCausalLM), qwen3 (Qwen3MoeForCausalLM)"


def select_target(architecture: Optional[str], base_type: str, base_label: str, shared_count: int) -> Target:
    """The output architecture: the recipe's ``architecture`` (a case-insensitive prefix of a target's mergekit
    name, as mergekit matches it, or its class name / model type) among those that can be built from a
    ``base_type`` base with ``shared_count`` shared experts; Mixtral first when several fit (mergekit's rule).
    ConfigError explaining why none fits."""
    if architecture is None:
        candidates = list(TARGETS)
    elif architecture.lower() in _ALIASES:
        candidates = [_ALIASES[architecture.lower()]]
    else:
        candidates = [t for t in TARGETS if t.name.lower().startswith(architecture.lower())]
        if not candidates:
            extra = " (DeepSeek MoE output needs the model's remote code and is not supported)" \
                if "deepseek moe".startswith(architecture.lower()) else ""
            raise ConfigError(f"recipe: architecture: {architecture!r} names no output architecture{extra}; supported: {_SUPPORTED}")
    if not any(base_type in t.inputs for t in TARGETS):
        inputs = sorted({kind for t in TARGETS for kind in t.inputs})
        raise ConfigError(f"recipe: base_model {base_label} is a {base_type!r} model, which has no MoE form here "
                          f"(dense inputs: {', '.join(inputs)}; outputs: {_SUPPORTED})")
    reasons = []
    for target in candidates:
        reason = _unfit(target, base_type, shared_count)
        if reason is None:
            return target
        reasons.append(f"{target.name}: {reason}")
    raise ConfigError(f"recipe: no output architecture fits{'' if architecture is None else f' {architecture!r}'}: "
                      + "; ".join(reasons))


def _unfit(target: Target, base_type: str, shared_count: int) -> Optional[str]:
    if base_type not in target.inputs:
        return f"is built from {' / '.join(target.inputs)} models, the base is {base_type}"
    if target.shared_expert and not shared_count:
        return "needs shared_experts (one or more)"
    if not target.shared_expert and shared_count:
        return f"has no shared experts ({shared_count} given)"
    return None


def output_config(target: Target, base_config: dict, *, experts: int, experts_per_token: int, intermediate: int,
                  shared_intermediate: int, dtype: str) -> dict:
    """config.json of the MoE: the base's, with the target's class, expert counts and sizes, and explicit values
    for the keys the base left to its class's defaults where the MoE class's defaults differ."""
    config = {**_DENSE_DEFAULTS.get(base_config.get("model_type"), {}), **base_config}
    if "rope_theta" not in config and "rope_parameters" not in config:
        config["rope_theta"] = _ROPE_THETA_DEFAULT
    heads = config.get("num_attention_heads")
    config.setdefault("num_key_value_heads", heads)
    if heads and "hidden_size" in config:
        config.setdefault("head_dim", config["hidden_size"] // heads)
    config.update(architectures=[target.architecture], model_type=target.model_type, num_experts_per_tok=experts_per_token,
                  output_router_logits=False, router_aux_loss_coef=0.001, torch_dtype=dtype, dtype=dtype)
    if target.model_type == "mixtral":
        config.update(num_local_experts=experts, router_jitter_noise=0.0)
    else:
        config.update(num_experts=experts, moe_intermediate_size=intermediate, decoder_sparse_step=1, mlp_only_layers=[],
                      norm_topk_prob=True)
    if target.model_type == "qwen2_moe":
        config.update(shared_expert_intermediate_size=shared_intermediate, qkv_bias=True, use_sliding_window=False)
    return config
