"""A LoRA adapter directory: its format, its typed config and its tensors (headers only, or the arrays of a
trusted ``.pdparams`` pickle).

Two formats (``detect_format``):

* Hugging Face PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``;
  ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
  (embeddings: ``lora_embedding_A`` / ``lora_embedding_B``); delta = B @ A, [out, in].
* PaddleNLP: ``lora_config.json`` + ``lora_model_state.pdparams`` (a pickle, only with
  ``allow_pickle``) or ``lora_model.safetensors`` / ``lora_model_state.safetensors``;
  ``<module>.lora_A`` [in, r] and ``<module>.lora_B`` [r, out]; delta = A @ B, [in, out].
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm_merge.config.files import read_mapping_file
from llm_merge.config.types import finite_float32, is_integer, is_number, kind_of
from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import dtypes, pdparams
from llm_merge.io.checkpoint import index_file, open_checkpoint, single_file
from llm_merge.io.safetensors_format import TensorInfo

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
    #: PEFT's ensure_weight_tying: the adapter repeats, for a tied output head, what it holds for the embedding
    ties_head: bool = False

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
        ties_head=fmt == PEFT and bool(raw.get("ensure_weight_tying")),
    )


#: true/false keys of an adapter config that change how it folds (a string there is an error, never truthy).
_FLAGS = ("use_rslora", "rslora", "fan_in_fan_out", "ensure_weight_tying")


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
    """A PaddleNLP ``.pdparams`` adapter (a pickle: only call for trusted files); float tensors as float32."""
    tensors = {}
    for name, array in pdparams.load_state_dict(path).items():
        dtype = dtypes.to_safetensors(array.dtype)
        if dtype in dtypes.MERGEABLE:  # LoRA factors are folded in float32
            array, dtype = array.astype(np.float32, copy=False), "F32"
        tensors[name] = AdapterTensor(name, tuple(array.shape), dtype, array=np.ascontiguousarray(array))
    return tensors


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

