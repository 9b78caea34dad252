"""mergekit's sce, ram and ramplus_tl: by hand, against NumPy ports of mergekit, chunked and streamed, NumPy =
Paddle, via recipes and flags, and their errors."""

import dataclasses

import numpy as np
import pytest

import mergekit_reference_sce_ram as MK
from checkpoints import make_llama_family, read_checkpoint

from llm_merge import methods
from llm_merge.api import merge
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.cli.merge import main as cli_main
from llm_merge.cli.recipe import main as recipe_main
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError
from llm_merge.run import engine
from llm_merge.run.binding import call

OPS = NumpyOps(False)
DEFAULTS = dataclasses.asdict(MergeConfig())


def run_spec(name, ts, step=None, ops=OPS, host=OPS, **options):
    """The registered merge on task vectors ``ts`` as the engine runs it: every reduce pass over the chunks
    (sums added as the engine adds them), then the apply pass chunk by chunk; returns the merged task vector."""
    spec = methods.get("merge", name)
    shape, flat = ts[0].shape, [t.ravel() for t in ts]
    n = flat[0].size
    step = step or n
    options = {**DEFAULTS, **options}
    engine_values = {"ops": ops, "host": host, "numel": n, "shape": shape}
    chunks = [(s, min(step, n - s)) for s in range(0, n, step)]

    def inputs(s, c):
        return [ops.from_numpy(t[s:s + c].copy()) for t in flat]

    reduced = {}
    for reduce_pass in (spec.reduce, *spec.later_reduces) if spec.reduce else ():
        sums = {}
        for s, c in chunks:
            for key, value in call(reduce_pass, inputs(s, c), {**reduced, "start": s, "base": None}, engine_values,
                                   options).items():
                sums[key] = tuple(np.add(sums[key], value)) if key in sums else value
        reduced.update(sums)
    out = [ops.to_numpy(call(spec.fn, inputs(s, c), {**reduced, "start": s, "base": None}, engine_values, options))
           for s, c in chunks]
    return np.concatenate(out).reshape(shape)


def f32(*values):
    return np.array(values, np.float32)


# --------------------------------------------------------------------------- by hand
def test_ram_by_hand():
    # entries: both change, only t2, below epsilon, opposite changes, only t1
    t1, t2 = f32(0.5, 0.0, 1e-6, 2.0, -1.0), f32(0.25, 0.3, 0.0, -1.0, 0.0)
    np.testing.assert_array_equal(run_spec("ram", [t1, t2], ram_epsilon=1e-5), f32(0.375, 0.3, 0.0, 0.5, -1.0))
    # a larger epsilon leaves t2's 0.25 out: entry 0 becomes t1's alone
    np.testing.assert_array_equal(run_spec("ram", [t1, t2], ram_epsilon=0.26), f32(0.5, 0.3, 0.0, 0.5, -1.0))


def test_ramplus_tl_by_hand():
    t1, t2 = f32(0.5, 0.0, 1e-6, 2.0, -1.0), f32(0.25, 0.3, 0.0, -1.0, 0.0)
    # each model: 2 shared entries, 1 unique -> rho = 2; lambda = 1 + r * min(rho, alpha)
    got = run_spec("ramplus_tl", [t1, t2], ram_epsilon=1e-5, ramplus_r=0.2, ramplus_alpha=0.5)
    lam = np.float32(1) + np.float32(0.2) * np.float32(0.5)
    np.testing.assert_array_equal(got, f32(0.375, 0.3 * lam, 0.0, 0.5, -1.0 * lam))
    got = run_spec("ramplus_tl", [t1, t2], ram_epsilon=1e-5, ramplus_r=0.2, ramplus_alpha=5.0)
    lam = np.float32(1) + np.float32(0.2) * np.float32(2.0)
    np.testing.assert_array_equal(got, f32(0.375, 0.3 * lam, 0.0, 0.5, -1.0 * lam))
    # r = 0 is ram
    np.testing.assert_array_equal(run_spec("ramplus_tl", [t1, t2], ramplus_r=0.0), run_spec("ram", [t1, t2]))


