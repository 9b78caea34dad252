"""Python API: ``merge(config) -> output path``."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

from llm_merge.backends import get_ops
from llm_merge.config import MergeConfig, resolve
from llm_merge.errors import MergeError
from llm_merge.io import writer
from llm_merge.plan import MergePlan, build_plan
from llm_merge.runner import run_tasks

log = logging.getLogger(__name__)


class Terminated(MergeError):
    """SIGTERM received: the merge stops and leaves no output."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"terminated by signal {signum}; no output was written")


def merge(cfg: MergeConfig) -> Path:
    """Merge the models described by ``cfg``; returns the published output directory.

    Everything is written to a staging directory beside ``output_path`` and
    renamed into place only after every tensor is written and verified.
    """
    cfg = resolve(cfg)
    get_ops(cfg.tensor_type, cfg.device)  # fail now if the backend is unavailable
    plan = build_plan(cfg)
    output = Path(cfg.output_path)
    writer.check_output_path(output, cfg.overwrite)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with writer.staging_directory(output) as staging:
            writer.create_shards(staging, plan.shards)
            run_tasks(plan.tasks, cfg, staging)
            _finish(plan, cfg, staging)
            writer.publish(staging, output, cfg.overwrite)
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - started
    log.info(
        "merged %d tensors (%.2f GB) from %d model(s) into %s in %.1f s",
        len(plan.tasks), plan.total_size / 1e9, len(plan.models), output, seconds,
    )
    return output


def _finish(plan: MergePlan, cfg: MergeConfig, staging: Path) -> None:
    """Verify shards, then write the index, copied model files and merge_config.json."""
    writer.verify_shards(staging, plan.shards)
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map}
    writer.write_json(staging / f"{cfg.merge_prefix}.safetensors.index.json", index)
    writer.copy_model_files(plan.models[0].path, staging)
    writer.write_json(staging / "merge_config.json", dataclasses.asdict(cfg))
    writer.fsync_directory(staging)
