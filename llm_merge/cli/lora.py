"""Command line of ``llm-merge-lora`` / ``tools/merge_lora_params.py``: ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llm_merge import __version__
from llm_merge.cli.common import OneLineParser, parse_bool, quiet_logging, run_command
from llm_merge.io.dtypes import OUTPUT_DTYPES
from llm_merge.lora.options import LoraMergeConfig


def _bool_flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(f"--{name}", nargs="?", const=True, default=False, type=parse_bool, metavar="true|false", help=f"{help_text} (default: false)")
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"same as --{name} false")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="llm_merge",
        description=(
            "Fold a LoRA adapter (Hugging Face PEFT or PaddleNLP) into its base model: "
            "W' = W + scale * delta for every adapted weight, streamed tensor by tensor into a new "
            "safetensors checkpoint. scale = lora_alpha / r (lora_alpha / sqrt(r) with rslora)."
        ),
    )
    parser.add_argument("--model_name_or_path", help="base model directory (default: base_model_name_or_path of the adapter config, if a local directory)")
    parser.add_argument("--lora_path", required=True, help="adapter directory: adapter_config.json (PEFT) or lora_config.json (PaddleNLP) and its weights")
    parser.add_argument("--output_path", "--merge_lora_model_path", dest="output_path", required=True, help="directory to write the merged model to")
    parser.add_argument("--merge_prefix", default="model", choices=("model", "master_weights"), help="base checkpoint prefix: {prefix}.safetensors[.index.json] (default: model)")
    parser.add_argument("--output_dtype", default=None, choices=tuple(OUTPUT_DTYPES), help="dtype of float tensors (default: the base's)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB or a byte count (default: 5GB)")
    parser.add_argument("--n_process", type=int, default=1, help="worker processes; changes speed only, never the output bytes (default: 1)")
    _bool_flag(parser, "allow_pickle", "load a PaddleNLP lora_model_state.pdparams (a pickle: it can execute code; only for trusted files)")
    _bool_flag(parser, "overwrite", "replace a non-empty output_path")
    _bool_flag(parser, "quiet", "no progress bar or summary lines")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"llm_merge {__version__}")
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> LoraMergeConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("debug", None)
    return LoraMergeConfig(**args)


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