def test_sce_by_hand():
    t1, t2 = f32(1.0, -2.0, 0.0, 3.0), f32(3.0, 2.0, -1.0, -1.0)
    # no selection: w = mean squares 3.5 and 3.75 over 7.25; elected signs +, + (sum 0), -, +
    w1, w2 = np.float32(3.5) / np.float32(7.25), np.float32(3.75) / np.float32(7.25)
    expected = f32((w1 * 1 + w2 * 3) / (w1 + w2), 2.0, -1.0, 3.0)
    np.testing.assert_allclose(run_spec("sce", [t1, t2]), expected, rtol=1e-7)
    # variances 1, 4, 0.25, 4: select_topk 0.5 keeps k = 2 entries, 1 and 3
    np.testing.assert_allclose(run_spec("sce", [t1, t2], sce_select_topk=0.5), f32(0.0, 2.0, 0.0, 3.0), rtol=1e-6)
    # k = 1 of two tied variances: the later entry is kept (index order, as the magnitude sparsifier)
    np.testing.assert_allclose(run_spec("sce", [t1, t2], sce_select_topk=0.25), f32(0.0, 0.0, 0.0, 3.0), rtol=1e-6)
    # k = int(4 * 0.2) = 0: nothing kept, the base
    np.testing.assert_array_equal(run_spec("sce", [t1, t2], sce_select_topk=0.2), f32(0, 0, 0, 0))


def test_sce_uniform_weights_when_the_mean_squares_are_tiny():
    t1, t2 = f32(1e-4, 1e-4), f32(3e-4, -1e-4)  # mean squares ~1e-8 sum below 1e-6: weights 1/2 each
    np.testing.assert_allclose(run_spec("sce", [t1, t2]), f32(2e-4, 1e-4), rtol=1e-6)


# --------------------------------------------------------------------------- against the mergekit port
def _task_vectors(k, shape, seed, quantized=False):
    """Random float32 task vectors with zeros, equal entries and, ``quantized``, massively tied variances."""
    rng = np.random.default_rng(seed)
    ts = []
    for i in range(k):
        t = rng.normal(size=shape).astype(np.float32) * np.float32(0.01)
        if quantized:  # few distinct values, as bfloat16 task vectors have
            t = (np.round(t * 400) / 400).astype(np.float32)
        t.reshape(-1)[rng.random(t.size) < 0.1] = 0.0
        ts.append(t)
    ts[-1].reshape(-1)[:50] = ts[0].reshape(-1)[:50]  # equal entries: zero variance when k = 2
    return ts


@pytest.mark.parametrize("k, topk, quantized", [(2, 1.0, False), (3, 0.3, False), (3, 0.55, True), (4, 0.9, True),
                                                (5, 0.05, True)])
def test_sce_matches_the_port_in_any_chunking(k, topk, quantized):
    base = np.random.default_rng(99).normal(size=(37, 53)).astype(np.float32)
    xs = [base + t for t in _task_vectors(k, base.shape, k, quantized)]
    ts = [x - base for x in xs]  # as the engine and mergekit see them
    whole = run_spec("sce", ts, sce_select_topk=topk)
    expected = MK.sce_merge(xs, base, topk)
    np.testing.assert_allclose(base + whole, expected, rtol=1e-6, atol=1e-8)
    for step in (97, 1000):
        assert run_spec("sce", ts, step, sce_select_topk=topk).tobytes() == whole.tobytes(), step


def test_sce_tie_cut_in_blocks_of_a_large_tensor():
    """> 65536 entries: ties are counted per block of several entries, the cut falls inside one."""
    ts = _task_vectors(3, (300_001,), 5, quantized=True)
    whole = run_spec("sce", ts, sce_select_topk=0.37)
    keys = OPS.variance_keys(ts)
    k = int(np.float32(np.count_nonzero(keys)) * np.float32(0.37))
    threshold = np.sort(keys)[::-1][k - 1]
    assert np.count_nonzero(keys == threshold) > np.count_nonzero(keys >= threshold) - k > 0  # the cut splits ties
    np.testing.assert_allclose(whole, MK.sce_merge(ts, np.zeros_like(ts[0]), 0.37), rtol=1e-6, atol=1e-9)
    for step in (65536, 50_000):
        assert run_spec("sce", ts, step, sce_select_topk=0.37).tobytes() == whole.tobytes(), step


