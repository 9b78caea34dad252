"""Atomic output: a staging directory beside output_path, renamed into place when complete.

Shard files are created with their final header and size first (``shards``); workers then
write each tensor at its planned offset, in any order. Nothing appears under output_path
unless every tensor was written and every header verified. An existing output is replaced
only with ``overwrite``, and never left half replaced (``publish``, ``remove_stale_trash``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from llm_merge.errors import MergeError
from llm_merge.io.shards import create_shards, verify_shards
from llm_merge.io.signals import stop_signals_raise

log = logging.getLogger(__name__)
#: Staging directories (``.{output}{tag}{pid}-{random}``): removed by the next run once ``pid`` is gone.
STAGING_TAG = ".llm_merge-tmp-"
#: An output being replaced, set aside whole (``.{output}{tag}{pid}-{random}``) until the new one is in place.
_OLD_TAG = ".llm_merge-old-"
#: A replaced output being deleted.
_DOOMED_TAG = ".llm_merge-deleting-"
#: Weight files are never copied from the first model; everything else at its top level is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pdparams", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".index.json", ".pdopt")
_NOT_COPIED = {"merge_config.json", "README.md"}
#: Files that belong to the tokenizer: with --tokenizer_source they come from that model.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
})


def check_output_path(output: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output_path unless overwrite.

    First a replacement of ``output`` that a killed run left half done is finished, so the check
    sees the output as it is (``remove_stale_trash``).
    """
    remove_stale_trash(output)
    if output.exists() and not output.is_dir():
        raise MergeError(f"--output_path: {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise MergeError(f"--output_path: {output} exists and is not empty; pass --overwrite to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(output: Path) -> None:
    """Delete staging directories (and scratch files named alike, ``scratch_file``) left by killed runs for the
    same output_path."""
    for stale in _left_by_dead_runs(output, STAGING_TAG):
        log.info("removing %s left by an interrupted run", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def scratch_file(output: Path, purpose: str) -> Path:
    """A scratch file of this process beside ``output``, named as staging directories are: removed by the run
    that made it, and by the next run for ``output`` when a killed run left it."""
    return output.parent / f".{output.name}{STAGING_TAG}{os.getpid()}-{purpose}"


@contextlib.contextmanager
def staging_directory(output: Path) -> Iterator[Path]:
    """A fresh directory beside ``output``; removed on exit unless it was published."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    staging = output.parent / f".{output.name}{STAGING_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, value: object) -> None:
    """A JSON record; a str value (the README.md model card) is written as text."""
    path.write_text(value if isinstance(value, str) else json.dumps(value, indent=2) + "\n")


def copy_model_files(source: Path, destination: Path, keep: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Copy the non-weight files (config, tokenizer, generation config ...) of ``source`` for which ``keep(name)``."""
    copied = []
    for item in sorted(source.iterdir()):
        if keep(item.name) and item.is_file() and not item.name.startswith(".") and item.name not in _NOT_COPIED and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, destination / item.name)
            copied.append(item.name)
    return copied


def fsync_path(path: Path) -> None:
    """Flush one file (or a directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory entry itself to disk."""
    for item in directory.iterdir():
        fsync_path(item)
    fsync_path(directory)


def publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the complete staging directory to ``output`` (replacing it only if allowed).

    An existing output is first set aside whole (renamed), the new one renamed into place, and
    only then is the old one marked for deletion and deleted in the background, off the critical
    path (deleting it in line costs ~0.17 s per GB). A run killed in between leaves the old output
    or the new one in place; the next run for the same output finishes the job (``remove_stale_trash``).
    """
    check_output_path(output, overwrite)
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old = output.parent / f".{output.name}{_OLD_TAG}{suffix}"
    doomed = output.parent / f".{output.name}{_DOOMED_TAG}{suffix}"
    os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError:
        os.rename(old, output)
        raise
    os.rename(old, doomed)
    log.info("replaced %s; its previous contents are being deleted in the background", output)
    remove_detached(doomed)


def remove_detached(path: Path) -> None:
    """Delete ``path`` (a replaced output directory, or a link) without waiting for the deletion.

    ``rm -rf`` runs in a new session, started by a shell that exits at once (so there is no child
    to reap): this process goes on, or exits, while a large directory is still being deleted, and
    a closing terminal does not stop the deletion. A link is unlinked, never followed.
    """
    if path.is_symlink():
        path.unlink(missing_ok=True)
        return
    try:
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" </dev/null >/dev/null 2>&1 &', "sh", str(path)], start_new_session=True, check=True)
    except (OSError, subprocess.CalledProcessError):  # no POSIX shell: delete it here
        shutil.rmtree(path, ignore_errors=True)


def _left_by_dead_runs(output: Path, tag: str) -> Iterator[Path]:
    """Directories ``.{output}{tag}{pid}-...`` beside ``output`` whose process ``pid`` is gone."""
    prefix = f".{output.name}{tag}"
    for path in output.parent.glob(f"{prefix}*"):
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            yield path


def remove_stale_trash(output: Path) -> None:
    """Finish replacing ``output`` where a killed ``--overwrite`` run left it half done.

    An old output set aside but not yet marked for deletion is still whole: it goes back into place
    when no new output arrived, and is deleted otherwise. One marked for deletion may be partly
    deleted already: it is only ever deleted.
    """
    for old in _left_by_dead_runs(output, _OLD_TAG):
        if os.path.lexists(output):
            log.info("removing %s, replaced by an interrupted run", old)
            remove_detached(old)
        else:
            log.info("putting back %s, set aside by an interrupted run", output)
            os.rename(old, output)
    for doomed in _left_by_dead_runs(output, _DOOMED_TAG):
        log.info("removing %s left by an interrupted run", doomed)
        remove_detached(doomed)


def write_model_atomically(
    output: Path,
    layout: Any,
    *,
    overwrite: bool,
    fill: Callable[[Path], None],
    **finish: Any,
) -> None:
    """Stage a checkpoint beside ``output``, fill its shards, verify, and rename it into place.

    ``layout`` has ``shards``, ``weight_map`` and ``total_size`` (a merge or fold
    plan). ``fill(staging)`` writes every tensor into the pre-created shards;
    then ``finish_and_publish`` (which takes the ``finish`` keywords) verifies,
    completes and publishes the directory. On any exception, SIGTERM, SIGHUP (which raise
    ``Terminated``) or Ctrl-C, the staging directory is removed and ``output`` is left untouched.
    """
    check_output_path(output, overwrite)
    with stop_signals_raise(), staging_directory(output) as staging:
        create_shards(staging, layout.shards)
        fill(staging)
        finish_and_publish(staging, output, layout, overwrite=overwrite, **finish)


def finish_and_publish(
    staging: Path,
    output: Path,
    layout: Any,
    *,
    overwrite: bool,
    prefix: str,
    model_files_from: Path,
    records: dict[str, object],
    finalize: Callable[[Path], None] | None = None,
    tokenizer_files_from: Path | None = None,
) -> None:
    """Verify the filled shards, add the index, (finalize), model files and records, flush, and rename into place.

    ``finalize(staging)`` may rewrite the weight files (e.g. into .pdparams); ``records`` are
    JSON files (name -> value) written over the copied model files.
    """
    for scratch in staging.glob(".spill-*"):  # left by a worker killed mid-tensor (multi-rank resume)
        scratch.unlink()
    verify_shards(staging, layout.shards)
    index = {"metadata": {"total_size": layout.total_size}, "weight_map": layout.weight_map}
    write_json(staging / f"{prefix}.safetensors.index.json", index)
    if finalize is not None:
        finalize(staging)
    if tokenizer_files_from is None:
        copy_model_files(model_files_from, staging)
    else:  # --tokenizer_source: the tokenizer files come from that model, everything else from the first
        copy_model_files(model_files_from, staging, keep=lambda name: name not in TOKENIZER_FILES)
        copy_model_files(tokenizer_files_from, staging, keep=lambda name: name in TOKENIZER_FILES)
    for name, value in records.items():
        write_json(staging / name, value)
    fsync_directory(staging)
    publish(staging, output, overwrite)
