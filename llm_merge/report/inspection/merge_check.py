"""The compatibility check before every merge: the verdict's rules on a few sampled rows of a few matrices.

From the plan's merged matrices (every model and the base present) ``SAMPLED_TENSORS`` are taken at
even steps through the model's order (so they spread over the layers), and from each ``SAMPLED_BLOCKS``
runs of ``BLOCK_ELEMENTS`` consecutive entries at even steps through the tensor: about 128 K entries
per model, read with positioned reads (a few hundred KB per model whatever its size). A mismatch stops
the merge before any output is written (exit 2, the model and the rule named) unless ``--force``; a
doubtful model is a warning. Merges without a base are not checked: their models have no common
reference to be measured from (two unrelated fine-tunes of different bases may well be merged on purpose).
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np

from llm_merge.errors import ConfigError, MergeError
from llm_merge.io.reader import InputTruncated, TensorReader
from llm_merge.report.inspection.geometry import weight_geometry
from llm_merge.report.inspection.verdict import DOUBTFUL, MISMATCH, Evidence, Finding, judge

log = logging.getLogger(__name__)

SAMPLED_TENSORS = 8
SAMPLED_BLOCKS = 4
BLOCK_ELEMENTS = 4096


def check_models(tasks: Sequence, names: Sequence[str], has_base: bool, force: bool) -> list[Finding]:
    """Judge every model of a plan's ``tasks`` (``names``: one per model, in order) against the base on sampled rows.

    Raises ConfigError at the first mismatch unless ``force``; logs doubtful findings (and, with
    ``force``, mismatches) as warnings. Returns the findings (empty without a base or anything to compare).
    """
    started = time.perf_counter()
    picked = sampled_tasks(tasks, len(names)) if has_base else []
    if not picked:
        return []
    evidence = sample_evidence(picked)
    findings = [judge(name, evidence[index]) for index, name in enumerate(names)]
    log.debug("compatibility check: %d sampled tensors in %.3f s", len(picked), time.perf_counter() - started)
    for finding in findings:
        if finding.level == MISMATCH and not force:
            raise ConfigError(f"--model_path_list: {finding.message()}; check the model, or pass --force to merge anyway "
                              "(llm-merge inspect shows the full picture)")
        if finding.level in (MISMATCH, DOUBTFUL):
            log.warning("%s%s (llm-merge inspect shows the full picture)", finding.message(),
                        "; merging anyway (--force)" if finding.level == MISMATCH else "")
    return findings


def sampled_tasks(tasks: Sequence, n_models: int) -> list:
    """Up to SAMPLED_TENSORS merged matrices over every model and the base, evenly spaced in plan order."""
    candidates = [t for t in tasks if t.mergeable and len(t.shape) >= 2 and t.models is None and len(t.inputs) == n_models
                  and t.base is not None and t.numel > 0]
    if len(candidates) <= SAMPLED_TENSORS:
        return candidates
    step = len(candidates) / SAMPLED_TENSORS
    return [candidates[int(i * step + step / 2)] for i in range(SAMPLED_TENSORS)]


def sample_evidence(tasks: Sequence) -> list[list[Evidence]]:
    """Per model, its evidence from sampled blocks of ``tasks`` against the base's."""
    evidence: list[list[Evidence]] = [[] for _ in tasks[0].inputs]
    with TensorReader() as reader:
        for task in tasks:
            try:
                base = _sample(reader, task.base)
                samples = [_sample(reader, info) for info in task.inputs]
            except InputTruncated as exc:  # the reader knows the file, not the tensor
                raise MergeError(f"compatibility check failed on tensor {task.name}: {exc}") from exc
            for index, sample in enumerate(samples):
                cosine, relative_norm, used = weight_geometry(sample, base)
                evidence[index].append(Evidence(task.name, cosine, relative_norm, used))
    return evidence


def _sample(reader: TensorReader, info) -> np.ndarray:
    """SAMPLED_BLOCKS runs of BLOCK_ELEMENTS entries at even steps through a tensor (all of a small one), as float32."""
    numel = info.numel
    if numel <= SAMPLED_BLOCKS * BLOCK_ELEMENTS:
        return reader.read_f32(info, 0, np.empty(numel, dtype=np.float32))
    step = (numel - BLOCK_ELEMENTS) // (SAMPLED_BLOCKS - 1)
    out = np.empty(SAMPLED_BLOCKS * BLOCK_ELEMENTS, dtype=np.float32)
    for block in range(SAMPLED_BLOCKS):
        reader.read_f32(info, block * step, out[block * BLOCK_ELEMENTS:(block + 1) * BLOCK_ELEMENTS])
    return out


def model_names(plan, model_paths: Optional[Sequence[str]]) -> list[str]:
    """How the check names each model: as given on the command line, else the plan's directory."""
    if model_paths is not None and len(model_paths) == len(plan.models):
        return [str(p) for p in model_paths]
    return [str(m.path) for m in plan.models]
