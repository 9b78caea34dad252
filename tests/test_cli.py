"""CLI: flags <-> MergeConfig fields, boolean forms, config files, help and exit codes."""

import dataclasses
import json

import pytest

from llm_merge.cli.merge import build_parser, main, parse_config
from llm_merge.config.options import MergeConfig
from llm_merge.errors import ConfigError

BASE_ARGS = ["--model_path_list", "a", "b", "--output_path", "out"]


def test_every_field_is_a_flag_and_round_trips():
    help_text = build_parser().format_help()
    for f in dataclasses.fields(MergeConfig):
        assert f"--{f.name}" in help_text, f.name
    cfg, _ = parse_config(BASE_ARGS + ["--merge_method", "ties", "--weight_list", "0.6", "0.4", "--reserve_p", "0.3",
                                       "--seed", "7", "--n_process", "2", "--output_dtype", "float32"])
    assert cfg.model_path_list == ["a", "b"] and cfg.weight_list == [0.6, 0.4]
    assert (cfg.reserve_p, cfg.seed, cfg.n_process, cfg.output_dtype) == (0.3, 7, 2, "float32")


@pytest.mark.parametrize("args, expected", [([], True), (["--normalize"], True), (["--normalize", "false"], False),
                                            (["--normalize", "False"], False), (["--no_normalize"], False),
                                            (["--normalize", "true"], True)])
def test_boolean_forms(args, expected):
    cfg, _ = parse_config(BASE_ARGS + args)
    assert cfg.normalize is expected


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 0.7)" in out and "(default: 0.14)" in out and "dare_ties" in out and "master_weights" in out


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"merge_method": "ties", "reserve_p": 0.2, "model_path_list": ["x", "y"], "output_path": "o"}))
    cfg, _ = parse_config([str(path), "--reserve_p", "0.5"])
    assert (cfg.merge_method, cfg.reserve_p, cfg.model_path_list) == ("ties", 0.5, ["x", "y"])
    cfg, _ = parse_config(["--config", str(path)])
    assert cfg.reserve_p == 0.2


def test_unknown_flag_fails(capsys):
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        parse_config(BASE_ARGS + ["--bogus", "1"])
    assert main(BASE_ARGS + ["--bogus", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["llm_merge: error: unrecognized arguments: --bogus"]


def test_config_error_exit_code_and_one_line_message(capsys):
    assert main(BASE_ARGS + ["--reserve_p", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llm_merge: error: --reserve_p: 2.0 out of range (0, 1]"]


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"merge_methd": "ties"}))
    assert main([str(path)]) == 2
    assert "merge_methd" in capsys.readouterr().err


def test_missing_input_is_a_runtime_error(tmp_path, capsys):
    assert main(["--model_path_list", str(tmp_path / "nope"), "--output_path", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "no such directory" in err
    assert not (tmp_path / "out").exists()


def test_merge_config_json_replays_the_merge(tmp_path, pair, mergekit):
    first, second = tmp_path / "first", tmp_path / "second"
    result = mergekit("--merge_method", "dare_ties", "--model_path_list", pair["ft1"], pair["ft2"],
                      "--base_model_path", pair["base"], "--output_path", first, "--seed", "3")
    assert result.returncode == 0, result.stderr
    replay = mergekit(first / "merge_config.json", "--output_path", second)
    assert replay.returncode == 0, replay.stderr
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("4", "4")])
def test_cli_runs_one_blas_thread_unless_told_otherwise(preset, expected):
    """Workers are the parallelism: a fresh CLI process keeps OpenBLAS to one thread (a user's setting wins)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset:
        env["OPENBLAS_NUM_THREADS"] = preset
    code = "import os; from llm_merge.cli import merge as cli; cli._one_blas_thread(); print(os.environ['OPENBLAS_NUM_THREADS'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == expected, result.stderr


# -- one flag helper for every front-end: merge, recipe mode and the LoRA fold -----------------


def _helps(parser):
    """{dest: help} of a parser's flags."""
    return {action.dest: action.help for action in parser._actions if action.option_strings and action.dest != "help"}


def test_lora_flags_come_from_lora_merge_config():
    from llm_merge.cli.lora import build_parser as lora_parser, parse_config as lora_config
    from llm_merge.lora.options import LoraMergeConfig

    help_text = lora_parser().format_help()
    for f in dataclasses.fields(LoraMergeConfig):
        assert f.metadata["help"] and f"--{f.name}" in help_text, f.name
    assert "--merge_lora_model_path" in help_text and "(default: 5GB)" in help_text and "master_weights" in help_text
    cfg = lora_config(["--lora_path", "L", "--merge_lora_model_path", "O", "--allow_pickle", "--quiet", "false",
                       "--no_overwrite", "--n_process", "3"])
    assert cfg == LoraMergeConfig(lora_path="L", output_path="O", allow_pickle=True, n_process=3)
    with pytest.raises(ConfigError, match="required: --lora_path, --output_path/--merge_lora_model_path"):
        lora_config([])
    with pytest.raises(ConfigError, match="--merge_prefix: invalid choice"):
        lora_config(["--lora_path", "L", "--output_path", "O", "--merge_prefix", "x"])


def test_recipe_flags_are_the_merge_flags():
    """Recipe mode's flags are MergeConfig's, with the same help (only the model card is on by default)."""
    from llm_merge.cli import recipe

    merge_helps, recipe_helps = _helps(build_parser()), _helps(recipe.build_parser())
    for name in recipe.RECIPE_OPTIONS:
        if name == "model_card":
            assert recipe_helps[name] == merge_helps[name].replace("(default: false)", "(default: true)")
        else:
            assert recipe_helps[name] == merge_helps[name], name
    assert recipe.parse_args(["r.yml", "out"]) == ("r.yml", "out", {"model_card": True})
    assert recipe.parse_args(["--config", "r.yml", "out", "--no_model_card", "--n_process", "2", "--overwrite"]) == (
        "r.yml", "out", {"model_card": False, "n_process": 2, "overwrite": True})
    with pytest.raises(ConfigError, match="usage: mergekit.py"):
        recipe.parse_args(["r.yml"])
    with pytest.raises(ConfigError, match="--seed: invalid int value"):
        recipe.parse_args(["r.yml", "out", "--seed", "x"])


def test_cli_import_loads_no_numeric_modules():
    """``--help`` stays fast: the merge and recipe command lines import neither NumPy nor numba."""
    import subprocess
    import sys

    from conftest import REPO

    code = "import sys, llm_merge.cli.merge; print(sorted(m for m in ('numpy', 'numba', 'yaml') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stderr
