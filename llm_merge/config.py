"""MergeConfig: every option of a merge, declared once, with its default, help and checks.

The CLI (``llm_merge.cli``) is generated from the dataclass fields; JSON config
files use the same field names. ``resolve`` validates a config and returns a
new, fully resolved one (nothing is modified in place, nothing touches disk).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llm_merge import option_types
from llm_merge.errors import ConfigError
from llm_merge.io import side_files
from llm_merge.names import DEFAULT_LAYER_PATTERN, compile_layer_pattern

#: merge_method -> (sparsify_type, merge_type). A new combination is one line here.
METHOD_TABLE: dict[str, tuple[str, str]] = {
    "linear": ("none", "linear"),
    "slerp": ("none", "slerp"),
    "ties": ("trim", "ties"),
    "della": ("magprune", "ties"),
    "della_linear": ("magprune", "linear"),
    "dare_linear": ("dare", "linear"),
    "dare_ties": ("dare", "ties"),
    "task_arithmetic": ("none", "task_arithmetic"),
    "breadcrumbs": ("breadcrumbs", "linear"),
    "breadcrumbs_ties": ("breadcrumbs", "ties"),
    "model_stock": ("none", "model_stock"),
    "nuslerp": ("none", "nuslerp"),
    "passthrough": ("none", "passthrough"),
}
#: ``--semantics mergekit``: the sparsifier mergekit uses in place of each PaddleNLP one (llm_merge/methods/mergekit_sparsify.py).
MERGEKIT_SPARSIFY: dict[str, str] = {"trim": "magnitude", "dare": "random", "magprune": "della_magprune"}
SPARSIFY_TYPES = ("none", "dare", "trim", "magprune", "breadcrumbs", *MERGEKIT_SPARSIFY.values())
MERGE_TYPES = ("linear", "slerp", "ties", "task_arithmetic", "model_stock", "nuslerp", "passthrough")
#: Options that may be given once per model (``{name}_list``), overriding the scalar for that model's sparsifier.
PER_MODEL_OPTIONS = ("reserve_p", "epsilon", "gamma")
#: Options that ``tensor_parameters`` may set per tensor (scalars, or one value per model for the *_list ones).
TENSOR_OPTIONS = ("weight_list", "normalize", "reserve_p", "epsilon", "gamma", "rescale", "scale", "slerp_alpha",
                  "reserve_p_list", "epsilon_list", "gamma_list")


def _opt(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class MergeConfig:
    """All options of one merge. Field names are the CLI flag names."""

    model_path_list: list[str] = _opt([], "checkpoint directories of the models to merge (in order)")
    output_path: Optional[str] = _opt(None, "directory to write the merged model to (required)")
    base_model_path: Optional[str] = _opt(
        None, "base model directory; when given, methods act on task vectors (model - base) and add the base back"
    )
    merge_method: Optional[str] = _opt(
        None,
        "merge method; selects sparsify_type and merge_type (linear when neither is given)",
        tuple(METHOD_TABLE),
    )
    merge_type: Optional[str] = _opt(
        None, "how sparsified inputs are combined; only for a custom pairing or to restate merge_method's", MERGE_TYPES
    )
    sparsify_type: Optional[str] = _opt(
        None, "how each input is sparsified; only for a custom pairing or to restate merge_method's", SPARSIFY_TYPES
    )
    semantics: str = _opt(
        "paddlenlp",
        "meaning of reserve_p / epsilon / rescale in the sparsifying methods: PaddleNLP's (trim keeps ceil(p*n) by a "
        "whole-tensor threshold, dare and magprune divide kept entries by their keep probability, magprune ranks the "
        "whole tensor over p +- epsilon/2), or mergekit's (ties keeps int(p*n), della ranks within rows over "
        "p +- epsilon, rescale restores the L1 norm; the default of YAML recipes); see README",
        ("paddlenlp", "mergekit"),
    )
    weight_list: Optional[list[float]] = _opt(
        None, "one weight per model (default: all 1); used by linear and ties merges, ignored by slerp"
    )
    normalize: bool = _opt(True, "divide by the sum of weights (linear) or of the agreeing weights (ties)")
    reserve_p: float = _opt(0.7, "fraction of each task vector kept by dare/trim/magprune, in (0, 1]")
    epsilon: float = _opt(
        0.14, "magprune (DELLA) spread of drop probabilities over ranks, in [0, 1); needs epsilon/2 < reserve_p <= 1 - epsilon/2"
    )
    reserve_p_list: Optional[list[float]] = _opt(
        None, "one reserve_p per model (overrides reserve_p for that model's sparsifier; mergekit's per-model density)"
    )
    epsilon_list: Optional[list[float]] = _opt(None, "one epsilon per model (overrides epsilon for that model)")
    gamma: float = _opt(0.01, "breadcrumbs: fraction of the largest-magnitude entries dropped as outliers, in [0, 1]")
    gamma_list: Optional[list[float]] = _opt(None, "one gamma per model (overrides gamma for that model)")
    scale: float = _opt(
        1.0, "multiply the merged result (the merged task vector with a base) by this before adding the base (mergekit's lambda)"
    )
    tensor_parameters: Optional[dict] = _opt(
        None,
        "per-tensor option values (JSON/recipes only): {option: value} where value is a scalar, a list interpolated "
        "over the layers (mergekit gradient) or [{filter: substring, value: ...}, ...]; *_list / weight_list take one "
        "such value per model",
    )
    slices: Optional[list] = _opt(
        None,
        "output layers from layer ranges of the inputs (JSON/recipes only, any merge method): [{sources: [{model: dir, "
        "layer_range: [start, end], parameters: {...}}, ...], parameters: {...}}, ...] ({model, layer_range} alone is a "
        "one-source slice); each slice merges its sources layer by layer, the source from --base_model_path being the "
        "base; layers are renumbered in order and config.json's num_hidden_layers set to their count; model_path_list "
        "lists the first slice's other sources",
    )
    model_card: bool = _opt(False, "write a README.md model card (method, models, options, recipe) into the output")
    recipe_text: Optional[str] = _opt(None, "the mergekit recipe this merge was made from (set by recipe mode; shown in the model card)")
    nuslerp_flatten: bool = _opt(True, "nuslerp: interpolate the whole tensor as one vector (false: each row, or each column with nuslerp_row_wise)")
    nuslerp_row_wise: bool = _opt(False, "nuslerp with nuslerp_flatten false: vectors along dimension 0 (columns of a matrix) instead of rows")
    model_stock_filter_wise: bool = _opt(False, "model_stock: one ratio t per row (mergekit filter_wise) instead of per tensor")
    rescale: bool = _opt(True, "rescale kept entries after sparsifying (dare/magprune: 1/keep probability; trim: keep the L1 mass)")
    ties_elect_type: str = _opt("sum", "ties sign election: sign of the summed values, or majority of signs", ("sum", "count"))
    slerp_alpha: float = _opt(0.5, "slerp interpolation factor t in [0, 1]: 0 gives the first model, 1 the second")
    slerp_normalize_eps: float = _opt(1e-8, "slerp: tensors with a norm below this are not normalized, > 0")
    slerp_dot_threshold: float = _opt(
        0.9995, "slerp: when |cos| of the two tensors exceeds this, interpolate linearly, in (0, 1]"
    )
    seed: int = _opt(42, "seed of the counter-based random draws of dare and magprune (results depend on nothing else)")
    n_process: int = _opt(1, "number of worker processes; changes speed only, never the output bytes, >= 1")
    merge_prefix: str = _opt("model", "checkpoint file prefix: {prefix}.safetensors[.index.json]", ("model", "master_weights"))
    tensor_type: str = _opt("np", "compute backend: NumPy, or Paddle (pip install 'llm_merge[paddle]')", ("np", "pd"))
    device: str = _opt("cpu", "device for --tensor_type pd; low_gpu_mem streams one model at a time onto the GPU", ("cpu", "gpu", "low_gpu_mem"))
    output_dtype: Optional[str] = _opt(None, "dtype of merged float tensors (default: the first model's dtype)", ("bfloat16", "float16", "float32"))
    max_shard_size: str = _opt("5GB", "largest output shard, e.g. 5GB, 500MB, 2GiB or a byte count")
    allow_pickle: bool = _opt(
        False,
        "read .pdparams inputs (model_state / master_weights .pdparams[.index.json], used when a directory has no "
        "safetensors): they are Python pickles, which can execute code when loaded; only for trusted checkpoints",
    )
    output_format: str = _opt(
        "safetensors", "output files: {prefix}.safetensors shards, or Paddle {model_state|master_weights}.pdparams shards", ("safetensors", "pdparams")
    )
    on_missing_tensor: str = _opt(
        "error",
        "a tensor missing from some inputs: error; base: take it from the base model (or, when the base lacks it too, "
        "merge it over the models that have it); skip: leave it out of the output",
        ("error", "base", "skip"),
    )
    tokenizer_source: Optional[str] = _opt(
        None,
        "output vocabulary when embedding / lm_head row counts differ: base, union (tokens matched by string with the "
        "tokenizers package), or one of the input model directories; its tokenizer files and vocab_size are used",
    )
    layer_pattern: str = _opt(
        DEFAULT_LAYER_PATTERN,
        "regular expression with one group, the layer number, in tensor names",
    )
    start_method: Optional[str] = _opt(
        None, "how worker processes are started (default: the platform's)", ("fork", "spawn", "forkserver")
    )
    overwrite: bool = _opt(False, "replace a non-empty output_path (otherwise refused)")
    quiet: bool = _opt(False, "no progress bar (it is also off when stderr is not a terminal)")
    # -- one merge across many processes / nodes (llm_merge/distributed.py); merge_config.json records their defaults
    rank: Optional[int] = _opt(
        None,
        "this process's rank in a multi-node merge, in [0, world_size); with --world_size "
        "(default: PADDLE_TRAINER_ID from paddle.distributed.launch, SLURM_PROCID under srun, else single process)",
    )
    world_size: Optional[int] = _opt(
        None,
        "number of ranks sharing one merge through the shared output filesystem; with --rank "
        "(default: PADDLE_TRAINERS_NUM, SLURM_STEP_NUM_TASKS / SLURM_NTASKS, else 1)",
    )
    resume: bool = _opt(
        False, "multi-rank merge: reuse the interrupted run's staging directory and skip tensors already written and verified (crc32)"
    )
    dist_timeout: float = _opt(86400.0, "multi-rank merge: seconds a rank waits for the others (rank 0 for every rank's done marker), > 0")
    dist_heartbeat_timeout: float = _opt(
        60.0, "multi-rank merge: seconds without a heartbeat after which a rank is declared dead, > 0 (give every rank the same value)"
    )

    @property
    def weights(self) -> list[float]:
        """weight_list, or 1 per model."""
        return list(self.weight_list) if self.weight_list is not None else [1.0] * len(self.model_path_list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(MergeConfig))
FIELD_TYPES = option_types.hints_of(MergeConfig)


def config_from_dict(values: dict[str, Any], source: str = "config") -> MergeConfig:
    """Build a MergeConfig from a dict, rejecting unknown keys and values of the wrong type by name."""
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(FIELD_NAMES))}")
    check_types(values, source)
    return MergeConfig(**values)


def check_types(values: dict[str, Any], source: str) -> None:
    """Every value has its option's type (no truthiness, no numbers in strings), or ConfigError naming it."""
    for name, value in values.items():
        problem = option_types.type_problem(name, value, FIELD_TYPES[name])
        if problem:
            raise ConfigError(f"{source}: {problem}")
    for name in ("tensor_parameters",):
        if isinstance(values.get(name), dict):
            for option, setting in values[name].items():
                if option in TENSOR_OPTIONS:
                    check_setting(setting, _setting_kind(option), f"{source}: tensor_parameters.{option}",
                                  per_model=option.endswith("_list"))


