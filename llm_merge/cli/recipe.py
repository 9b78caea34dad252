"""Command line of recipe mode: ``python tools/mergekit.py RECIPE.yml OUTPUT [flags]``."""

from __future__ import annotations

from pathlib import Path

from llm_merge.cli.common import OneLineParser, parse_bool, quiet_logging, run_command
from llm_merge.config.recipes import read_recipe, recipe_to_config
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError


def main(argv=None) -> int:
    """``python tools/mergekit.py [--config] recipe.yml OUT [--overwrite] [--n_process N] ...``"""
    def command(argv):
        parser = OneLineParser(prog="mergekit.py", description="Run a mergekit YAML recipe with llm_merge.")
        parser.add_argument("recipe", nargs="?", help="mergekit YAML recipe")
        parser.add_argument("output_path", nargs="?", help="directory to write the merged model to")
        parser.add_argument("--config", dest="config_flag", metavar="RECIPE", help="the recipe (instead of the positional one)")
        parser.add_argument("--n_process", type=int, help="worker processes (default: 1)")
        parser.add_argument("--seed", type=int, help="seed of the random draws (default: 42)")
        parser.add_argument("--max_shard_size", help="largest output shard (default: 5GB)")
        parser.add_argument("--overwrite", nargs="?", const=True, type=parse_bool, help="replace a non-empty output directory")
        parser.add_argument("--quiet", nargs="?", const=True, type=parse_bool, help="no progress bar")
        parser.add_argument("--no_model_card", action="store_true", help="do not write README.md (the model card) into the output")
        parser.add_argument("--debug", action="store_true", help="full traceback on errors")
        args = parser.parse_args(argv)
        positional = [p for p in (args.recipe, args.output_path) if p is not None]
        if args.config_flag:
            recipe_path, rest = args.config_flag, positional
        else:
            recipe_path, rest = (positional[0] if positional else None), positional[1:]
        if recipe_path is None or len(rest) != 1:
            raise ConfigError("usage: mergekit.py [--config] RECIPE.yml OUTPUT_DIR")
        extra = {k: v for k, v in vars(args).items() if k in ("n_process", "seed", "max_shard_size", "overwrite", "quiet") and v is not None}
        extra["model_card"] = not args.no_model_card
        extra["recipe_text"], recipe = read_recipe(recipe_path)
        cfg = recipe_to_config(recipe, rest[0], base_dir=Path(recipe_path).resolve().parent, **extra)
        from llm_merge.api import merge  # after validation: keeps refusals fast

        cfg = resolve(cfg)
        quiet_logging(cfg.quiet)
        merge(cfg)
        return cfg

    return run_command(argv, command)


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

