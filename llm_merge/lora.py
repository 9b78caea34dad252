"""Fold LoRA adapters into base weights: options, adapter discovery, pairing and the checked plan.

Nothing here reads base tensor data: the plan is built from safetensors headers,
the adapter's config file and the adapter tensors' shapes, and every problem
(unpaired lora_A/lora_B, targets missing from the base, shapes that do not fit)
is raised here, before any output is written. ``llm_merge.lora_merge`` executes
the plan.

Two adapter formats (``detect_format``):

* Hugging Face PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``;
  ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
  (embeddings: ``lora_embedding_A`` / ``lora_embedding_B``); delta = B @ A, [out, in].
* PaddleNLP: ``lora_config.json`` + ``lora_model_state.pdparams`` (a pickle, only with
  ``allow_pickle``) or ``lora_model.safetensors`` / ``lora_model_state.safetensors``;
  ``<module>.lora_A`` [in, r] and ``<module>.lora_B`` [r, out]; delta = A @ B, [in, out].

The base weight is ``<module>.weight``. Its stored shape decides the layout: delta
is used as is when its shape matches, transposed when delta.T matches, else it is
an error. Square weights fit both ways; they follow the adapter's non-square
linear weights when those were all transposed, else the format's own layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm_merge.config import check_output_apart, parse_size, read_mapping_file
from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import dtypes, side_files
from llm_merge.option_types import finite_float32, is_integer, is_number, kind_of
from llm_merge.io.checkpoint import Checkpoint, index_file, open_checkpoint, single_file
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.plan import OutputSlot, Shard, ShardedOutput, layout_shards

log = logging.getLogger(__name__)
_SHOW = 5  # problems listed per message

PEFT = "peft"
PADDLE = "paddle"
PEFT_CONFIG = "adapter_config.json"
PADDLE_CONFIG = "lora_config.json"
PEFT_PREFIX = "base_model.model."
#: safetensors prefixes ({prefix}.safetensors or {prefix}.safetensors.index.json) tried in order.
WEIGHT_PREFIXES = {PEFT: ("adapter_model",), PADDLE: ("lora_model", "lora_model_state")}
PADDLE_PICKLE = "lora_model_state.pdparams"
#: Config keys of LoRA variants whose merge is not W + scale * delta: refused when true.
_UNSUPPORTED = {
    PEFT: ("use_dora",),
    PADDLE: ("pissa", "lora_use_mixer", "use_mora", "dora", "lorapro"),
}
_PEFT_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<which>[AB])(?:\.weight)?$")
_PADDLE_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])$")


@dataclass(frozen=True)
class LoraMergeConfig:
    """Options of one fold; field names are the CLI flag names."""

    model_name_or_path: Optional[str] = None
    lora_path: Optional[str] = None
    output_path: Optional[str] = None
    merge_prefix: str = "model"
    output_dtype: Optional[str] = None
    max_shard_size: str = "5GB"
    n_process: int = 1
    allow_pickle: bool = False
    overwrite: bool = False
    quiet: bool = False


def resolve_config(cfg: LoraMergeConfig) -> LoraMergeConfig:
    """Validate flags (ConfigError, exit 2); fills model_name_or_path from the adapter config if absent."""
    if not cfg.lora_path:
        raise ConfigError("--lora_path: required (the adapter directory)")
    if not cfg.output_path:
        raise ConfigError("--output_path: required")
    if cfg.merge_prefix not in ("model", "master_weights"):
        raise ConfigError(f"--merge_prefix: {cfg.merge_prefix!r} is not one of model, master_weights")
    if cfg.output_dtype is not None and cfg.output_dtype not in dtypes.OUTPUT_DTYPES:
        raise ConfigError(f"--output_dtype: {cfg.output_dtype!r} is not one of {', '.join(dtypes.OUTPUT_DTYPES)}")
    if not isinstance(cfg.n_process, int) or isinstance(cfg.n_process, bool) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process} must be an integer >= 1")
    parse_size(cfg.max_shard_size)
    base = cfg.model_name_or_path
    if not base:
        base = _base_from_adapter_config(Path(cfg.lora_path))
    resolved = dataclasses.replace(cfg, model_name_or_path=base)
    _check_output_path(resolved)
    return resolved


def _base_from_adapter_config(adapter: Path) -> str:
    for name in (PEFT_CONFIG, PADDLE_CONFIG):
        path = adapter / name
        if os.path.lexists(path):
            config = side_files.read_json(path, error=ConfigError)
            named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
            if isinstance(named, str) and named and Path(named).is_dir():
                log.info("base model from %s: %s", path, named)
                return named
            raise ConfigError(
                f"--model_name_or_path: required ({path} names base model {named!r}, which is not a local directory)"
            )
    raise ConfigError("--model_name_or_path: required (the base model directory)")


def _check_output_path(cfg: LoraMergeConfig) -> None:
    check_output_apart(cfg.output_path, [("--model_name_or_path", cfg.model_name_or_path), ("--lora_path", cfg.lora_path)])


# -- adapter --------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterTensor:
    """One adapter tensor: in a safetensors file (``info``) or in memory as float32 (``array``, pdparams)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    info: Optional[TensorInfo] = None
    array: Optional[np.ndarray] = None

    @property
    def nbytes(self) -> int:
        return self.info.nbytes if self.info is not None else int(self.array.nbytes)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter directory: format, hyper-parameters and tensors (by adapter name, stored order)."""

    path: Path
    format: str
    config_file: Path
    weights_file: Path
    r: int
    lora_alpha: float
    rslora: bool
    target_modules: Any
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    tensors: dict[str, AdapterTensor]

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scale) of one module: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (PEFT patterns apply)."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha) / (math.sqrt(r) if self.rslora else r)


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def detect_format(adapter: Path) -> str:
    """``peft`` (adapter_config.json) or ``paddle`` (lora_config.json)."""
    if not adapter.exists():
        raise MergeError(f"{adapter}: no such directory (--lora_path)")
    if not adapter.is_dir():
        raise MergeError(f"{adapter}: not a directory (--lora_path)")
    has_peft, has_paddle = (adapter / PEFT_CONFIG).is_file(), (adapter / PADDLE_CONFIG).is_file()
    if has_peft and has_paddle:
        raise MergeError(f"{adapter}: holds both {PEFT_CONFIG} and {PADDLE_CONFIG}; cannot tell the adapter format")
    if not (has_peft or has_paddle):
        found = ", ".join(sorted(p.name for p in adapter.iterdir())[:8]) or "nothing"
        raise MergeError(f"{adapter}: no LoRA adapter config ({PEFT_CONFIG} or {PADDLE_CONFIG}); found: {found}")
    return PEFT if has_peft else PADDLE


def open_adapter(directory: str | Path, allow_pickle: bool = False) -> Adapter:
    """Read the adapter's config and index its tensors (pdparams are loaded, only with ``allow_pickle``)."""
    directory = Path(directory)
    fmt = detect_format(directory)
    config_file = directory / (PEFT_CONFIG if fmt == PEFT else PADDLE_CONFIG)
    raw = _read_json(config_file)
    for key in (*_UNSUPPORTED[fmt], *_FLAGS):
        _check_flag(config_file, raw, key)
    for key in _UNSUPPORTED[fmt]:
        if raw.get(key):
            raise MergeError(f"{config_file}: {key}={raw[key]!r} is not supported; only plain LoRA (W + scale * B A) can be folded")
    if fmt == PEFT and raw.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{config_file}: peft_type {raw.get('peft_type')!r} is not LORA")
    r = raw.get("r")
    if not _positive_rank(r):
        raise MergeError(f"{config_file}: r={r!r}, expected a positive integer")
    alpha = raw.get("lora_alpha")
    if not (is_number(alpha) and finite_float32(alpha)):
        raise MergeError(f"{config_file}: lora_alpha={alpha!r}, expected a finite number")
    rslora = bool(raw.get("use_rslora") or raw.get("rslora"))
    rank_pattern = _pattern(config_file, raw, "rank_pattern", _positive_rank, "a positive integer")
    alpha_pattern = _pattern(config_file, raw, "alpha_pattern", lambda v: is_number(v) and finite_float32(v), "a finite number")
    weights_file, tensors = _adapter_tensors(directory, fmt, allow_pickle)
    return Adapter(
        path=directory,
        format=fmt,
        config_file=config_file,
        weights_file=weights_file,
        r=r,
        lora_alpha=float(alpha),
        rslora=rslora,
        target_modules=raw.get("target_modules"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out")),
        tensors=tensors,
    )


#: true/false keys of an adapter config that change how it folds (a string there is an error, never truthy).
_FLAGS = ("use_rslora", "rslora", "fan_in_fan_out")


def _check_flag(config_file: Path, raw: dict, key: str) -> None:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise MergeError(f"{config_file}: {key}: got {kind_of(value)}, expected true or false")


def _positive_rank(value: Any) -> bool:
    return is_integer(value) and value >= 1


def _pattern(config_file: Path, raw: dict, key: str, valid, wanted: str) -> dict:
    """PEFT's rank_pattern / alpha_pattern: an object of module-name regular expressions -> ``wanted`` values."""
    patterns = raw.get(key) or {}
    if not isinstance(patterns, dict):
        raise MergeError(f"{config_file}: {key}: got {kind_of(patterns)}, expected an object of module pattern -> value")
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?{pattern}$")
        except re.error as exc:
            raise MergeError(f"{config_file}: {key}: {pattern!r} is not a valid regular expression ({exc})") from None
        if not valid(value):
            raise MergeError(f"{config_file}: {key}[{pattern!r}]: got {kind_of(value)}, expected {wanted}")
    return dict(patterns)


def _read_json(path: Path) -> dict:
    return read_mapping_file(path, json.loads, ValueError, str(path), "JSON", "a JSON object", error=MergeError)


def _adapter_tensors(directory: Path, fmt: str, allow_pickle: bool) -> tuple[Path, dict[str, AdapterTensor]]:
    for prefix in WEIGHT_PREFIXES[fmt]:
        if index_file(directory, prefix).is_file() or single_file(directory, prefix).is_file():
            checkpoint = open_checkpoint(directory, prefix)
            tensors = {name: AdapterTensor(name, info.shape, info.dtype, info=info) for name, info in checkpoint.tensors.items()}
            return checkpoint.files[0], tensors
    if fmt == PADDLE and (directory / PADDLE_PICKLE).is_file():
        path = directory / PADDLE_PICKLE
        if not allow_pickle:
            raise ConfigError(
                f"{path}: a .pdparams file is a Python pickle and loading a pickle can execute arbitrary code; "
                "pass --allow_pickle if you trust it (or convert it to lora_model.safetensors)"
            )
        return path, load_pdparams(path)
    expected = [f"{p}.safetensors" for p in WEIGHT_PREFIXES[fmt]] + ([PADDLE_PICKLE] if fmt == PADDLE else [])
    found = ", ".join(sorted(p.name for p in directory.iterdir())[:8])
    hint = "; torch .bin adapters are not supported, save them with safe_serialization=True" if (directory / "adapter_model.bin").exists() else ""
    raise MergeError(f"{directory}: no adapter weights (expected {' or '.join(expected)}; found: {found}){hint}")


def load_pdparams(path: Path) -> dict[str, AdapterTensor]:
    """Load a PaddleNLP ``.pdparams`` state dict (a pickle: only call for trusted files) as float32 arrays."""
    try:
        import paddle  # lazily: only pdparams adapters need Paddle
    except ImportError:
        raise MergeError(f"{path}: loading .pdparams needs Paddle (pip install 'llm_merge[paddle]')") from None
    try:
        state = paddle.load(str(path))
    except Exception as exc:  # paddle raises many types for a bad file
        raise MergeError(f"{path}: cannot load: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise MergeError(f"{path}: expected a state dict, got {type(state).__name__}")
    tensors = {}
    for name, value in state.items():
        if isinstance(value, paddle.Tensor):
            array = value.astype("float32").numpy() if value.is_floating_point() else value.numpy()
        else:
            array = np.asarray(value)
            if array.dtype.kind == "f":
                array = array.astype(np.float32)
        try:
            dtype = dtypes.to_safetensors(array.dtype)
        except MergeError:
            raise MergeError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}") from None
        tensors[str(name)] = AdapterTensor(str(name), tuple(array.shape), dtype, array=np.ascontiguousarray(array))
    return tensors


# -- pairing and plan ------------------------------------------------------------------


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


def base_name(adapter_format: str, adapter_name: str) -> tuple[Optional[str], Optional[str], bool]:
    """(module, "A"/"B", is_embedding) for a LoRA tensor name, or (None, None, False) for any other tensor."""
    pattern = _PEFT_NAME if adapter_format == PEFT else _PADDLE_NAME
    match = pattern.match(adapter_name)
    if not match:
        return None, None, False
    module = match["module"]
    if adapter_format == PEFT and module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX):]
    return module, match["which"], bool(match.groupdict().get("embedding"))


