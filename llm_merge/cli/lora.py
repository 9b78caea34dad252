"""Command line of ``llm-merge-lora`` / ``tools/merge_lora_params.py``: ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llm_merge.cli.common import (OneLineParser, add_debug_and_version, add_option_flags, options_from_flags,
                                  quiet_logging, run_command)
from llm_merge.lora.options import LoraMergeConfig


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per LoraMergeConfig field (defaults suppressed: the dataclass holds them)."""
    parser = OneLineParser(
        prog="llm_merge",
        description=(
            "Fold a LoRA adapter (Hugging Face PEFT or PaddleNLP) into its base model: "
            "W' = W + scale * delta for every adapted weight, streamed tensor by tensor into a new "
            "safetensors checkpoint. scale = lora_alpha / r (lora_alpha / sqrt(r) with rslora)."
        ),
    )
    add_option_flags(parser, LoraMergeConfig, aliases={"output_path": ("--merge_lora_model_path",)},
                     required=("lora_path", "output_path"))
    add_debug_and_version(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> LoraMergeConfig:
    """Parse flags into an unresolved LoraMergeConfig."""
    return options_from_flags(build_parser(), LoraMergeConfig, argv)


def _fold_command(argv: Optional[Sequence[str]]) -> None:
    cfg = parse_config(argv)
    quiet_logging(cfg.quiet)
    from llm_merge.lora.fold import merge_lora

    merge_lora(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fold a LoRA adapter from command-line flags; returns the process exit code."""
    return run_command(argv, _fold_command)


def main_entry() -> None:
    """Console-script entry point (``llm-merge-lora``)."""
    sys.exit(main())