@pytest.mark.parametrize("k, epsilon, r, alpha", [(2, 1e-5, 0.1, 0.2), (3, 0.008, 0.5, 0.3), (4, 0.004, 1.0, 10.0),
                                                  (3, 0.0, 0.3, 0.0)])
def test_ram_and_ramplus_match_the_port_in_any_chunking(k, epsilon, r, alpha):
    base = np.random.default_rng(7).normal(size=(29, 31)).astype(np.float32)
    xs = [base + t for t in _task_vectors(k, base.shape, 10 + k)]
    ts = [x - base for x in xs]
    ram = run_spec("ram", ts, ram_epsilon=epsilon)
    plus = run_spec("ramplus_tl", ts, ram_epsilon=epsilon, ramplus_r=r, ramplus_alpha=alpha)
    np.testing.assert_array_equal(base + ram, MK.ram_merge(xs, base, epsilon))
    np.testing.assert_array_equal(base + plus, MK.ramplus_tl_merge(xs, base, r, alpha, epsilon))
    for step in (1, 100):
        assert run_spec("ram", ts, step, ram_epsilon=epsilon).tobytes() == ram.tobytes()
        assert run_spec("ramplus_tl", ts, step, ram_epsilon=epsilon, ramplus_r=r, ramplus_alpha=alpha).tobytes() == plus.tobytes()


def test_paddle_backend_gives_the_same_bytes():
    paddle_backend = pytest.importorskip("llm_merge.backends.paddle_backend")
    pd = paddle_backend.PaddleOps("cpu")
    ts = _task_vectors(3, (41, 17), 3, quantized=True)
    for name, options in (("sce", {"sce_select_topk": 0.4}), ("ram", {"ram_epsilon": 0.004}),
                          ("ramplus_tl", {"ram_epsilon": 0.004, "ramplus_r": 0.5})):
        assert run_spec(name, ts, 100, ops=pd, **options).tobytes() == run_spec(name, ts, **options).tobytes(), name


# --------------------------------------------------------------------------- recipes and flags, end to end
@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("sce_ram"), n_models=3, dtype=np.float32, seed=4)


RECIPES = {
    "sce": ("parameters: {select_topk: 0.4}\n", {"sce_select_topk": 0.4},
            lambda xs, b: MK.sce_merge(xs, b, 0.4)),
    "ram": ("parameters: {epsilon: 0.008}\n", {"ram_epsilon": 0.008}, lambda xs, b: MK.ram_merge(xs, b, 0.008)),
    "ramplus_tl": ("parameters: {epsilon: 0.008, r: 0.5, alpha: 0.3}\n",
                   {"ram_epsilon": 0.008, "ramplus_r": 0.5, "ramplus_alpha": 0.3},
                   lambda xs, b: MK.ramplus_tl_merge(xs, b, 0.5, 0.3, 0.008)),
}


def _recipe_text(method, fam, parameters):
    models = "".join(f"  - model: {d}\n" for d in fam.model_dirs)
    return f"merge_method: {method}\nbase_model: {fam.base_dir}\nmodels:\n{models}{parameters}dtype: float32\n"


