"""Command line of recipe mode: ``python tools/mergekit.py RECIPE.yml OUTPUT [flags]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from llm_merge.cli.common import OneLineParser, add_debug_and_version, add_option_flags, option_help, quiet_logging, run_command
from llm_merge.config.options import MergeConfig
from llm_merge.config.recipe_files import read_recipe_documents
from llm_merge.config.recipes import recipe_to_config
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError


#: the merge options recipe mode takes from its command line (the recipe gives the others)
RECIPE_OPTIONS = ("n_process", "seed", "max_shard_size", "overwrite", "quiet", "model_card", "output_format", "gguf_type",
                  "force", "dry_run")


#: recipe mode's own defaults: a recipe's merge comes with its model card
RECIPE_DEFAULTS = {"model_card": True}


def build_parser() -> argparse.ArgumentParser:
    """Positional recipe and output, ``--config``, and one flag per RECIPE_OPTIONS field of MergeConfig."""
    parser = OneLineParser(prog="mergekit.py", description="Run a mergekit YAML recipe with llm_merge.",
                           argument_default=argparse.SUPPRESS)
    parser.add_argument("recipe", nargs="?", help="mergekit YAML recipe")
    parser.add_argument("output_path", nargs="?", help=option_help(MergeConfig, "output_path"))
    parser.add_argument("--config", dest="config_flag", metavar="RECIPE", help="the recipe (instead of the positional one)")
    parser.add_argument("--intermediate_dir", metavar="DIR", help="multi-document recipes: where the named documents "
                        "are built (an intermediate built from the same document and inputs is reused)")
    add_option_flags(parser, MergeConfig, RECIPE_OPTIONS, defaults=RECIPE_DEFAULTS)
    add_debug_and_version(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[str, str, dict[str, Any]]:
    """(recipe path, output directory, the MergeConfig options the flags set)."""
    options = vars(build_parser().parse_args(argv))
    positional = [p for p in (options.pop("recipe", None), options.pop("output_path", None)) if p is not None]
    config_flag = options.pop("config_flag", None)
    options.pop("debug", None)
    if config_flag:
        recipe_path, rest = config_flag, positional
    else:
        recipe_path, rest = (positional[0] if positional else None), positional[1:]
    if recipe_path is None or len(rest) != 1:
        raise ConfigError("usage: mergekit.py [--config] RECIPE.yml OUTPUT_DIR")
    return recipe_path, rest[0], options


def _recipe_command(argv: Optional[Sequence[str]]) -> None:
    recipe_path, output_path, options = parse_args(argv)
    intermediate_dir = options.pop("intermediate_dir", None)
    text, documents = read_recipe_documents(recipe_path)
    if len(documents) == 1 and not isinstance(documents[0], dict):
        raise ConfigError(f"recipe {recipe_path}: expected a mapping with merge_method, models, ...")
    if len(documents) > 1 or "name" in documents[0]:
        from llm_merge.cli.recipe_multi import run_documents

        quiet_logging(bool(options.get("quiet")))
        run_documents(documents, recipe_path, output_path, intermediate_dir, options)
        return
    options["recipe_text"], recipe = text, documents[0]
    cfg = resolve(recipe_to_config(recipe, output_path, base_dir=Path(recipe_path).resolve().parent, **options))
    quiet_logging(cfg.quiet)
    if cfg.dry_run:
        from llm_merge.cli.merge import dry_run_text

        print(dry_run_text(cfg))
        return
    from llm_merge.api import merge  # after validation: keeps refusals fast

    merge(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python tools/mergekit.py [--config] recipe.yml OUT [--overwrite] [--n_process N] ...``; returns the exit code."""
    return run_command(argv, _recipe_command)


_YAML_SUFFIXES = (".yml", ".yaml")


def is_recipe_invocation(argv) -> bool:
    """Whether ``tools/mergekit.py`` was given a YAML recipe (else it is the PaddleNLP-flag CLI).

    The recipe is the first argument or the value of ``--config``; an output directory or any
    other value that happens to end in ``.yml`` never switches the mode.
    """
    args = [str(a) for a in argv]
    if args and not args[0].startswith("-") and args[0].endswith(_YAML_SUFFIXES):
        return True
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1].endswith(_YAML_SUFFIXES)
        if arg.startswith("--config="):
            return arg.partition("=")[2].endswith(_YAML_SUFFIXES)
    return False

