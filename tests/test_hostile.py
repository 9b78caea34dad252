"""Hostile and careless input through the command line: typed configs, paths, non-finite results,
bounded reads, one-line messages. Every case checks the exit code, that stderr is one line,
and that nothing was lost or left behind."""

import json
import os
import struct
import time

import numpy as np
import pytest

from checkpoints import write_checkpoint, write_safetensors
from conftest import REPO, run_mergekit

LORA = REPO / "tools" / "merge_lora_params.py"


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def cli(capsys):
    """``tools/mergekit.py ARGS`` run in this process (the same ``main`` and error contract, no interpreter start-up),
    for the cases that stop before any merge work."""
    from llm_merge.cli.merge import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        return Result(code, capsys.readouterr().err)

    return run


def one_line_error(result, code, *needles):
    """The run failed with ``code`` and exactly one stderr line naming every needle."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm_merge: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_left(out):
    """No output and no staging directory named after ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")) == []


def config_file(path, **values):
    path.write_text(json.dumps(values))
    return path


@pytest.fixture
def previous_output(tmp_path):
    """An existing output directory holding a user's own file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


# -- 1. typed configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, wanted", [
    ("overwrite", "false", "expected true or false"),
    ("normalize", "false", "expected true or false"),
    ("rescale", "no", "expected true or false"),
    ("allow_pickle", "false", "expected true or false"),
    ("n_process", "2", "expected an integer"),
    ("n_process", 2.0, "expected an integer"),
    ("reserve_p", "0.5", "expected a number"),
    ("reserve_p", True, "expected a number"),
    ("weight_list", ["1", "1"], "expected a list of numbers"),
    ("weight_list", 1, "expected a list of numbers"),
    ("model_path_list", "a b", "expected a list of strings"),
    ("seed", None, "expected an integer"),
])
def test_config_values_of_the_wrong_type_are_refused(cli, tmp_path, pair, previous_output, option, value, wanted):
    values = {"merge_method": "ties", "model_path_list": [str(pair["ft1"]), str(pair["ft2"])],
              "base_model_path": str(pair["base"]), "output_path": str(previous_output), option: value}
    result = cli(config_file(tmp_path / "c.json", **values))
    one_line_error(result, 2, f"option {option}", wanted)
    assert sorted(os.listdir(previous_output)) == ["notes.txt"]


def test_a_quoted_false_never_deletes_an_old_output(cli, tmp_path, pair, previous_output):
    """``"overwrite": "false"`` once counted as true and replaced the user's directory."""
    cfg = config_file(tmp_path / "c.json", model_path_list=[str(pair["ft1"]), str(pair["ft2"])],
                      output_path=str(previous_output), overwrite="false")
    one_line_error(cli(cfg), 2, "overwrite", "'false'")
    assert (previous_output / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("setting, where", [
    ({"normalize": "false"}, "tensor_parameters.normalize"),
    ({"reserve_p": [0.5, "0.7"]}, "tensor_parameters.reserve_p[1]"),
    ({"weight_list": [[{"filter": "w", "value": "2"}], 1]}, "tensor_parameters.weight_list[0][0].value"),
    ({"reserve_p": [{"filter": 3, "value": 0.5}]}, "tensor_parameters.reserve_p[0].filter"),
])
def test_per_tensor_settings_are_typed(cli, tmp_path, pair, setting, where):
    cfg = config_file(tmp_path / "c.json", merge_method="ties", model_path_list=[str(pair["ft1"]), str(pair["ft2"])],
                      base_model_path=str(pair["base"]), output_path=str(tmp_path / "out"), tensor_parameters=setting)
    one_line_error(cli(cfg), 2, where)
    assert nothing_left(tmp_path / "out")


def recipe(tmp_path, text, name="r.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("parameters, where", [
    ("normalize: 'false'", "parameters.normalize"),
    ("rescale: 'true'", "parameters.rescale"),
    ("int8_mask: 'yes'", "parameters.int8_mask"),
])
def test_recipe_parameters_are_typed(cli, tmp_path, pair, parameters, where):
    path = recipe(tmp_path, f"""merge_method: dare_ties
base_model: {pair['base']}
models:
  - model: {pair['ft1']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {pair['ft2']}
    parameters: {{weight: 0.5, density: "0.5"}}
parameters: {{{parameters}}}
""")
    one_line_error(cli(path, tmp_path / "out"), 2, "recipe:")
    assert nothing_left(tmp_path / "out")


