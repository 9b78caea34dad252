"""Paddle ``.pdparams`` checkpoints, in and out, by conversion to and from safetensors.

A ``.pdparams`` file is a Python pickle written by ``paddle.save`` (a dict name ->
ndarray; Paddle stores bfloat16 as uint16 arrays). Loading a pickle can execute
arbitrary code, so inputs are read only with ``--allow_pickle``.

Inputs: ``{stem}.pdparams`` or ``{stem}.pdparams.index.json`` + the shards it names
(``{stem}-00001-of-00002.pdparams`` ...), with stem ``model_state`` for
``--merge_prefix model`` and ``master_weights`` for ``master_weights`` (PaddleNLP's
names). Each shard is loaded whole, one at a time, and written as a safetensors
shard into a temporary directory beside the output; the merge then reads those
like any safetensors checkpoint, in the state dict's tensor order (the converted index
keeps it). The directory is removed when the merge ends, whatever the outcome (a
``kill -9`` leaves it to the next run's stale-staging cleanup). ``load_state_dict`` is the
one loader of a .pdparams file, here and for LoRA adapters.

Output (``--output_format pdparams``): after the safetensors shards are written and
verified in the staging directory, each is converted, one at a time (about one shard in memory), into
``{stem}[-0000i-of-0000n].pdparams`` (the layout ``paddle.save`` gives a state dict
of tensors), with ``{stem}.pdparams.index.json`` when sharded, and the safetensors
files are deleted. Paddle is imported only here, only when needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import dtypes, side_files, writer
from llm_merge.io.safetensors_format import read_header
from llm_merge.io.signals import stop_signals_raise

log = logging.getLogger(__name__)

#: --merge_prefix -> PaddleNLP file stem (model_state.pdparams, master_weights.pdparams).
STEMS = {"model": "model_state", "master_weights": "master_weights"}
#: Key of paddle.save's name table in a saved state dict (dropped by paddle.load).
NAME_TABLE = "StructuredToParameterName@@"
#: safetensors dtypes that Paddle can hold (bf16 goes as uint16, Paddle's own storage of it).
PADDLE_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def stem(prefix: str) -> str:
    return STEMS.get(prefix, prefix)


def single_file(directory: Path, prefix: str) -> Path:
    return Path(directory) / f"{stem(prefix)}.pdparams"


def index_file(directory: Path, prefix: str) -> Path:
    return Path(directory) / f"{stem(prefix)}.pdparams.index.json"


def shard_file_name(prefix: str, index: int, count: int) -> str:
    """``model_state.pdparams`` alone, else ``model_state-00001-of-00003.pdparams`` (PaddleNLP's naming)."""
    return f"{stem(prefix)}.pdparams" if count == 1 else f"{stem(prefix)}-{index + 1:05d}-of-{count:05d}.pdparams"


def has_pdparams(directory: Path, prefix: str) -> bool:
    return index_file(directory, prefix).is_file() or single_file(directory, prefix).is_file()


def import_paddle(what: str) -> Any:
    """Import Paddle lazily; a one-line MergeError saying how to install it when missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "No ccache found" on import
            import paddle
    except ImportError as exc:
        raise MergeError(f"{what} needs PaddlePaddle ({exc}); install it with: pip install 'llm_merge[paddle]'") from None
    return paddle


def pickle_refusal(path: Path) -> ConfigError:
    return ConfigError(
        f"{path}: a .pdparams file is a Python pickle and loading a pickle can execute arbitrary code; "
        "pass --allow_pickle if you trust its source (or convert the checkpoint to safetensors)"
    )


# -- inputs -------------------------------------------------------------------------------


class InputConverter:
    """``open_checkpoint``'s converter: ``(directory, prefix) -> safetensors directory or None``.

    Use as a context manager around everything that reads the converted files: the
    temporary directory (created on the first conversion, beside ``output``) is removed on exit.
    """

    def __init__(self, output: Path, *, allow_pickle: bool, overwrite: bool = False, refuse: Optional[str] = None) -> None:
        self.output = Path(output)
        self.allow_pickle = allow_pickle
        self.overwrite = overwrite
        self.refuse = refuse  # why pdparams inputs cannot be used in this run (e.g. a multi-rank merge)
        self.workspace: Optional[Path] = None
        self._stack = contextlib.ExitStack()
        self._count = 0

    def __enter__(self) -> "InputConverter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.workspace is not None:
                shutil.rmtree(self.workspace, ignore_errors=True)
                self.workspace = None
        finally:
            self._stack.close()

    def __call__(self, directory: Path, prefix: str) -> Optional[Path]:
        directory = Path(directory)
        if not has_pdparams(directory, prefix):
            return None
        found = index_file(directory, prefix) if index_file(directory, prefix).is_file() else single_file(directory, prefix)
        if not self.allow_pickle:
            raise pickle_refusal(found)
        if self.refuse:
            raise ConfigError(f"{found}: {self.refuse}")
        if self.workspace is None:
            writer.check_output_path(self.output, self.overwrite)  # do not convert for nothing
            self._stack.enter_context(stop_signals_raise())
            self.output.parent.mkdir(parents=True, exist_ok=True)
            # named like a staging directory of this pid, so a killed run's copy is removed by the next run
            self.workspace = Path(tempfile.mkdtemp(prefix=f".{self.output.name}{writer.STAGING_TAG}{os.getpid()}-pdparams", dir=self.output.parent))
        target = self.workspace / str(self._count)
        self._count += 1
        target.mkdir()
        convert_checkpoint(directory, prefix, target)
        return target


def convert_checkpoint(directory: Path, prefix: str, target: Path) -> None:
    """Write the pdparams checkpoint of ``directory`` as safetensors shards + index into ``target``.

    Trusted input only (pickles). One pdparams shard is in memory at a time.
    """
    directory = Path(directory)
    index = index_file(directory, prefix)
    if index.is_file():
        weight_map = _read_weight_map(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
        root = directory.resolve()
        for shard_name in shard_names:
            shard = (directory / shard_name).resolve()
            if Path(shard_name).is_absolute() or root not in shard.parents:
                raise MergeError(f"{index}: shard {shard_name!r} points outside the checkpoint directory; refused")
            if not shard.is_file():
                raise MergeError(f"{index}: names shard {shard_name!r}, which does not exist in {directory}")
        sources = [(directory / name, [t for t, s in weight_map.items() if s == name]) for name in shard_names]
    else:
        sources = [(single_file(directory, prefix), None)]
    out_map: dict[str, str] = {}
    total = 0
    for i, (source, wanted) in enumerate(sources):
        log.info("converting %s to safetensors in %s (--allow_pickle)", source, target)
        arrays = load_state_dict(source)
        if wanted is not None:
            missing = [n for n in wanted if n not in arrays]
            if missing:
                raise MergeError(
                    f"{index}: {len(missing)} tensor(s) listed in the index are absent from their shard, e.g. {missing[0]!r} in {source.name!r}"
                )
            arrays = {n: arrays[n] for n in wanted}
        name = f"{prefix}-{i + 1:05d}-of-{len(sources):05d}.safetensors"
        total += _write_safetensors(target / name, arrays)
        out_map.update(dict.fromkeys(arrays, name))
        del arrays
    writer.write_json(target / f"{prefix}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": out_map})


def _read_weight_map(index: Path) -> dict[str, str]:
    document = side_files.read_json(index)
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise MergeError(f"{index}: not a valid pdparams index (weight_map must be an object of tensor name -> shard file name)")
    return weight_map


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """name -> array of a ``.pdparams`` state dict, in its stored order. A pickle: trusted files only.

    Paddle's name table (``NAME_TABLE``) is dropped; bfloat16, which Paddle stores as uint16, comes
    back as ``ml_dtypes.bfloat16``; Paddle tensors and Paddle 2.1's ``(name, array)`` pairs become
    arrays; an entry that is not a tensor is skipped with a warning. A file that does not load, is
    not a dict, or holds a dtype safetensors cannot store is a one-line MergeError.
    """
    paddle = import_paddle(f"reading {path}")
    try:
        state = paddle.load(str(path), return_numpy=True)
    except Exception as exc:  # paddle raises many types for a bad file
        raise MergeError(f"{path}: cannot load: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    if not isinstance(state, dict):
        raise MergeError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    arrays = {}
    for name, value in state.items():
        if name == NAME_TABLE:
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]  # (tensor name, data): Paddle 2.1's tensor pickling
        if isinstance(value, paddle.Tensor):
            value = value.numpy()
        if not isinstance(value, np.ndarray):
            log.warning("%s: entry %r is a %s, not a tensor; skipped", path, name, type(value).__name__)
            continue
        if value.dtype == np.uint16:  # Paddle stores bfloat16 as uint16 (paddle.uint16 is paddle.bfloat16)
            value = value.view(dtypes.to_numpy("BF16"))  # ml_dtypes' type, which safetensors' writer knows
        try:
            dtypes.to_safetensors(value.dtype)
        except MergeError:
            raise MergeError(f"{path}: tensor {name!r} has unsupported dtype {value.dtype}") from None
        arrays[str(name)] = value
    return arrays


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Write ``arrays`` as one safetensors file (the safetensors package's writer); returns its data bytes.

    That writer stores the tensors sorted by dtype and name, whatever the dict's order; the order
    the merge follows is the converted index's (``checkpoint.open_checkpoint``).
    """
    try:
        save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, path, metadata={"format": "np"})
    except SafetensorError as exc:  # its error for a failed write too (not an OSError)
        raise MergeError(f"{path}: cannot write converted checkpoint: {exc}") from None
    return sum(array.nbytes for array in arrays.values())