@pytest.mark.parametrize("method", list(RECIPES))
def test_recipe_and_flags_merge_like_the_port(tmp_path, fam, method):
    parameters, options, reference = RECIPES[method]
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe_text(method, fam, parameters))
    assert recipe_main([str(recipe), str(tmp_path / "recipe"), "--quiet"]) == 0
    flags = ["--merge_method", method, "--base_model_path", str(fam.base_dir), "--model_path_list",
             *map(str, fam.model_dirs), "--output_path", str(tmp_path / "flags"), "--quiet"]
    for option, value in options.items():
        flags += [f"--{option}", str(value)]
    assert cli_main(flags) == 0
    by_recipe, by_flags = read_checkpoint(tmp_path / "recipe"), read_checkpoint(tmp_path / "flags")
    for name, base in fam.base.items():
        assert by_recipe[name].tobytes() == by_flags[name].tobytes(), name
        if not np.issubdtype(base.dtype, np.floating):
            np.testing.assert_array_equal(by_recipe[name], base)
            continue
        expected = reference([m[name] for m in fam.models], base)
        np.testing.assert_allclose(by_recipe[name], expected, rtol=1e-6, atol=1e-8, err_msg=name)


def test_workers_and_chunk_sizes_give_the_same_bytes(tmp_path, fam, monkeypatch):
    def run(out, n_process):
        merge(resolve(MergeConfig(merge_method="sce", base_model_path=str(fam.base_dir), sce_select_topk=0.3,
                                  model_path_list=[str(d) for d in fam.model_dirs], output_path=str(out),
                                  n_process=n_process)))
        return (out / "model.safetensors").read_bytes()

    expected = run(tmp_path / "one", 1)
    original = engine.TensorMerger.__init__

    def small_chunks(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "chunk_elements": 97})

    monkeypatch.setattr(engine.TensorMerger, "__init__", small_chunks)
    assert run(tmp_path / "chunked", 2) == expected


# --------------------------------------------------------------------------- errors
def _resolve(fam, tmp_path, **values):
    values.setdefault("base_model_path", str(fam.base_dir))
    values.setdefault("model_path_list", [str(d) for d in fam.model_dirs])
    return resolve(MergeConfig(output_path=str(tmp_path / "out"), **values))


@pytest.mark.parametrize("values, message", [
    ({"merge_method": "sce", "base_model_path": None}, "needs --base_model_path"),
    ({"merge_method": "ram", "weight_list": [1.0, 2.0, 1.0]}, "ram does not weight models"),
    ({"merge_method": "sce", "sce_select_topk": 0.0}, r"--sce_select_topk: 0.0 out of range \(0, 1\]"),
    ({"merge_method": "sce", "sce_select_topk": 1.5}, "--sce_select_topk: 1.5 out of range"),
    ({"merge_method": "ram", "ram_epsilon": -1e-3}, "--ram_epsilon: -0.001 out of range"),
    ({"merge_method": "ramplus_tl", "ramplus_alpha": -0.1}, "--ramplus_alpha: -0.1 out of range"),
    ({"merge_method": "ramplus_tl", "ramplus_r": float("inf")}, "--ramplus_r: inf"),
])
def test_flag_refusals(tmp_path, fam, values, message):
    with pytest.raises(ConfigError, match=message):
        _resolve(fam, tmp_path, **values)


def test_duplicate_models_are_refused(tmp_path, fam):
    with pytest.raises(ConfigError, match="is listed twice; sce merges each model once"):
        _resolve(fam, tmp_path, merge_method="sce", model_path_list=[str(fam.model_dirs[0])] * 2)


def test_cli_refusal_exit_code(tmp_path, fam, capsys):
    rc = cli_main(["--merge_method", "sce", "--model_path_list", str(fam.model_dirs[0]), "--base_model_path",
                   str(fam.base_dir), "--sce_select_topk", "2", "--output_path", str(tmp_path / "o")])
    assert rc == 2 and "--sce_select_topk: 2.0 out of range (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("method, models, parameters, message", [
    ("sce", "  - {model: A, parameters: {weight: 2.0}}\n  - model: B\n", "",
     r"weight is not taken here by merge_method sce \(mergekit's sce ignores it silently\)"),
    ("ram", "  - model: A\n  - model: B\n", "parameters: {weight: 1.0}\n", "weight is not taken here by merge_method ram"),
    ("ramplus_tl", "  - {model: A, parameters: {epsilon: 0.1}}\n  - model: B\n", "",
     "epsilon is not taken here by merge_method ramplus_tl"),
    ("ram", "  - model: A\n  - model: B\n", "parameters: {select_topk: 0.5}\n", None),  # another method's: a warning
    ("sce", "  - model: A\n  - model: B\n", "parameters: {select_topk: 0}\n", "sce_select_topk: 0.0 out of range"),
])
def test_recipe_refusals(tmp_path, fam, method, models, parameters, message):
    models = models.replace("A", str(fam.model_dirs[0])).replace("B", str(fam.model_dirs[1]))
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {fam.base_dir}\nmodels:\n{models}{parameters}")
    rc = recipe_main([str(recipe), str(tmp_path / "o"), "--quiet", "--dry_run"])
    assert rc == (0 if message is None else 2)