def test_recipe_model_parameter_as_string_is_refused(cli, tmp_path, pair):
    path = recipe(tmp_path, f"""merge_method: ties
base_model: {pair['base']}
models:
  - model: {pair['ft1']}
    parameters: {{weight: 0.5, density: "0.5"}}
  - model: {pair['ft2']}
    parameters: {{weight: 0.5, density: 0.5}}
""")
    one_line_error(cli(path, tmp_path / "out"), 2, "models[0].parameters.density", "expected a number")


# -- 2. paths ----------------------------------------------------------------------------------------------
def test_slice_source_that_is_the_output_is_refused_even_with_overwrite(cli, tmp_path, pair):
    victim = pair["ft2"]
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    cfg = config_file(tmp_path / "c.json", model_path_list=[str(pair["ft1"])], output_path=str(victim), overwrite=True,
                      merge_method="passthrough",
                      slices=[{"model": str(pair["ft1"]), "layer_range": [0, 1]}, {"model": str(victim), "layer_range": [0, 1]}])
    one_line_error(cli(cfg), 2, "--output_path", "input")
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def test_tokenizer_source_that_is_the_output_is_refused(cli, tmp_path, pair):
    result = cli("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", tmp_path / "tok",
                          "--tokenizer_source", tmp_path / "tok" / "sub", "--overwrite")
    one_line_error(result, 2, "--output_path", "contains input")


def test_overwrite_never_replaces_the_current_directory(tmp_path, pair):
    import subprocess
    import sys
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("mine")
    for output in (work, work.parent):
        result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit.py"), "--model_path_list", str(pair["ft1"]),
                                 str(pair["ft2"]), "--output_path", str(output), "--overwrite"], cwd=work,
                                capture_output=True, text=True, timeout=120)
        one_line_error(result, 2, "the current directory")
    assert (work / "precious.txt").read_text() == "mine"