# -- output ---------------------------------------------------------------------------------


def check_output_dtypes(tasks: Any) -> None:
    """Fail before merging when an output dtype has no Paddle equivalent."""
    bad = sorted({t.out.dtype for t in tasks} - PADDLE_DTYPES)
    if bad:
        names = [t.name for t in tasks if t.out.dtype in bad][:5]
        raise ConfigError(f"--output_format pdparams: dtype(s) {', '.join(bad)} cannot be stored in a .pdparams file (tensors {', '.join(names)}); use --output_format safetensors")


def safetensors_to_pdparams(staging: Path, prefix: str) -> None:
    """Replace the verified safetensors output in ``staging`` by ``.pdparams`` shards (+ index when sharded)."""
    paddle = import_paddle("--output_format pdparams")
    st_index = staging / f"{prefix}.safetensors.index.json"
    index = json.loads(st_index.read_text())
    weight_map: dict[str, str] = index["weight_map"]
    shards = list(dict.fromkeys(weight_map.values()))
    renamed = {old: shard_file_name(prefix, i, len(shards)) for i, old in enumerate(shards)}
    for old, new in renamed.items():
        source = staging / old
        header = read_header(source)
        mapped = np.memmap(source, dtype=np.uint8, mode="r")
        state: dict[str, Any] = {}
        for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start):
            numpy_dtype = np.dtype(np.uint16) if info.dtype == "BF16" else dtypes.to_numpy(info.dtype)
            # plain ndarray views of the memory map; the pickler keeps a copy of each until the file is done
            state[name] = np.asarray(mapped[info.start : info.start + info.nbytes]).view(numpy_dtype).reshape(info.shape)
        state[NAME_TABLE] = {name: name for name in header.tensors}
        try:
            paddle.save(state, str(staging / new))
        except OSError as exc:
            raise MergeError(f"{staging / new}: cannot write: {exc.strerror}") from exc
        del state, mapped
        source.unlink()
    st_index.unlink()
    if len(shards) > 1:
        writer.write_json(
            staging / index_file(staging, prefix).name,
            {"metadata": index.get("metadata", {}), "weight_map": {name: renamed[file] for name, file in weight_map.items()}},
        )
