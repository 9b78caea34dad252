"""Reconcile messy checkpoints before planning: missing tensors, tied embeddings, vocabulary sizes.

``reconcile`` decides, from headers and config.json / tokenizer.json only, which
output tensors exist, their shapes, and which inputs make up each of them: a list of
``Piece``s (a row range, the participating models by their index in
``--model_path_list``, whether the base takes part, or one input copied as is).
When every checkpoint has every tensor with the same shape, each tensor is one
piece over all models (``models=None``), which the engine merges exactly as before.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from llm_merge.config.options import MergeConfig
from llm_merge.config.references import parse_reference
from llm_merge.errors import ConfigError, MergeError
from llm_merge import methods
from llm_merge.io import dtypes, side_files
from llm_merge.io.checkpoint import Checkpoint
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.plan.mergekit_vocab import MergekitVocab, plan_mergekit_vocab, vocab_names
from llm_merge.plan.vocab import check_vocab_agreement, label, tokenizer_vocab
from llm_merge.config.names import HEAD_NAME, embed_name, is_vocab_name

log = logging.getLogger(__name__)
_SHOW_NAMES = 5  # names listed per mismatch
_SHOW = 5
BASE = -1  # index of the base model in Piece.copy

#: config.json keys that follow --tokenizer_source.
_TOKEN_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` (None: the whole tensor) of one output tensor.

    ``copy`` is a model index (or BASE) whose tensor is copied; otherwise the
    models ``models`` (None: all, in order) are merged, with the base when ``base``.
    """

    rows: Optional[tuple[int, int]]
    models: Optional[tuple[int, ...]]
    base: bool
    copy: Optional[int] = None


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype
    mergeable: bool
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Reconciled:
    models: tuple[Checkpoint, ...]  # with virtual lm_head.weight entries for tied models
    base: Optional[Checkpoint]
    tensors: tuple[OutputTensor, ...]
    config_json: Optional[dict]  # the output config.json when it must differ from the first model's
    tokenizer_from: Optional[Path]  # directory whose tokenizer files the output gets
    mergekit_vocab: Optional[MergekitVocab] = None  # --semantics mergekit with --tokenizer_source (plan.mergekit_vocab)


def read_model_config(directory: Path) -> dict:
    """config.json of a checkpoint directory ({} when absent or not a JSON object; MergeError when it is not a
    regular file of bounded size, e.g. a FIFO or a link to a device)."""
    path = Path(directory) / "config.json"
    if not os.path.lexists(path):
        return {}
    try:
        value = side_files.read_json(path)
    except MergeError:
        if path.is_file() and path.stat().st_size <= side_files.MAX_SIDE_FILE_BYTES:
            log.warning("%s: not valid JSON; treated as empty", path)
            return {}
        raise
    return value if isinstance(value, dict) else {}


def reconcile(cfg: MergeConfig, models: Sequence[Checkpoint], base: Optional[Checkpoint]) -> Reconciled:
    everyone = [*models, *([base] if base else [])]
    configs = [read_model_config(c.path) for c in everyone]
    everyone, tied_out = _tie_embeddings(everyone, configs)
    models, base = tuple(everyone[: len(models)]), (everyone[-1] if base else None)
    mode = getattr(cfg, "on_missing_tensor", "error")
    if mode == "error":
        check_same_names(everyone)
    order = dict.fromkeys(name for m in models for name in m.tensors)
    everybody = tuple(range(len(models)))
    plans = _tensor_plans(cfg, models, base, order, mode)
    merged_vocab = None
    if getattr(cfg, "tokenizer_source", None) and cfg.semantics == "mergekit":  # mergekit's tokenizer merge
        merged_vocab = plan_mergekit_vocab(cfg, models, base, configs, vocab_names(order))
    vocab_rows = _check_shapes(cfg, models, base, configs, [p for p in plans if not merged_vocab or p[0] not in merged_vocab.tensors])
    source, n_out_of = _vocab_source(cfg, models, base, vocab_rows) if getattr(cfg, "tokenizer_source", None) and not merged_vocab else (None, None)
    tensors = []
    for name, idx, use_base, copy in plans:
        users = _users(models, base, name, idx, use_base, copy)
        dtype = _output_dtype(name, users, cfg.output_dtype)
        first = users[0].tensors[name]
        mergeable = first.dtype in dtypes.MERGEABLE
        all_models = idx == everybody
        if merged_vocab and name in merged_vocab.tensors:  # every input permuted onto the output vocabulary
            piece = Piece(None, None if all_models else idx, use_base)
            tensors.append(OutputTensor(name, (merged_vocab.tensors[name].n_out, *first.shape[1:]), dtype, mergeable, (piece,)))
            continue
        if name not in vocab_rows:
            if copy is not None:
                piece = Piece(None, (copy,) if copy != BASE else (), False, copy)
            else:  # non-float tensors in every model: copied from model 0 after an equality check
                piece = Piece(None, None if all_models else idx, use_base)
            tensors.append(OutputTensor(name, first.shape, dtype, mergeable, (piece,)))
            continue
        n_out = n_out_of(name)
        pieces = _row_pieces(cfg, models, base, name, idx, use_base, copy, n_out)
        tensors.append(OutputTensor(name, (n_out, *first.shape[1:]), dtype, mergeable, pieces))

    config_json = _output_config(configs[0], tied_out, HEAD_NAME in {t.name for t in tensors}, source, vocab_rows, tensors)
    if merged_vocab and merged_vocab.tensors and configs[0]:  # mergekit sets vocab_size to the (padded) output rows
        n_out = next(iter(merged_vocab.tensors.values())).n_out
        if (config_json or configs[0]).get("vocab_size") != n_out:
            config_json = {**(config_json or configs[0]), "vocab_size": n_out}
    tokenizer_from = source.path if source is not None and source.path != models[0].path else None
    if merged_vocab and merged_vocab.tokenizer_dir != Path(models[0].path):
        tokenizer_from = merged_vocab.tokenizer_dir
    return Reconciled(models, base, tuple(tensors), config_json, tokenizer_from, merged_vocab)


