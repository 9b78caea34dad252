"""Python API: ``merge(config) -> output path``."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from llm_merge.backends import get_ops
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.run.engine import MergerFactory
from llm_merge.run.kernel_choice import worth_compiling
from llm_merge.errors import ConfigError
from llm_merge.io import pdparams, writer
from llm_merge.io.gguf_output import import_gguf
from llm_merge.lora.reference import open_references
from llm_merge.plan.build import build_plan
from llm_merge.plan.layout import MergePlan
from llm_merge.plan.reconcile import read_model_config
from llm_merge.report.inspection.merge_check import check_models, model_names
from llm_merge.report.records import output_records
from llm_merge.run import ranks
from llm_merge.run.pool import run_tasks
from llm_merge.run.vocab_rows import built_rows

if TYPE_CHECKING:
    from llm_merge.io.gguf_output.layout import GGUFLayout

log = logging.getLogger(__name__)


def merge(cfg: MergeConfig) -> Path:
    """Merge the models described by ``cfg``; returns the published output directory.

    Everything is written to a staging directory beside ``output_path`` and
    renamed into place only after every tensor is written and verified.
    """
    cfg = resolve(cfg)
    output = Path(cfg.output_path)
    if cfg.dry_run:  # the plan only: headers are read, nothing is written
        from llm_merge.report.dry_run import format_plan_summary

        log.info("%s", format_plan_summary(plan_merge(cfg)))
        return output
    get_ops(cfg.tensor_type, cfg.device, compiled=False)  # fail now if the backend is unavailable (kernels: MergerFactory)
    dist = ranks.context(cfg)
    finalize = None
    if cfg.output_format == "pdparams":
        if dist is not None:
            raise ConfigError("--output_format pdparams: not supported in a multi-rank merge; merge to safetensors")
        pdparams.import_paddle("--output_format pdparams")  # fail now if Paddle is missing
        finalize = functools.partial(pdparams.safetensors_to_pdparams, prefix=cfg.merge_prefix)
    if cfg.output_format == "gguf":
        if dist is not None:
            raise ConfigError("--output_format gguf: not supported in a multi-rank merge; merge to safetensors")
        import_gguf()  # fail now if the extra is missing
    refuse = "pdparams inputs are not supported in a multi-rank merge; convert them to safetensors first" if dist is not None else None
    # pdparams inputs (only with --allow_pickle) become safetensors copies beside the output, removed at the end
    with pdparams.InputConverter(output, allow_pickle=cfg.allow_pickle, overwrite=cfg.overwrite, refuse=refuse) as convert, \
            contextlib.ExitStack() as scratch:
        plan = build_plan(cfg, convert, open_references(cfg, convert))  # MODEL+LORA inputs fold on the fly
        scratch.enter_context(built_rows(plan.row_jobs))  # mergekit's tokenizer merge: input rows on the output vocabulary
        # sampled rows of a few matrices: a model that does not share the base stops here (unless --force)
        check_models(plan.tasks, model_names(plan, None if cfg.slices else cfg.model_path_list), plan.base is not None, cfg.force)
        if finalize is not None:
            pdparams.check_output_dtypes(plan.tasks)
        started = time.perf_counter()
        factory = MergerFactory(cfg, compiled=worth_compiling(cfg, sum(t.in_bytes for t in plan.tasks)))
        if dist is not None:  # one merge shared by many ranks (paddle.distributed.launch, srun, --rank/--world_size)
            return ranks.merge_distributed(cfg, plan, factory, dist, output, output_records(cfg, plan))
        if cfg.output_format == "gguf":  # one .gguf file, converted tensor by tensor as it is merged
            # imported here: the GGUF writer's modules (and ml_dtypes, ~0.6 s) load only for this output
            from llm_merge.io.gguf_output.publish import write_gguf_atomically
            from llm_merge.io.gguf_output.writer import GGUFWriterFactory

            layout = gguf_layout(plan, cfg.gguf_type, f"{cfg.merge_prefix}.gguf", output.name)
            make_writer = GGUFWriterFactory(layout)
            write_gguf_atomically(
                output, layout, overwrite=cfg.overwrite,
                fill=lambda staging: run_tasks(plan.tasks, factory.bind(staging, make_writer), cfg.n_process, cfg.quiet, "merging", cfg.start_method),
                records={name: value for name, value in output_records(cfg, plan).items() if name != "config.json"},
            )
            return _merged(plan, output, started, factory)
        writer.write_model_atomically(
            output,
            plan,
            overwrite=cfg.overwrite,
            prefix=cfg.merge_prefix,
            fill=lambda staging: run_tasks(plan.tasks, factory.bind(staging), cfg.n_process, cfg.quiet, "merging", cfg.start_method),
            model_files_from=plan.models[0].path,
            records=output_records(cfg, plan),
            finalize=finalize,
            tokenizer_files_from=plan.tokenizer_from,
        )
    return _merged(plan, output, started, factory)


def plan_merge(cfg: MergeConfig) -> dict:
    """``--dry_run``: the plan of a merge as plain values (tensors, bytes, shards, expected time and peak
    memory; ``report.dry_run``), from checkpoint headers only."""
    from llm_merge.report.dry_run import plan_summary

    cfg = resolve(cfg)
    return plan_summary(cfg, build_plan(cfg, _refuse_conversion, open_references(cfg, _refuse_conversion)))


def _refuse_conversion(directory: Path, prefix: str) -> None:
    """A dry run reads no tensor data, so .pdparams inputs (converted before planning) cannot be planned."""
    if any(directory.glob("*.pdparams")):
        raise ConfigError(f"--dry_run: {directory} holds .pdparams weights, which are read to be converted before "
                          "planning; convert them to safetensors first, or merge without --dry_run")


def _merged(plan: MergePlan, output: Path, started: float, factory: MergerFactory) -> Path:
    """Say what was merged, where, in how long and by which code (``run.kernel_choice`` picks it)."""
    code = "Paddle" if factory.cfg.tensor_type == "pd" else "compiled kernels" if factory.compiled else "plain NumPy"
    log.info(
        "merged %d tensors (%.2f GB) from %d model(s) into %s in %.1f s (%s)",
        len(plan.tasks), plan.total_size / 1e9, len(plan.models), output, time.perf_counter() - started, code,
    )
    return output


def gguf_layout(plan: MergePlan, gguf_type: Optional[str], file_name: str, model_name: str) -> GGUFLayout:
    """The .gguf file of a merge plan: the output's config.json and tokenizer files (``--tokenizer_source``'s)."""
    from llm_merge.io.gguf_output.layout import plan_gguf

    source = plan.models[0].path
    config = plan.config_json if plan.config_json is not None else read_model_config(source)
    return plan_gguf(plan.shards, config, str(source / "config.json"), plan.tokenizer_from or source, gguf_type,
                     file_name, model_name)
