"""Command line of a merge: flags generated from MergeConfig; ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any, Optional, Sequence

from llm_merge.cli import recipe
from llm_merge.cli.common import OneLineParser, add_debug_and_version, add_option_flags, quiet_logging, run_command
from llm_merge.config.files import load_config_file
from llm_merge.config.options import METHOD_TABLE, MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.config.values import config_from_dict
from llm_merge.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per MergeConfig field (defaults suppressed to track what was given)."""
    parser = OneLineParser(
        prog="llm_merge",
        description=(
            "Merge fine-tuned checkpoints of one base model (safetensors, HF / PaddleNLP layout) "
            "into one model, streaming tensor by tensor. Options may also come from a JSON config "
            "file (positional CONFIG or --config); flags on the command line override it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="merge_method -> (sparsify_type, merge_type): "
        + ", ".join(f"{m}=({s}, {t})" for m, (s, t) in METHOD_TABLE.items()),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("config", nargs="?", help="JSON config file with any of the options below")
    parser.add_argument("--config", dest="config_flag", metavar="FILE", help="JSON config file (same as the positional CONFIG)")
    add_option_flags(parser, MergeConfig)
    add_debug_and_version(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[MergeConfig, argparse.Namespace]:
    """Parse flags (and the config file they name) into an unresolved MergeConfig."""
    args = build_parser().parse_args(argv)
    given = vars(args).copy()
    positional, flagged = given.pop("config", None), given.pop("config_flag", None)
    given.pop("debug", None)
    if positional and flagged and positional != flagged:
        raise ConfigError(f"--config: two config files given ({positional} and {flagged}); give one")
    values: dict[str, Any] = {}
    config_path = flagged or positional
    if config_path:
        values.update(load_config_file(config_path))
        config_from_dict(values, source=f"config file {config_path}")  # reject unknown keys early, by name
    values.update(given)
    return config_from_dict(values, source="options"), args


def _merge_command(argv: Optional[Sequence[str]]) -> None:
    raw, _ = parse_config(argv)
    cfg = resolve(raw)
    quiet_logging(cfg.quiet)
    if cfg.dry_run:
        print(dry_run_text(cfg))
        return
    from llm_merge.api import merge  # after validation: keeps --help fast

    merge(cfg)


def dry_run_text(cfg: MergeConfig) -> str:
    """``--dry_run``: the merge's plan as text (headers only; nothing is read or written)."""
    from llm_merge.api import plan_merge
    from llm_merge.report.dry_run import format_plan_summary

    return format_plan_summary(plan_merge(cfg))


def _one_blas_thread() -> None:
    """One OpenBLAS thread per process, unless the user chose otherwise or NumPy is already loaded.

    Worker processes are the merge's parallelism; OpenBLAS's idle pool only spins against them
    (perf: ~0.1 s of CPU per merge on 2 cores, in a thread of the main process).
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a merge from command-line flags, a mergekit YAML recipe, or ``inspect ...``; returns the process exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["inspect"]:  # llm-merge inspect --base_model_path BASE --model_path_list A B ...
        from llm_merge.cli import inspection

        return inspection.main(args[1:])
    if recipe.is_recipe_invocation(args):
        return recipe.main(argv)
    return run_command(argv, _merge_command)


def main_entry() -> None:
    """Console-script entry point (``llm-merge``, ``tools/mergekit.py``): run ``main`` and exit with its code.

    Process-wide settings live here, not in ``main`` (which callers may run in their own process):
    one BLAS thread; no garbage collection while the command starts up, since start-up builds only
    objects that live to the end (modules, numba's registries and kernels, the plan), and collections
    among them cost a compiled merge ~0.04 s (0.2B family, linear: medians 0.825 s against 0.87 s);
    the merge itself runs with the collector on (``run.pool.run_tasks``); and a heap frozen before
    exiting, since the interpreter's last garbage collection would otherwise walk every object numba
    made (~0.1 s of every run).
    """
    _one_blas_thread()
    gc.disable()
    code = main()
    gc.freeze()
    sys.exit(code)