def _tensor_plans(cfg: MergeConfig, models: Sequence[Checkpoint], base: Optional[Checkpoint], order: dict,
                  mode: str) -> list[tuple[str, tuple[int, ...], bool, Optional[int]]]:
    """(name, models that have it, base used, copied from) of every output tensor, by ``--on_missing_tensor``;
    tensors left out are logged."""
    n = len(models)
    everybody = tuple(range(n))
    plans: list[tuple[str, tuple[int, ...], bool, Optional[int]]] = []
    dropped = []
    for name in order:
        idx = everybody if mode == "error" else tuple(i for i, m in enumerate(models) if name in m.tensors)
        in_base = base is not None and name in base.tensors
        if len(idx) == n and (base is None or in_base):
            plans.append((name, idx, base is not None, None))
            continue
        if mode == "skip":
            dropped.append(name)
            continue
        first = models[idx[0]].tensors[name]
        if first.dtype not in dtypes.MERGEABLE:
            plans.append((name, idx, False, idx[0]))
        elif in_base:
            plans.append((name, idx, False, BASE))
        elif len(idx) == 1 or _wrong_input_count(cfg, len(idx)):
            plans.append((name, idx, False, idx[0]))
        else:
            plans.append((name, idx, False, None))
    if dropped:
        log.warning("--on_missing_tensor skip: left out %d tensor(s) missing from some input: %s%s",
                    len(dropped), ", ".join(dropped[:_SHOW]), ", ..." if len(dropped) > _SHOW else "")
    extra = sorted(set(base.tensors) - set(order)) if base is not None and mode != "error" else []
    if extra:
        log.warning("left out %d tensor(s) only the base has: %s", len(extra), ", ".join(extra[:_SHOW]))
    return plans


# -- tied embeddings -----------------------------------------------------------------------
def _tie_embeddings(checkpoints: list[Checkpoint], configs: list[dict]) -> tuple[list[Checkpoint], bool]:
    """Give tied checkpoints a virtual lm_head.weight (their embedding's bytes) when another input has one.

    Returns the checkpoints and whether any input is tied.
    """
    embeds = [embed_name(c.tensors) if HEAD_NAME not in c.tensors else None for c in checkpoints]
    tied = [bool(conf.get("tie_word_embeddings") is True and e) for conf, e in zip(configs, embeds)]
    if not any(tied) or not any(HEAD_NAME in c.tensors for c in checkpoints):
        return checkpoints, any(tied)
    out = []
    for checkpoint, is_tied, embed in zip(checkpoints, tied, embeds):
        if is_tied:
            log.info("%s: tied embeddings; %s is used as its %s", checkpoint.path, embed, HEAD_NAME)
            checkpoint = dataclasses.replace(checkpoint, tensors={**checkpoint.tensors, HEAD_NAME: checkpoint.tensors[embed]})
        out.append(checkpoint)
    return out, True


