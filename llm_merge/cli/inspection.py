"""Command line of ``llm-merge inspect`` / ``tools/inspect_models.py``: ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llm_merge.cli.common import (OneLineParser, add_debug_and_version, add_option_flags, options_from_flags,
                                  quiet_logging, run_command)
from llm_merge.report.inspection.options import InspectConfig


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per InspectConfig field (defaults suppressed: the dataclass holds them)."""
    parser = OneLineParser(
        prog="llm-merge inspect",
        description=(
            "Look before you merge: stream every model and the base like a merge and report, per tensor and per "
            "layer, the task vectors' size against the base, their pairwise cosines, TIES sign conflicts, the "
            "entries changed, the L1 mass a density keeps and tied magnitudes; flag models that do not share the "
            "base; suggest weights, densities and methods as a ready-to-run JSON config and YAML recipe."
        ),
    )
    add_option_flags(parser, InspectConfig, required=("base_model_path", "model_path_list"))
    add_debug_and_version(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> InspectConfig:
    """Parse flags into an unresolved InspectConfig."""
    return options_from_flags(build_parser(), InspectConfig, argv)


def _inspect_command(argv: Optional[Sequence[str]]) -> None:
    cfg = parse_config(argv)
    quiet_logging(cfg.quiet)
    from llm_merge.report.inspection.inspect_models import inspect_models  # after parsing: keeps --help fast
    from llm_merge.report.inspection.text import format_report

    print(format_report(inspect_models(cfg), cfg.table))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Inspect models against their base from command-line flags; returns the process exit code."""
    return run_command(argv, _inspect_command)


def main_entry() -> None:
    """Console-script style entry point (``tools/inspect_models.py``)."""
    sys.exit(main())
