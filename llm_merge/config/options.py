"""MergeConfig: every option of a merge, declared once, with its default, help and choices.

The command line (``llm_merge.cli.merge``) is generated from the dataclass fields; JSON config
files, recipes (``config.recipes``) and merge_config.json use the same field names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from llm_merge.config import types
from llm_merge.config.names import DEFAULT_LAYER_PATTERN
from llm_merge.io.gguf_output import GGUF_TYPES

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
    "nearswap": ("none", "nearswap"),
    "multislerp": ("none", "multislerp"),
    "karcher": ("none", "karcher"),
    "arcee_fusion": ("none", "arcee_fusion"),
    "sce": ("none", "sce"),
    "ram": ("none", "ram"),
    "ramplus_tl": ("none", "ramplus_tl"),
}


#: ``--semantics mergekit``: the sparsifier mergekit uses in place of each PaddleNLP one (llm_merge/methods/mergekit_sparsify.py).
MERGEKIT_SPARSIFY: dict[str, str] = {"trim": "magnitude", "dare": "random", "magprune": "della_magprune"}


SPARSIFY_TYPES = ("none", "dare", "trim", "magprune", "breadcrumbs", *MERGEKIT_SPARSIFY.values())


MERGE_TYPES = ("linear", "slerp", "ties", "task_arithmetic", "model_stock", "nuslerp", "passthrough", "nearswap", "multislerp",
               "karcher", "arcee_fusion", "sce", "ram", "ramplus_tl")


#: Options that may be given once per model (``{name}_list``), overriding the scalar for that model's sparsifier.
PER_MODEL_OPTIONS = ("reserve_p", "epsilon", "gamma")


#: Options that ``tensor_parameters`` may set per tensor (scalars, or one value per model for the *_list ones).
TENSOR_OPTIONS = ("weight_list", "normalize", "reserve_p", "epsilon", "gamma", "rescale", "scale", "slerp_alpha",
                  "reserve_p_list", "epsilon_list", "gamma_list", "nearswap_t",
                  "sce_select_topk", "ram_epsilon", "ramplus_r", "ramplus_alpha")


def _opt(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class MergeConfig:
    """All options of one merge. Field names are the CLI flag names."""

    model_path_list: list[str] = _opt(
        [], "checkpoint directories of the models to merge (in order); MODEL+LORA is MODEL with the LoRA adapter directory "
        "LORA folded in on the fly (nothing written). An existing path is taken as is, '+' and all; else it splits at its "
        "'+', or, with several, at the one whose left side exists"
    )
    output_path: Optional[str] = _opt(None, "directory to write the merged model to (required)")
    base_model_path: Optional[str] = _opt(
        None, "base model directory (or MODEL+LORA, as --model_path_list); when given, methods act on task vectors "
        "(model - base) and add the base back"
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
    recipe_hash: Optional[str] = _opt(
        None, "multi-document recipes: hash of the document and its inputs (set by recipe mode; an intermediate with the "
        "same hash is reused)")
    nuslerp_flatten: bool = _opt(True, "nuslerp: interpolate the whole tensor as one vector (false: each row, or each column with nuslerp_row_wise)")
    nuslerp_row_wise: bool = _opt(False, "nuslerp with nuslerp_flatten false: vectors along dimension 0 (columns of a matrix) instead of rows")
    model_stock_filter_wise: bool = _opt(False, "model_stock: one ratio t per row (mergekit filter_wise) instead of per tensor")
    nearswap_t: Optional[float] = _opt(
        None, "nearswap (required, > 0; mergekit's t): each entry moves from the base to the model where they differ "
        "by at most this, and by this much towards the model elsewhere")
    multislerp_normalize_weights: bool = _opt(True, "multislerp: divide the weights by their sum (mergekit's normalize_weights)")
    multislerp_eps: float = _opt(1e-8, "multislerp: added to each norm before dividing by it (mergekit's eps), >= 0")
    karcher_max_iter: int = _opt(
        10, "karcher: at most this many steps of the Karcher mean iteration on the unit sphere (mergekit's max_iter), >= 0")
    karcher_tol: float = _opt(
        1e-5, "karcher: tolerance (mergekit's tol): inputs with a norm <= tol are left out, the iteration stops when "
        "its step is shorter, and an input closer than tol radians to the mean does not pull it; >= 0")
    sce_select_topk: float = _opt(
        1.0, "sce: fraction of the entries kept in every task vector, those of largest variance across the models "
        "(mergekit's select_topk), in (0, 1]; 1 keeps all")
    ram_epsilon: float = _opt(
        1e-5, "ram / ramplus_tl: a task-vector entry takes part where |t| is above this (mergekit's epsilon), >= 0")
    ramplus_r: float = _opt(
        0.1, "ramplus_tl: how much a model's unique entries are scaled up: by 1 + r * min(shared/unique, alpha) "
        "(mergekit's r), >= 0")
    ramplus_alpha: float = _opt(0.2, "ramplus_tl: cap on a model's shared/unique entry ratio (mergekit's alpha), >= 0")
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
        "safetensors", "output files: {prefix}.safetensors shards, Paddle {model_state|master_weights}.pdparams shards, or one "
        "{prefix}.gguf file for llama.cpp (pip install 'llm_merge[gguf]')", ("safetensors", "pdparams", "gguf")
    )
    gguf_type: Optional[str] = _opt(
        None, "--output_format gguf: type of the matrices (1-D tensors, norms and biases stay F32; default: the merged dtype)",
        GGUF_TYPES,
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
        "tokenizers package), or one of the input model directories; its tokenizer files and vocab_size are used. With "
        "--semantics mergekit (recipes), mergekit's tokenizer merge: union builds a tokenizer holding every input's tokens "
        "and every model's embedding rows are permuted onto it, a token a model lacks taking another model's row (README)",
    )
    tokenizer_tokens: Optional[dict] = _opt(
        None,
        "--semantics mergekit with tokenizer_source (JSON/recipes only; a recipe's tokenizer.tokens): {token: {source: "
        "MODEL_DIR | {kind: zero} | {kind: model_token, model: DIR, token_id: N | token: TEXT}, force: bool}}: tokens "
        "added to the output vocabulary and where their embedding rows come from (force: for every model)",
    )
    pad_to_multiple_of: Optional[int] = _opt(
        None,
        "--semantics mergekit with tokenizer_source: pad the output vocabulary rows up to a multiple of this, > 0; each "
        "padding row is the mean of the model's token rows (vocab_size counts the padding)",
    )
    chat_template: Optional[str] = _opt(
        None,
        "chat template written to the output (chat_template.jinja): auto (the most common among the inputs), a built-in "
        "name (alpaca, chatml, exaone, llama3, mistral) or a Jinja template text",
    )
    layer_pattern: str = _opt(
        DEFAULT_LAYER_PATTERN,
        "regular expression with one group, the layer number, in tensor names",
    )
    start_method: Optional[str] = _opt(
        None, "how worker processes are started (default: the platform's)", ("fork", "spawn", "forkserver")
    )
    overwrite: bool = _opt(False, "replace a non-empty output_path (otherwise refused)")
    force: bool = _opt(
        False, "merge even when the compatibility check (sampled rows, before any work) finds a model that does not "
        "share the base; it is then a warning (see llm-merge inspect)"
    )
    dry_run: bool = _opt(
        False, "print the plan (tensors, bytes, shards, expected time and peak memory) without reading tensor data "
        "or writing anything"
    )
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


FIELD_TYPES = types.hints_of(MergeConfig)


#: options a slice's or a source's ``parameters`` may set (per model: weight and PER_MODEL_OPTIONS)
SLICE_OPTIONS = ("weight", *PER_MODEL_OPTIONS, "normalize", "rescale", "scale", "slerp_alpha", "nearswap_t", "sce_select_topk",
                 "ram_epsilon", "ramplus_r", "ramplus_alpha")