# -- shapes and vocabularies ---------------------------------------------------------------
def _users(models, base, name, idx, use_base, copy) -> list[Checkpoint]:
    if copy is not None:
        return [base if copy == BASE else models[copy]]
    return [*(models[i] for i in idx), *([base] if use_base else [])]


def _check_shapes(cfg, models, base, configs, plans) -> dict[str, list[tuple[Checkpoint, int]]]:
    """Same shapes (and non-float dtypes) among the inputs of every tensor, except vocabulary rows.

    Returns {name: [(checkpoint, rows), ...]} for tensors whose row counts differ as vocabularies.
    Raises naming the tensors when shapes differ otherwise, or vocabularies differ without --tokenizer_source.
    """
    vocab_size = {id(c): conf.get("vocab_size") for c, conf in zip([*models, *([base] if base else [])], configs)}
    problems, vocab = [], {}
    for name, idx, use_base, copy in plans:
        users = _users(models, base, name, idx, use_base, copy)
        if len(users) < 2:
            continue
        infos = [u.tensors[name] for u in users]
        ref, ref_user = infos[0], users[0]
        bad_shape = False
        for user, info in zip(users[1:], infos[1:]):
            if info.shape != ref.shape:
                bad_shape = True
            elif (ref.dtype in dtypes.MERGEABLE) != (info.dtype in dtypes.MERGEABLE) or (
                ref.dtype not in dtypes.MERGEABLE and info.dtype != ref.dtype
            ):
                problems.append(f"{name}: dtype {ref.dtype} in {label(ref_user)} but {info.dtype} in {label(user)}")
        if not bad_shape:
            continue
        rows_only = ref.dtype in dtypes.MERGEABLE and all(
            len(i.shape) == len(ref.shape) >= 1 and i.shape[1:] == ref.shape[1:] for i in infos
        )
        by_config = all(vocab_size[id(u)] is not None and i.shape[0] == vocab_size[id(u)] for u, i in zip(users, infos))
        if rows_only and (is_vocab_name(name) or by_config):
            vocab[name] = [(u, i.shape[0]) for u, i in zip(users, infos)]
            continue
        for user, info in zip(users[1:], infos[1:]):
            if info.shape != ref.shape:
                problems.append(f"{name}: {list(ref.shape)} in {label(ref_user)} but {list(info.shape)} in {label(user)}")
    if problems:
        more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
        raise MergeError(f"tensor shapes or dtypes differ between models: {'; '.join(problems[:_SHOW])}{more}")
    if vocab and not getattr(cfg, "tokenizer_source", None):
        shown = [
            f"{name}: " + ", ".join(f"{list(u.tensors[name].shape)} in {label(u)}" for u, _ in rows)
            for name, rows in list(vocab.items())[:_SHOW]
        ]
        raise MergeError(
            f"vocabulary sizes differ between models: {'; '.join(shown)}; choose the output vocabulary with "
            "--tokenizer_source base|union|<model path>"
        )
    return vocab


def _vocab_source(cfg, models, base, vocab_rows):
    """The checkpoint whose vocabulary (and tokenizer files) the output takes, and name -> output rows."""
    everyone = [*models, *([base] if base else [])]
    choice = cfg.tokenizer_source
    if choice == "union":
        if not vocab_rows:  # one vocabulary size: nothing to unite
            return models[0], None
        known = [(c, v) for c in everyone if (v := tokenizer_vocab(c.path, use_tokenizers=True)) is not None]
        check_vocab_agreement(known)
        if not known:
            raise MergeError("--tokenizer_source union: no input has a tokenizer.json to match tokens with")
        source, largest = max(known, key=lambda item: len(item[1]))  # first of the largest
        union = {}
        for _, vocab in known:
            union.update(vocab)
        if len(union) != len(largest):
            raise MergeError(
                f"--tokenizer_source union: no input's tokenizer holds every token ({len(union)} in the union, "
                f"{len(largest)} in {source.path}, the largest)"
            )
        return source, lambda name: max(rows for _, rows in vocab_rows[name])
    if choice == "base":
        if base is None:
            raise ConfigError("--tokenizer_source base: needs --base_model_path")
        source = base
    else:
        wanted = os.path.realpath(parse_reference(choice, "--tokenizer_source").model)  # MODEL+LORA: MODEL's tokenizer
        matches = [c for c in everyone if os.path.realpath(c.path) == wanted]
        if not matches:
            raise ConfigError(
                f"--tokenizer_source: {choice!r} is not base, union, or one of the input model directories "
                "(--model_path_list, --base_model_path)"
            )
        source = matches[0]
    check_vocab_agreement([(c, v) for c in everyone if (v := tokenizer_vocab(c.path)) is not None])

    def n_out(name: str) -> int:
        if name not in source.tensors:
            raise MergeError(f"--tokenizer_source: {source.path} has no tensor {name}, so its row count is unknown")
        return source.tensors[name].shape[0]

    return source, n_out


