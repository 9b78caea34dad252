"""Command line of ``llm-merge-moe`` / ``tools/mergekit_moe.py``: ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llm_merge.cli.common import (OneLineParser, add_debug_and_version, add_option_flags, option_help, options_from_flags,
                                  quiet_logging, run_command)
from llm_merge.moe.options import MoeConfig, check_options


def build_parser() -> argparse.ArgumentParser:
    """Positional recipe and output, and one flag per other MoeConfig field (defaults suppressed: the dataclass holds them)."""
    parser = OneLineParser(
        prog="llm-merge-moe",
        description=(
            "Build a mixture-of-experts model from dense fine-tunes with a mergekit-moe YAML recipe: attention, norms "
            "and embeddings from base_model, each expert's MLPs from its source_model, router weights from gate_mode "
            "(random, uniform_random, cheap_embed, hidden). Outputs Mixtral, Qwen2-MoE (shared experts) or Qwen3-MoE."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("recipe", help=option_help(MoeConfig, "recipe"))
    parser.add_argument("output_path", help=option_help(MoeConfig, "output_path"))
    add_option_flags(parser, MoeConfig, [name for name in MoeConfig.__dataclass_fields__ if name not in ("recipe", "output_path")])
    add_debug_and_version(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> MoeConfig:
    """Parse the command line into a checked MoeConfig (ConfigError, exit 2, on a bad flag)."""
    cfg = options_from_flags(build_parser(), MoeConfig, argv)
    check_options(cfg)
    return cfg


def _moe_command(argv: Optional[Sequence[str]]) -> None:
    cfg = parse_config(argv)
    quiet_logging(cfg.quiet)
    from llm_merge.moe.recipe import load_moe_recipe
    from llm_merge.moe.write import build_moe  # after parsing: keeps --help fast

    build_moe(load_moe_recipe(cfg.recipe), cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``llm-merge-moe RECIPE.yml OUTPUT [--n_process N] [--seed S] [--overwrite] ...``; returns the exit code."""
    return run_command(argv, _moe_command)


def main_entry() -> None:
    """Console-script entry point (``llm-merge-moe``, ``tools/mergekit_moe.py``)."""
    sys.exit(main())