def test_recipe_paths_resolve_beside_the_recipe_not_the_current_directory(tmp_path, pair):
    """A same-named model in the current directory is never merged instead of the one beside the recipe."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("ft1", "ft2", "base"):
        os.symlink(pair[name], recipes / name)
    decoy_cwd = tmp_path / "cwd"
    decoy = {"w": np.full((8, 4), 7, np.float32), "b": np.full(4, 7, np.float32), "ids": np.arange(4)}
    for name in ("ft1", "ft2"):
        write_checkpoint(decoy_cwd / name, decoy)
    path = recipe(recipes, "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1}\n"
                           "  - model: ft2\n    parameters: {weight: 1}\n")
    out = tmp_path / "out"
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit.py"), str(path), str(out)], cwd=decoy_cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from checkpoints import read_checkpoint
    merged = read_checkpoint(out)
    assert not np.any(merged["w"] == 7)

    missing = recipe(recipes, "merge_method: linear\nmodels:\n  - model: only_here\n    parameters: {weight: 1}\n", "m.yml")
    write_checkpoint(decoy_cwd / "only_here", decoy)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit.py"), str(missing), str(tmp_path / "o2")],
                            cwd=decoy_cwd, capture_output=True, text=True, timeout=120)
    one_line_error(result, 2, "read beside the recipe", "absolute path")


def test_an_output_named_like_a_recipe_is_an_ordinary_merge(tmp_path, pair):
    out = tmp_path / "merged.yml"
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file()


# -- 3. nothing non-finite that the inputs did not have ----------------------------------------------------
@pytest.mark.parametrize("weights", [["1e308", "1e308"], ["3e38", "3e38"], ["inf", "1"], ["nan", "1"]])
def test_weights_that_overflow_float32_are_refused(cli, tmp_path, pair, weights):
    result = cli("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", tmp_path / "out",
                          "--weight_list", *weights)
    one_line_error(result, 2, "--weight_list", "float32")
    assert nothing_left(tmp_path / "out")


@pytest.fixture
def large_pair(tmp_path):
    """Two float32 models whose values are finite but large (1e4 .. 1e5)."""
    rng = np.random.default_rng(1)
    dirs = []
    for name in ("big1", "big2"):
        tensors = {"w": rng.uniform(1e4, 1e5, size=(64, 32)).astype(np.float32), "b": np.ones(32, np.float32)}
        dirs.append(write_checkpoint(tmp_path / name, tensors))
    return dirs


@pytest.mark.parametrize("numba", ["0", "1"])
@pytest.mark.parametrize("n_process", ["1", "2"])
def test_a_merge_that_overflows_publishes_nothing(tmp_path, large_pair, numba, n_process):
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", *large_pair, "--output_path", out, "--weight_list", "1e35", "1e35",
                          "--normalize", "false", "--n_process", n_process, env={**os.environ, "LLM_MERGE_NUMBA": numba})
    one_line_error(result, 1, "tensor w", "NaN/Inf", "finite inputs")
    assert nothing_left(out)


@pytest.mark.parametrize("numba", ["0", "1"])
def test_float16_output_overflow_is_an_error(tmp_path, large_pair, numba):
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", *large_pair, "--output_path", out, "--output_dtype", "float16",
                          env={**os.environ, "LLM_MERGE_NUMBA": numba})
    one_line_error(result, 1, "tensor w", "F16")
    assert nothing_left(out)


def test_large_but_finite_merge_still_works(tmp_path, large_pair):
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", *large_pair, "--output_path", out, "--quiet")
    assert result.returncode == 0, result.stderr


def raw_header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry, needle", [
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}, "2^63"),
    ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}, "2^63"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}, "data_offsets"),
    ({"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}, "X99"),
])
def test_malformed_headers_are_refused(cli, tmp_path, pair, entry, needle):
    raw_header_file(tmp_path / "bad" / "model.safetensors", {"w": entry}, b"\0" * 8)
    out = tmp_path / "out"
    one_line_error(cli("--model_path_list", pair["ft1"], tmp_path / "bad", "--output_path", out), 1, needle)
    assert nothing_left(out)


@pytest.mark.parametrize("weight_map", [{"w": 3}, {"w": ["model.safetensors"]}, {"w": None}, []])
def test_index_whose_weight_map_is_not_names_is_refused(cli, tmp_path, pair, weight_map):
    bad = write_checkpoint(tmp_path / "bad", {"w": np.zeros((8, 4), np.float32)})
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_line_error(cli("--model_path_list", pair["ft1"], bad, "--output_path", tmp_path / "out"), 1, "weight_map")


# -- 4. bounded reads, no hangs ----------------------------------------------------------------------------
def make_special(path, kind):
    if path.exists():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model.safetensors"])
def test_side_files_that_are_not_regular_files_are_refused_at_once(cli, tmp_path, pair, kind, name):
    make_special(pair["ft2"] / name, kind)
    started = time.monotonic()
    result = cli("--model_path_list", pair["ft2"], pair["ft1"], "--output_path", tmp_path / "out")
    one_line_error(result, 1, name, "regular file")
    assert time.monotonic() - started < 30
    assert nothing_left(tmp_path / "out")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_tokenizer_file_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    from llm_merge.errors import MergeError
    from llm_merge.plan.vocab import tokenizer_vocab

    make_special(tmp_path / "tokenizer.json", kind)
    with pytest.raises(MergeError, match="not a regular file"):
        tokenizer_vocab(tmp_path)


def test_config_file_that_is_a_fifo_is_refused(cli, tmp_path):
    fifo = tmp_path / "c.json"
    os.mkfifo(fifo)
    one_line_error(cli(fifo), 2, "a FIFO")


def test_yaml_alias_bomb_is_refused_quickly(cli, tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 10):
        previous, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [*{previous},*{previous},*{previous},*{previous},*{previous},*{previous},"
                     f"*{previous},*{previous},*{previous}]")
    lines.append("merge_method: linear\nmodels: *j")
    path = recipe(tmp_path, "\n".join(lines) + "\n")
    started = time.monotonic()
    one_line_error(cli(path, tmp_path / "out"), 2, "aliases expand")
    assert time.monotonic() - started < 20


def test_recursive_yaml_alias_is_refused(cli, tmp_path):
    path = recipe(tmp_path, "merge_method: linear\nmodels: &m [*m]\n")
    one_line_error(cli(path, tmp_path / "out"), 2, "recipe")


def test_deeply_nested_json_is_one_line(cli, tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[" * 100000 + "]" * 100000)
    one_line_error(cli(path), 2, "c.json")


# -- 5. messages are one line, control characters escaped --------------------------------------------------
def test_control_characters_in_tensor_names_are_escaped(tmp_path, pair):
    evil = "w\x1b[2J\rFAKE: all good\n"
    write_checkpoint(tmp_path / "odd", {evil: np.zeros((8, 4), np.float32), "b": np.zeros(4, np.float32), "ids": np.arange(4)})
    result = run_mergekit("--model_path_list", pair["ft1"], tmp_path / "odd", "--output_path", tmp_path / "out")
    line = one_line_error(result, 1)
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    assert "\\x1b" in line


def test_bad_flag_value_is_one_line(cli, tmp_path, pair):
    one_line_error(cli("--model_path_list", pair["ft1"], "--output_path", tmp_path / "o", "--n_process", "x"),
                   2, "--n_process")


# -- LoRA adapter configs ------------------------------------------------------------------------------------
def peft_adapter(tmp_path, **config):
    """A PEFT adapter (rank 2) for a base weight ``w.weight`` [8, 4]."""
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    write_safetensors(adapter / "adapter_model.safetensors", {
        "base_model.model.w.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "base_model.model.w.lora_B.weight": rng.normal(size=(8, 2)).astype(np.float32)})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    return adapter


def run_lora(*args, **kwargs):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(LORA), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.mark.parametrize("config, needle", [
    ({"use_rslora": "false"}, "use_rslora"),
    ({"fan_in_fan_out": "true"}, "fan_in_fan_out"),
    ({"alpha_pattern": {"w": float("inf")}}, "alpha_pattern"),
    ({"alpha_pattern": {"w": "4"}}, "alpha_pattern"),
    ({"rank_pattern": {"w": 2.5}}, "rank_pattern"),
    ({"rank_pattern": ["w", 2]}, "rank_pattern"),
    ({"rank_pattern": {"(": 2}}, "regular expression"),
    ({"lora_alpha": 1e300}, "lora_alpha"),
])
def test_malformed_adapter_configs_are_one_line_errors(tmp_path, pair, config, needle):
    adapter = peft_adapter(tmp_path, **config)
    out = tmp_path / "out"
    one_line_error(run_lora("--model_name_or_path", pair["base"], "--lora_path", adapter, "--output_path", out), 1, needle)
    assert nothing_left(out)


def test_a_fold_that_overflows_the_output_dtype_publishes_nothing(tmp_path):
    base = write_checkpoint(tmp_path / "base", {"w.weight": np.ones((8, 4), np.float32)})
    adapter = peft_adapter(tmp_path, lora_alpha=2e6)
    out = tmp_path / "out"
    result = run_lora("--model_name_or_path", base, "--lora_path", adapter, "--output_path", out, "--output_dtype", "float16",
                      "--quiet")
    one_line_error(result, 1, "tensor w.weight", "NaN/Inf", "F16")
    assert nothing_left(out)
    result = run_lora("--model_name_or_path", base, "--lora_path", peft_adapter(tmp_path, lora_alpha=4),
                      "--output_path", out, "--output_dtype", "float16")
    assert result.returncode == 0, result.stderr