def _setting_kind(option: str) -> str:
    """``bool`` or ``number``: the type of every value a per-tensor setting of ``option`` may hold."""
    hint = FIELD_TYPES.get(option.removesuffix("_list") if option != "weight_list" else option)
    return "bool" if hint is bool else "number"


def check_setting(setting: Any, kind: str, where: str, per_model: bool = False) -> None:
    """A per-tensor setting (scalar, gradient list, ``{filter, value}`` entries; ``per_model``: one per model)
    holds only values of ``kind`` (``bool`` or ``number``), or ConfigError naming ``where``."""
    if per_model:
        if not isinstance(setting, list):
            raise ConfigError(f"{where}: got {option_types.kind_of(setting)}, expected a list with one setting per model")
        for k, item in enumerate(setting):
            check_setting(item, kind, f"{where}[{k}]")
        return
    fits = isinstance(setting, bool) if kind == "bool" else option_types.is_number(setting)
    if fits:
        if kind == "number" and not math.isfinite(setting):
            raise ConfigError(f"{where}: {setting} is not a finite number")
        return
    if isinstance(setting, dict):
        if "value" not in setting or set(setting) - {"filter", "value"}:
            raise ConfigError(f"{where}: expected {{filter: ..., value: ...}}, got keys {', '.join(map(str, setting))}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ConfigError(f"{where}.filter: got {option_types.kind_of(setting['filter'])}, expected a string or null")
        check_setting(setting["value"], kind, f"{where}.value")
    elif isinstance(setting, list) and setting:
        for i, item in enumerate(setting):
            check_setting(item, kind, f"{where}[{i}]")
    else:
        wanted = "true or false" if kind == "bool" else "a number"
        raise ConfigError(f"{where}: got {option_types.kind_of(setting)}, expected {wanted}, a list of them or filter entries")


def read_mapping_file(path: str | os.PathLike, parse, parse_error: type[Exception], label: str, fmt: str,
                      expected: str, error: type[Exception] = ConfigError) -> dict:
    """``parse`` of a file's text (a bounded read: ``side_files``), which must be a mapping;
    ``error`` starting with ``label`` otherwise."""
    return parse_mapping(side_files.read_text(path, label, error=error), parse, parse_error, label, fmt, expected, error)


def parse_mapping(text: str, parse, parse_error: type[Exception], label: str, fmt: str, expected: str,
                  error: type[Exception] = ConfigError) -> dict:
    """``parse(text)``, which must be a mapping; ``error`` starting with ``label`` otherwise."""
    try:
        values = parse(text)
    except parse_error as exc:
        raise error(f"{label}: not valid {fmt} ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise error(f"{label}: nested too deeply") from None
    if not isinstance(values, dict):
        raise error(f"{label}: expected {expected}")
    return values


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config file into a dict of field values (checked by ``config_from_dict``)."""
    return read_mapping_file(path, json.loads, json.JSONDecodeError, f"config file {path}", "JSON", "a JSON object of options")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``5GB`` (10^9), ``2GiB`` (2^30), ``500MB`` or ``1048576``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max_shard_size: {text!r} is not a size like 5GB, 500MB, 2GiB or a byte count")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[(unit or "").upper()])
    if size <= 0:
        raise ConfigError(f"--max_shard_size: {text!r} must be positive")
    return size


def resolve(cfg: MergeConfig) -> MergeConfig:
    """Validate ``cfg`` and return a resolved copy (method pairing and weights filled in)."""
    check_types({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "options")
    _check_choices(cfg)
    sparsify_type, merge_type, merge_method = _resolve_method(cfg)
    n_models = len(cfg.model_path_list)
    if n_models == 0:
        raise ConfigError("--model_path_list: at least one model directory is required")
    if not cfg.output_path:
        raise ConfigError("--output_path: required")
    weights = [float(w) for w in cfg.weights]
    if len(weights) != n_models:
        raise ConfigError(f"--weight_list: {len(weights)} weight(s) given for {n_models} model(s); give one per model")
    _check_float32("--weight_list", weights)
    if merge_type in ("slerp", "nuslerp") and n_models != 2:
        raise ConfigError(f"--model_path_list: {merge_type} merges exactly 2 models, got {n_models}")
    if cfg.slices is not None:
        _check_slices(cfg)
    if merge_type == "passthrough" and (n_models != 1 or cfg.base_model_path):
        raise ConfigError(f"--merge_method passthrough: copies exactly 1 model without a base, got {n_models} model(s)"
                          + (" and a base" if cfg.base_model_path else ""))
    if merge_type == "model_stock" and (n_models < 2 or not cfg.base_model_path):
        raise ConfigError("--merge_method model_stock: needs --base_model_path and at least 2 models")
    for name in PER_MODEL_OPTIONS:
        values = getattr(cfg, f"{name}_list")
        if values is not None and len(values) != n_models:
            raise ConfigError(f"--{name}_list: {len(values)} value(s) given for {n_models} model(s); give one per model")
        for value in values or []:
            _check_option(name, value, sparsify_type, cfg.epsilon)
    _check_range("gamma", cfg.gamma, 0.0, 1.0)
    _check_float32("--scale", [cfg.scale])
    if cfg.tensor_parameters is not None:
        if not isinstance(cfg.tensor_parameters, dict):
            raise ConfigError("tensor_parameters: expected an object of {option: value}")
        unknown = sorted(set(cfg.tensor_parameters) - set(TENSOR_OPTIONS))
        if unknown:
            raise ConfigError(f"tensor_parameters: option(s) {', '.join(unknown)} cannot vary per tensor; valid: {', '.join(TENSOR_OPTIONS)}")
    if merge_type == "linear" and cfg.normalize and sum(weights) == 0:
        raise ConfigError(f"--weight_list: {weights} sums to 0, cannot normalize; use --normalize false")
    _check_range("reserve_p", cfg.reserve_p, 0.0, 1.0, low_open=True)
    _check_range("epsilon", cfg.epsilon, 0.0, 1.0, high_open=True)
    if sparsify_type == "della_magprune":
        check_della_models(cfg.reserve_p_list or [cfg.reserve_p] * n_models, cfg.epsilon_list or [cfg.epsilon] * n_models,
                           "--reserve_p / --epsilon")
    if sparsify_type == "magprune":
        low, high = cfg.epsilon / 2, 1 - cfg.epsilon / 2
        if not low < cfg.reserve_p <= high + 1e-12:  # 1 - 0.14/2 is 0.9299999999999999 in floats
            raise ConfigError(
                f"--reserve_p: {cfg.reserve_p} out of range ({low:g}, {high:g}] for epsilon={cfg.epsilon:g} "
                "(magprune needs every drop probability in [0, 1))"
            )
    _check_range("slerp_alpha", cfg.slerp_alpha, 0.0, 1.0)
    _check_range("slerp_dot_threshold", cfg.slerp_dot_threshold, 0.0, 1.0, low_open=True)
    if not (math.isfinite(cfg.slerp_normalize_eps) and cfg.slerp_normalize_eps > 0):
        raise ConfigError(f"--slerp_normalize_eps: {cfg.slerp_normalize_eps} must be > 0")
    if not isinstance(cfg.n_process, int) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process} must be an integer >= 1")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"--seed: {cfg.seed} must be a non-negative integer")
    if cfg.tensor_type == "np" and cfg.device != "cpu":
        raise ConfigError(f"--device: {cfg.device} needs --tensor_type pd (the NumPy backend runs on the CPU)")
    parse_size(cfg.max_shard_size)
    if cfg.tokenizer_source == "base" and not cfg.base_model_path:
        raise ConfigError("--tokenizer_source base: needs --base_model_path")
    compile_layer_pattern(cfg.layer_pattern)
    _check_distributed(cfg)
    _check_output_path(cfg)
    return dataclasses.replace(
        cfg,
        merge_method=merge_method,
        merge_type=merge_type,
        sparsify_type=sparsify_type,
        weight_list=weights,
        model_path_list=list(cfg.model_path_list),
    )


def check_della_models(reserve_ps: list[float], epsilons: list[float], where: str) -> None:
    """mergekit's della range (density ± epsilon in (0, 1)) for every model, or ConfigError naming the model."""
    from llm_merge.methods.mergekit_sparsify import check_della_range

    for k, (p, eps) in enumerate(zip(reserve_ps, epsilons)):
        problem = check_della_range(p, eps)
        if problem:
            raise ConfigError(f"{where} (model {k}): {problem}")


#: options a slice's or a source's ``parameters`` may set (per model: weight and PER_MODEL_OPTIONS)
SLICE_OPTIONS = ("weight", *PER_MODEL_OPTIONS, "normalize", "rescale", "scale", "slerp_alpha")


def _check_slices(cfg: MergeConfig) -> None:
    """slices agree with model_path_list (the first slice's input sources) and name known options."""
    from llm_merge.slices import check_slices, split_sources

    slices = check_slices(cfg.slices)
    inputs, _ = split_sources(slices, cfg.base_model_path)
    first = [src.model for src in inputs[0]]
    if [os.path.normpath(p) for p in cfg.model_path_list] != [os.path.normpath(p) for p in first]:
        raise ConfigError(f"slices: --model_path_list must list the first slice's sources besides the base, in order: {first}")
    for i, s in enumerate(slices):
        for where, params in [(f"slices[{i}].parameters", s.parameters)] + [
                (f"slices[{i}].sources[{j}].parameters", src.parameters) for j, src in enumerate(s.sources)]:
            unknown = sorted(set(params) - set(SLICE_OPTIONS))
            if unknown:
                raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(SLICE_OPTIONS)}")
            for option, setting in params.items():
                check_setting(setting, _setting_kind(option), f"{where}.{option}")


def _check_option(name: str, value: Any, sparsify_type: Optional[str], epsilon: float) -> None:
    """Range check of one (per-model or per-tensor) option value."""
    if name == "reserve_p":
        _check_range(name, value, 0.0, 1.0, low_open=True)
    elif name == "epsilon":
        _check_range(name, value, 0.0, 1.0, high_open=True)
    elif name in ("gamma", "slerp_alpha"):
        _check_range(name, value, 0.0, 1.0)
    elif name in ("scale", "weight"):
        _check_float32(name, [value])


def _check_float32(flag: str, values: list[float]) -> None:
    """Weights and factors stay finite in float32, where merges use them, and so does their absolute sum
    (a linear or TIES merge adds weighted values: 1e38 + 1e38 overflows)."""
    for value in values:
        if not option_types.finite_float32(value):
            raise ConfigError(f"--{flag.lstrip('-')}: {value} is non-finite in float32, where merges use it "
                              f"(|value| must be <= {option_types.FLOAT32_MAX:.4g})")
    if not option_types.finite_float32(math.fsum(abs(v) for v in values)):
        raise ConfigError(f"--{flag.lstrip('-')}: {values} sum past the float32 range ({option_types.FLOAT32_MAX:.4g})")


def _check_choices(cfg: MergeConfig) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{f.name}: {value!r} is not one of {', '.join(choices)}")


def _resolve_method(cfg: MergeConfig) -> tuple[str, str, Optional[str]]:
    if cfg.merge_method is not None:
        sparsify_type, merge_type = METHOD_TABLE[cfg.merge_method]
        if cfg.semantics == "mergekit":
            sparsify_type = MERGEKIT_SPARSIFY.get(sparsify_type, sparsify_type)
        for flag, given, implied in (("sparsify_type", cfg.sparsify_type, sparsify_type), ("merge_type", cfg.merge_type, merge_type)):
            if given is not None and given != implied:
                raise ConfigError(
                    f"--{flag}: {given!r} contradicts --merge_method {cfg.merge_method} (which uses {flag} {implied!r}); "
                    f"drop --{flag} or --merge_method"
                )
        return sparsify_type, merge_type, cfg.merge_method
    sparsify_type = cfg.sparsify_type or "none"
    merge_type = cfg.merge_type or "linear"
    named = [name for name, pair in METHOD_TABLE.items() if pair == (sparsify_type, merge_type)]
    return sparsify_type, merge_type, (named[0] if named else None)


def _check_range(flag: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"--{flag}: {value} out of range {interval}")


def input_paths(cfg: MergeConfig) -> list[str]:
    """Every directory a merge reads: models, base, slice sources and a tokenizer source given as a path."""
    from llm_merge.slices import check_slices

    paths = [*cfg.model_path_list, *([cfg.base_model_path] if cfg.base_model_path else [])]
    if cfg.slices is not None:
        paths += [src.model for s in check_slices(cfg.slices) for src in s.sources]
    if cfg.tokenizer_source not in (None, "base", "union"):
        paths.append(cfg.tokenizer_source)
    return list(dict.fromkeys(paths))


def _check_output_path(cfg: MergeConfig) -> None:
    check_output_apart(cfg.output_path, [("input", given) for given in input_paths(cfg)])


def check_output_apart(output_path: str, inputs: list[tuple[str, str]]) -> None:
    """The output is none of the inputs, inside none and holds none, and holds neither the current nor the
    home directory: ``--overwrite`` can never replace an input or the directory the user works in.
    ``inputs``: (what, path) pairs, ``what`` naming the flag or role in the message."""
    output = Path(os.path.realpath(output_path))
    for what, given in inputs:
        source = Path(os.path.realpath(given))
        if output == source or source in output.parents:
            raise ConfigError(f"--output_path: {output_path} is {'the same as' if output == source else 'inside'} {what} {given}; "
                              "choose another directory")
        if output in source.parents:
            raise ConfigError(f"--output_path: {output_path} contains {what} {given}; choose another directory")
    for what, place in (("the current directory", os.getcwd()), ("the home directory", os.path.expanduser("~"))):
        place = Path(os.path.realpath(place))
        if output == place or output in place.parents:
            raise ConfigError(f"--output_path: {output_path} is or contains {what}; choose another directory")


def _check_distributed(cfg: MergeConfig) -> None:
    if (cfg.rank is None) != (cfg.world_size is None):
        raise ConfigError("--rank and --world_size: give both or neither")
    if cfg.world_size is not None:
        if not isinstance(cfg.world_size, int) or cfg.world_size < 1:
            raise ConfigError(f"--world_size: {cfg.world_size} must be an integer >= 1")
        if not isinstance(cfg.rank, int) or not 0 <= cfg.rank < cfg.world_size:
            raise ConfigError(f"--rank: {cfg.rank} out of range [0, {cfg.world_size})")
    if not (isinstance(cfg.dist_timeout, (int, float)) and math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
        raise ConfigError(f"--dist_timeout: {cfg.dist_timeout} must be > 0 seconds")
    heartbeat_timeout = cfg.dist_heartbeat_timeout
    if not (option_types.is_number(heartbeat_timeout) and math.isfinite(heartbeat_timeout) and heartbeat_timeout > 0):
        raise ConfigError(f"--dist_heartbeat_timeout: {heartbeat_timeout} must be a finite number of seconds > 0")