def test_recipe_refusal_messages(tmp_path, fam):
    from llm_merge.config.recipes import recipe_to_config
    import yaml

    def translate(text):
        return resolve(recipe_to_config(yaml.safe_load(text), str(tmp_path / "o")))

    a, b = fam.model_dirs[:2]
    with pytest.raises(ConfigError, match=r"weight is not taken here by merge_method sce \(mergekit's sce ignores it"):
        translate(f"merge_method: sce\nbase_model: {fam.base_dir}\nmodels:\n  - {{model: {a}, parameters: {{weight: 2}}}}\n"
                  f"  - model: {b}\n")
    with pytest.raises(ConfigError, match=r"models\[0\].parameters: epsilon is not taken here by merge_method ramplus_tl"):
        translate(f"merge_method: ramplus_tl\nbase_model: {fam.base_dir}\nmodels:\n  - {{model: {a}, parameters: "
                  f"{{epsilon: 0.1}}}}\n  - model: {b}\n")
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[1\].parameters: epsilon is not taken here by merge_method ram"):
        translate(f"merge_method: ram\nbase_model: {fam.base_dir}\nslices:\n  - sources:\n"
                  f"      - {{model: {fam.base_dir}, layer_range: [0, 2]}}\n"
                  f"      - {{model: {a}, layer_range: [0, 2], parameters: {{epsilon: 0.1}}}}\n")
    with pytest.raises(ConfigError, match="recipe: ram needs base_model"):
        translate(f"merge_method: ram\nmodels:\n  - model: {a}\n  - model: {b}\n")
    cfg = translate(f"merge_method: ramplus_tl\nbase_model: {fam.base_dir}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                    "parameters: {r: 0.3, alpha: 0.4}\n")
    assert (cfg.ram_epsilon, cfg.ramplus_r, cfg.ramplus_alpha, cfg.epsilon) == (1e-5, 0.3, 0.4, MergeConfig().epsilon)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_compiled_variance_keys_and_slot_sums_are_the_numpy_ones(k):
    """numba's variance keys (float64 mean and squares in the same order, then float32) and exact slot sums
    equal NumPy's, NaN, Inf, subnormal and huge values included; sce through either host gives the same bytes."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(k)
    ts = [rng.standard_normal(5000).astype(np.float32) * np.float32(10.0 ** rng.integers(-40, 34)) for _ in range(k)]
    ts[0][:4] = [np.nan, np.inf, -np.inf, 1e-45]
    ts[-1][4:6] = [3e38, -3e38]
    compiled = NumpyOps(compiled=True)
    assert compiled.variance_keys(ts).tobytes() == OPS.variance_keys(ts).tobytes()
    squares = [np.abs(t) for t in ts]
    kept = rng.random(5000) < 0.5
    for flags in (None, kept):
        assert compiled.slot_sums(squares[0], flags).tolist() == OPS.slot_sums(squares[0], flags).tolist()
    tvs = _task_vectors(k, (64, 33), 11)
    by_numpy = run_spec("sce", tvs, 500, sce_select_topk=0.4)
    assert run_spec("sce", tvs, 500, host=compiled, sce_select_topk=0.4).tobytes() == by_numpy.tobytes()
