"""mergekit-moe recipes: the YAML read as mergekit-moe reads it, every value strictly typed.

Keys (mergekit's ``MoEMergeConfig``): ``base_model``, ``gate_mode``, ``dtype``, ``experts_per_token``,
``experts`` and ``shared_experts`` (each a list of ``source_model``, ``positive_prompts``,
``negative_prompts``, ``noise_scale``, ``residual_scale``), ``architecture``. Any other key is an error
naming it. Relative model paths are read beside the recipe, as for merge recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from llm_merge.config import types
from llm_merge.config.files import read_mapping_file
from llm_merge.config.recipe_files import parse_yaml
from llm_merge.config.recipe_parameters import model_path, refuse_unknown_keys
from llm_merge.config.recipes import _path_resolver
from llm_merge.errors import ConfigError

TOP_KEYS = {"base_model", "gate_mode", "dtype", "experts_per_token", "experts", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}

#: Router weights: random normal draws, uniform draws like torch.nn.Linear's initialization, the normalized
#: sum of the prompts' token embeddings, or the base's hidden states of the prompts at each layer (its last
#: token, as mergekit's ``hidden`` and ``hidden_last``; the mean over its tokens with ``hidden_avg``).
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
PROMPT_MODES = ("hidden", "cheap_embed", "hidden_avg", "hidden_last")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")

#: ``dtype`` values (mergekit also accepts them with a ``torch.`` prefix).
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert (or shared expert): the model whose MLPs it gets, and how its router row is made."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


@dataclass(frozen=True)
class MoeRecipe:
    """A parsed mergekit-moe recipe (paths resolved beside the recipe, defaults as mergekit's)."""

    base_model: str
    experts: tuple[ExpertSpec, ...]
    shared_experts: tuple[ExpertSpec, ...] = ()
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    architecture: Optional[str] = None

    def as_record(self) -> dict:
        """The recipe as JSON values (moe_config.json)."""
        def expert(spec: ExpertSpec) -> dict:
            return {"source_model": spec.source_model, "positive_prompts": list(spec.positive_prompts),
                    "negative_prompts": list(spec.negative_prompts), "noise_scale": spec.noise_scale,
                    "residual_scale": spec.residual_scale}

        return {"base_model": self.base_model, "gate_mode": self.gate_mode, "dtype": self.dtype,
                "experts_per_token": self.experts_per_token, "architecture": self.architecture,
                "experts": [expert(e) for e in self.experts], "shared_experts": [expert(e) for e in self.shared_experts]}


def parse_moe_recipe(recipe: dict, base_dir: Optional[Path] = None) -> MoeRecipe:
    """The recipe mapping as a MoeRecipe; ConfigError naming the key for anything mergekit-moe would not read
    (unknown keys, values of the wrong type) or that cannot make a working MoE (no experts, too few of them,
    prompts missing where the gate mode needs them, the same prompts for every expert)."""
    refuse_unknown_keys(recipe, TOP_KEYS, "recipe")
    resolve_path = _path_resolver(base_dir)
    if "base_model" not in recipe:
        raise ConfigError("recipe: base_model: required (the model whose attention, norms and embeddings the MoE gets)")
    base = resolve_path(model_path(recipe["base_model"], "base_model", lora_references=False))
    gate_mode = _choice(recipe, "gate_mode", GATE_MODES, "hidden")
    dtype = recipe.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPES:
            raise ConfigError(f"recipe: dtype: got {types.kind_of(dtype)}, expected one of {', '.join(DTYPES)}")
        dtype = dtype.removeprefix("torch.")
    experts_per_token = recipe.get("experts_per_token", 2)
    if not types.is_integer(experts_per_token) or experts_per_token < 1:
        raise ConfigError(f"recipe: experts_per_token: got {types.kind_of(experts_per_token)}, expected an integer >= 1")
    architecture = recipe.get("architecture")
    if architecture is not None and (not isinstance(architecture, str) or not architecture.strip()):
        raise ConfigError(f"recipe: architecture: got {types.kind_of(architecture)}, expected a name such as mixtral, qwen or qwen3")
    experts = _experts(recipe.get("experts"), "experts", resolve_path, required=True)
    shared = _experts(recipe.get("shared_experts"), "shared_experts", resolve_path, required=False)
    if len(experts) < experts_per_token:
        raise ConfigError(f"recipe: experts_per_token: {experts_per_token} but only {len(experts)} expert(s); "
                          "give at least as many experts as experts_per_token")
    parsed = MoeRecipe(base_model=base, experts=experts, shared_experts=shared, gate_mode=gate_mode, dtype=dtype,
                       experts_per_token=experts_per_token, architecture=architecture)
    check_prompts(parsed)
    return parsed


def check_prompts(recipe: MoeRecipe) -> None:
    """Prompt gate modes need positive prompts for every expert and shared expert, and prompts that tell the
    experts apart (mergekit refuses identical ones: every router row would be the same)."""
    if recipe.gate_mode not in PROMPT_MODES:
        return
    for where, group in (("experts", recipe.experts), ("shared_experts", recipe.shared_experts)):
        for index, expert in enumerate(group):
            if not expert.positive_prompts:
                raise ConfigError(f"recipe: {where}[{index}] ({expert.source_model}): positive_prompts: required with "
                                  f"gate_mode {recipe.gate_mode} (prompts that show what this expert is for); "
                                  "or use gate_mode random / uniform_random")
    prompts = {(e.positive_prompts, e.negative_prompts) for e in recipe.experts}
    if len(recipe.experts) > 1 and len(prompts) == 1:
        raise ConfigError("recipe: experts: every expert has the same positive and negative prompts, so every router "
                          "row would be the same; give each expert prompts that show what it is for")


def _choice(recipe: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = recipe.get(key, default)
    if value not in choices or not isinstance(value, str):
        raise ConfigError(f"recipe: {key}: got {types.kind_of(value)}, expected one of {', '.join(choices)}")
    return value


def _experts(entries: Any, where: str, resolve_path: Callable[[Optional[str]], Optional[str]], required: bool
             ) -> tuple[ExpertSpec, ...]:
    if entries is None and not required:
        return ()
    if not isinstance(entries, list) or (required and not entries):
        raise ConfigError(f"recipe: {where}: expected a list of {{source_model: ..., positive_prompts: [...]}}"
                          f"{'' if entries is None else f', got {types.kind_of(entries)}'}")
    return tuple(_expert(entry, f"{where}[{index}]", resolve_path) for index, entry in enumerate(entries))


def _expert(entry: Any, where: str, resolve_path: Callable[[Optional[str]], Optional[str]]) -> ExpertSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"recipe: {where}: got {types.kind_of(entry)}, expected a mapping with source_model")
    refuse_unknown_keys(entry, EXPERT_KEYS, f"recipe: {where}")
    if "source_model" not in entry:
        raise ConfigError(f"recipe: {where}: source_model: required")
    return ExpertSpec(
        source_model=resolve_path(model_path(entry["source_model"], f"{where}.source_model", lora_references=False)),
        positive_prompts=_prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
        noise_scale=_number(entry.get("noise_scale"), f"{where}.noise_scale", minimum=0.0),
        residual_scale=_number(entry.get("residual_scale"), f"{where}.residual_scale"),
    )


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"recipe: {where}: got {types.kind_of(value)}, expected a list of strings")
    return tuple(value)


def _number(value: Any, where: str, minimum: Optional[float] = None) -> Optional[float]:
    if value is None:
        return None
    if not types.is_number(value) or not math.isfinite(value) or not types.finite_float32(value):
        raise ConfigError(f"recipe: {where}: got {types.kind_of(value)}, expected a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"recipe: {where}: {value} must be >= {minimum:g}")
    return float(value)


def load_moe_recipe(path: str) -> MoeRecipe:
    """Read and parse a mergekit-moe YAML recipe (bounded read and alias expansion, as merge recipes);
    relative model paths are read beside it."""
    import yaml

    label = f"recipe {path}"
    recipe = read_mapping_file(path, parse_yaml, yaml.YAMLError, label, "YAML",
                               "a mapping with base_model, experts, gate_mode ...")
    return parse_moe_recipe(recipe, Path(path).resolve().parent)