def pair_adapter(adapter: Adapter, base: Checkpoint) -> tuple[dict[str, LoraPair], dict[str, AdapterTensor]]:
    """Pair lora_A/lora_B per base weight and check every shape; returns (folds, replacements) by base name.

    Raises MergeError listing (the first few) unpaired tensors, targets missing from
    the base, rank or shape mismatches, and unsupported tensors, before anything is written.
    """
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

    targets = {module: f"{module}.weight" for module in halves}
    missing = [f"{halves[m]['A'].name} -> {t}" for m, t in targets.items() if t not in base.tensors]
    missing += [f"{tensor.name} -> {t}" for t, tensor in replacements.items() if t not in base.tensors]
    if missing:
        raise MergeError(f"adapter tensors whose target is not a weight of {base.path}: {_listing(missing)}")
    both = [t for t in replacements if t in targets.values()]
    if both:
        raise MergeError(f"{adapter.weights_file}: both a LoRA pair and a full tensor for {_listing(both)}")

    # Shapes: rank, then delta vs delta.T against the base weight.
    pending: list[tuple[str, str, AdapterTensor, AdapterTensor, tuple, float, Optional[bool]]] = []
    for module, side in halves.items():
        a, b = side["A"], side["B"]
        left, right = (b, a) if adapter.format == PEFT else (a, b)
        target = targets[module]
        info = base.tensors[target]
        shapes = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}, base {target} {list(info.shape)}"
        if len(left.shape) != 2 or len(right.shape) != 2:
            problems.append(f"{module}: only 2-D LoRA weights can be folded ({shapes})")
            continue
        if a.dtype not in dtypes.MERGEABLE or b.dtype not in dtypes.MERGEABLE:
            problems.append(f"{module}: LoRA weights must be float (lora_A {a.dtype}, lora_B {b.dtype})")
            continue
        if left.shape[1] != right.shape[0]:
            problems.append(f"{module}: lora_A and lora_B ranks differ ({shapes})")
            continue
        r, scale = adapter.rank_and_scale(module)
        if left.shape[1] != r:
            problems.append(f"{module}: rank {left.shape[1]} in the tensors but r={r} in {adapter.config_file.name} ({shapes})")
            continue
        if info.dtype not in dtypes.MERGEABLE:
            problems.append(f"{target}: base dtype {info.dtype} is not a float type")
            continue
        delta = (left.shape[0], right.shape[1])
        direct, flipped = tuple(info.shape) == delta, tuple(info.shape) == delta[::-1]
        if not (direct or flipped):
            problems.append(f"{target}: delta {list(delta)} fits neither it nor its transpose ({shapes})")
            continue
        transpose = None if direct and flipped else flipped  # None: square, decided below
        pending.append((module, target, left, right, info.shape, scale, transpose))
    for target, tensor in replacements.items():
        info = base.tensors[target]
        if tuple(tensor.shape) != tuple(info.shape):
            problems.append(f"{tensor.name}: shape {list(tensor.shape)} but base {target} is {list(info.shape)}")
        elif (tensor.dtype in dtypes.MERGEABLE) != (info.dtype in dtypes.MERGEABLE) or (
            info.dtype not in dtypes.MERGEABLE and tensor.dtype != info.dtype
        ):
            problems.append(f"{tensor.name}: dtype {tensor.dtype} but base {target} is {info.dtype}")
    if problems:
        raise MergeError(f"LoRA adapter {adapter.path} does not fit base {base.path}: {_listing(problems)}")

    square_transpose = _square_layout(adapter, pending, embedding)
    folds = {
        target: LoraPair(module, left, right, scale, square_transpose if transpose is None else transpose)
        for module, target, left, right, _, scale, transpose in pending
    }
    return folds, replacements


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


def build_fold_plan(cfg: LoraMergeConfig) -> FoldPlan:
    """Open base and adapter, pair and check everything, and lay out the output shards."""
    base = open_checkpoint(cfg.model_name_or_path, cfg.merge_prefix)
    adapter = open_adapter(cfg.lora_path, cfg.allow_pickle)
    folds, replacements = pair_adapter(adapter, base)
    if not folds and not replacements:
        raise MergeError(f"{adapter.weights_file}: the adapter holds no LoRA tensors")
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