def _row_pieces(cfg, models, base, name, idx, use_base, copy, n_out) -> tuple[Piece, ...]:
    """Split rows [0, n_out) where the set of inputs that have them changes."""
    rows = {i: models[i].tensors[name].shape[0] for i in idx}
    base_rows = base.tensors[name].shape[0] if base is not None and (use_base or copy == BASE) else None
    cuts = sorted({0, n_out, *(r for r in rows.values() if r < n_out), *([base_rows] if base_rows and base_rows < n_out else [])})
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
        have = tuple(i for i in idx if rows[i] >= b)
        has_base = base_rows is not None and base_rows >= b
        if copy == BASE and has_base:
            pieces.append(Piece((a, b), (), False, BASE))
        elif not have:
            if not has_base:
                raise MergeError(f"tensor {name}: no input has rows {a}:{b}")
            pieces.append(Piece((a, b), (), False, BASE))
        elif copy is not None and copy != BASE:
            src = copy if copy in have else have[0]
            pieces.append(Piece((a, b), (src,), False, src))
        elif len(have) == 1 and not has_base or _wrong_input_count(cfg, len(have)):
            pieces.append(Piece((a, b), (have[0],), False, have[0]))
        else:
            pieces.append(Piece((a, b), have, has_base and (use_base or copy == BASE)))
    return tuple(pieces)


def _output_dtype(name: str, users: list[Checkpoint], output_dtype: Optional[str]) -> str:
    first = users[0].tensors[name].dtype
    if first not in dtypes.MERGEABLE:
        return first
    found = {c.tensors[name].dtype for c in users}
    if len(found) > 1:
        log.warning("tensor %s has mixed float dtypes %s; merged in float32, written as %s", name, sorted(found), output_dtype or first)
    return dtypes.OUTPUT_DTYPES[output_dtype] if output_dtype else first


def _output_config(config: dict, any_tied: bool, has_head: bool, source, vocab_rows, tensors) -> Optional[dict]:
    """The first model's config.json made consistent with the output tensors (None: unchanged)."""
    if not config:
        return None
    out = dict(config)
    if has_head and out.get("tie_word_embeddings") is True:
        out["tie_word_embeddings"] = False
    elif not has_head and any_tied and out.get("tie_word_embeddings") is not True:
        out["tie_word_embeddings"] = True
    if source is not None:
        source_config = read_model_config(source.path)
        for key in ("vocab_size", *_TOKEN_CONFIG_KEYS):
            if key in source_config:
                out[key] = source_config[key]
        if vocab_rows:
            out["vocab_size"] = next(t for t in tensors if t.name in vocab_rows).shape[0]
    return out if out != config else None


def slice_rows(info: TensorInfo, a: int, b: int) -> TensorInfo:
    """Rows [a, b) of a tensor, as a TensorInfo of their own (a derived tensor stays derived: ``TensorInfo.rows``)."""
    return info.rows(a, b)


def check_same_names(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint must hold the same tensor names as the first."""
    reference = checkpoints[0]
    names = set(reference.tensors)
    problems = []
    for other in checkpoints[1:]:
        theirs = set(other.tensors)
        missing, extra = sorted(names - theirs), sorted(theirs - names)
        if missing or extra:
            problems.append(
                f"{other.path} vs {reference.path}: "
                + "; ".join(
                    f"{label} {len(items)} ({', '.join(items[:_SHOW_NAMES])}{', ...' if len(items) > _SHOW_NAMES else ''})"
                    for label, items in (("missing", missing), ("extra", extra))
                    if items
                )
            )
    if problems:
        raise MergeError("tensor names differ between models: " + " | ".join(problems) + "; see --on_missing_tensor")


def _wrong_input_count(cfg: MergeConfig, count: int) -> bool:
    """Whether the merge takes an exact number of inputs (slerp: 2) other than ``count``: the tensor is then copied."""
    exact = methods.get("merge", cfg.merge_type).inputs
    return exact is not None and count != exact
