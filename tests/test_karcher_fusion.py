"""mergekit's karcher and arcee_fusion: by hand, against NumPy ports of mergekit, chunked, via recipes and flags."""

import numpy as np
import pytest
import yaml

import mergekit_reference_karcher as MK
from checkpoints import read_checkpoint, write_checkpoint

from llm_merge.api import merge
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.cli.recipe import main as recipe_main
from llm_merge.config.options import MergeConfig
from llm_merge.config.recipes import recipe_to_config
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError
from llm_merge.methods import arcee_fusion as AF
from llm_merge.methods import karcher as KA
from llm_merge.methods.merge import gram_sums

OPS = NumpyOps(False)


def _chunks(n, step):
    return [(s, min(step, n - s)) for s in range(0, n, step)]


def _karcher(xs, max_iter=10, tol=1e-5, step=None, ops=OPS):
    """The registered merge as the engine runs it: a reduce pass, then the apply pass, chunk by chunk."""
    shape, flat = xs[0].shape, [x.ravel() for x in xs]
    step = step or flat[0].size
    sums = None
    for s, c in _chunks(flat[0].size, step):
        part = gram_sums([ops.from_numpy(x[s:s + c]) for x in flat], ops=ops)["sums"]
        sums = part if sums is None else tuple(np.add(sums, part))
    out = [ops.to_numpy(KA.karcher([ops.from_numpy(x[s:s + c]) for x in flat], sums=sums, karcher_max_iter=max_iter,
                                   karcher_tol=tol, ops=ops)) for s, c in _chunks(flat[0].size, step)]
    return np.concatenate(out).reshape(shape)


def _fusion(base, x, step_rows=None, ops=OPS):
    """arcee_fusion as the engine runs it: its reduce passes (each seeing the earlier sums, added as the engine
    adds them) and the apply pass over chunks of whole rows, every parameter bound by the engine's binding."""
    from llm_merge import methods
    from llm_merge.run.binding import call

    spec = methods.get("merge", "arcee_fusion")
    shape = base.shape
    b, y = base.ravel(), (x - base).ravel()
    row = shape[-1] if shape else 1
    step = (step_rows or max(1, b.size // row)) * row
    chunks = _chunks(b.size, step)
    engine_values = {"ops": ops, "host": OPS, "numel": b.size, "shape": shape}
    stats = {}
    for reduce_pass in (spec.reduce, *spec.later_reduces):
        total = {}
        for s, c in chunks:
            extra = {**stats, "start": s, "base": ops.from_numpy(b[s:s + c])}
            for k, v in call(reduce_pass, [ops.from_numpy(y[s:s + c])], extra, engine_values, {}).items():
                total[k] = tuple(np.add(total[k], v)) if k in total else v
        stats.update(total)
    out = [ops.to_numpy(call(spec.fn, [ops.from_numpy(y[s:s + c])], {**stats, "start": s, "base": ops.from_numpy(b[s:s + c])},
                             engine_values, {})) + b[s:s + c] for s, c in chunks]
    return np.concatenate(out).reshape(shape)


# --------------------------------------------------------------------------- karcher
def test_karcher_by_hand():
    # two orthogonal vectors of norm 2: the normalized bisector times the mean norm 2
    xs = [np.array([2.0, 0.0, 0.0], np.float32), np.array([0.0, 2.0, 0.0], np.float32)]
    np.testing.assert_allclose(_karcher(xs), [np.sqrt(2.0), np.sqrt(2.0), 0.0], rtol=1e-6)
    # norms 1 and 3 on orthogonal axes: the direction is still the bisector (equal weights), the length 2
    xs = [np.array([1.0, 0.0], np.float32), np.array([0.0, 3.0], np.float32)]
    np.testing.assert_allclose(_karcher(xs), [np.sqrt(2.0), np.sqrt(2.0)], rtol=1e-6)
    # identical inputs give the input
    x = np.array([0.5, -1.5, 2.0, 3.0], np.float32)
    np.testing.assert_allclose(_karcher([x, x, x]), x, rtol=1e-6)
    # all zero: zero; one zero input takes no part in the direction but counts in the mean norm (1/2 · 4)
    zero = np.zeros(3, np.float32)
    np.testing.assert_array_equal(_karcher([zero, zero]), zero)
    np.testing.assert_allclose(_karcher([zero, np.array([0.0, 4.0, 0.0], np.float32)]), [0.0, 2.0, 0.0], rtol=1e-6)
    # one input: itself
    np.testing.assert_array_equal(_karcher([x]), x)


def test_karcher_three_orthogonal_units_by_hand():
    """Three orthogonal unit vectors: the mean is (1,1,1)/√3 and the first tangent is already zero."""
    xs = [np.eye(3, dtype=np.float32)[i] for i in range(3)]
    np.testing.assert_allclose(_karcher(xs), np.full(3, 1 / np.sqrt(3)), rtol=1e-6)


@pytest.mark.parametrize("shape, k, max_iter, tol", [((7,), 2, 10, 1e-5), ((6, 5), 3, 10, 1e-5), ((4, 3, 5), 4, 3, 1e-5),
                                                     ((33, 17), 5, 50, 1e-7), ((9, 9), 2, 0, 1e-5)])
def test_karcher_matches_the_mergekit_port(shape, k, max_iter, tol):
    rng = np.random.default_rng(k + len(shape))
    base = rng.normal(size=shape).astype(np.float32)
    xs = [base + rng.normal(size=shape).astype(np.float32) * (0.3 * (i + 1)) for i in range(k)]
    ours = _karcher(xs, max_iter, tol)
    np.testing.assert_allclose(ours, MK.karcher(xs, max_iter, tol), rtol=2e-5, atol=2e-6)
    # chunked (several reduce and apply chunks) gives the same bytes as one chunk
    assert _karcher(xs, max_iter, tol, step=11).tobytes() == ours.tobytes()


def test_karcher_antipodal_pair_restarts_at_the_first_input():
    """mean_norm < tol: the iteration starts at the first valid unit; the antipodal one pulls along a zero
    tangent (u_1 − cos π·u_0 = 0), so the result is the first input. (mergekit, in float32, may end at either
    pole: cos θ rounds to −0.99999994 and the tangent is rounding noise: a degenerate input.)"""
    x = np.array([1.0, 2.0, -1.0], np.float32)
    np.testing.assert_allclose(_karcher([x, -x]), x, rtol=1e-6)
    np.testing.assert_allclose(np.abs(MK.karcher([x, -x])), np.abs(x), rtol=1e-5)


# --------------------------------------------------------------------------- arcee_fusion
def test_order_keys_follow_float_order():
    values = np.array([-np.inf, -3.0, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 2.0, np.inf], np.float32)
    keys = AF.order_keys(values)
    assert list(np.argsort(keys, kind="stable")) == list(range(len(values)))
    for v, k in zip(values, keys):
        assert AF.key_value(int(k)).tobytes() == v.tobytes()


def test_quartile_ranks_are_mergekits():
    for n in (1, 2, 5, 8, 1000, 999_999, 1_000_000):
        q = np.array([0.25, 0.5, 0.75], np.float32)
        assert AF.quartile_ranks(n) == tuple((q * np.float32(n - 1)).astype(np.int64))


def test_arcee_fusion_by_hand():
    """One row: KL > 0 is a common factor, so the mask is |y| >= median + 1.5·IQR of |y|."""
    base = np.zeros((1, 8), np.float32)
    y = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0]], np.float32)
    # sorted |y| ranks 1, 3, 5 (floor(q·7)): 0.2, 0.4, 0.6 -> threshold 0.4 + 1.5·0.4 = 1.0: only 5.0 kept
    np.testing.assert_allclose(_fusion(base, base + y), [[0, 0, 0, 0, 0, 0, 0, 5.0]], atol=1e-7)
    # unchanged tensor: importance 0 everywhere, threshold 0, every (zero) change kept: the base
    np.testing.assert_array_equal(_fusion(base + 1, base + 1), base + 1)


@pytest.mark.parametrize("shape", [(7,), (1,), (16, 9), (5, 4, 6), (40, 33)])
def test_arcee_fusion_matches_the_mergekit_port(shape):
    rng = np.random.default_rng(sum(shape))
    base = rng.normal(size=shape).astype(np.float32)
    x = base + rng.normal(size=shape).astype(np.float32) * rng.uniform(0.0, 2.0, size=shape).astype(np.float32)
    ours = _fusion(base, x)
    expected = MK.arcee_fusion(base, x)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    kept = ours != base
    assert np.array_equal(kept, expected != base)
    # any chunk of whole rows gives the same bytes
    assert _fusion(base, x, step_rows=1).tobytes() == ours.tobytes()
    if len(shape) > 1:
        assert _fusion(base, x, step_rows=3).tobytes() == ours.tobytes()


def test_arcee_fusion_paddle_backend_matches_numpy():
    pytest.importorskip("paddle")
    from llm_merge.backends.paddle_backend import PaddleOps

    rng = np.random.default_rng(5)
    base = rng.normal(size=(12, 10)).astype(np.float32)
    x = base + rng.normal(size=base.shape).astype(np.float32)
    pd = PaddleOps("cpu")
    assert _fusion(base, x, 4, ops=pd).tobytes() == _fusion(base, x, 4).tobytes()
    xs = [base, x, x * 0.5]
    assert _karcher(xs, step=17, ops=pd).tobytes() == _karcher(xs, step=17).tobytes()


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def family(tmp_path):
    """Base + two fp32 fine-tunes; "big" (300 x 257) spans two chunks of the engine's passes."""
    rng = np.random.default_rng(1)
    base = {"big": rng.normal(size=(300, 257)).astype(np.float32), "w": rng.normal(size=(8, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32), "ids": np.arange(4, dtype=np.int64)}
    dirs = {"base": write_checkpoint(tmp_path / "base", base)}
    for name, scale in (("ft1", 0.1), ("ft2", 0.3)):
        tensors = {k: (v + scale * rng.normal(size=v.shape).astype(np.float32) if v.dtype == np.float32 else v)
                   for k, v in base.items()}
        dirs[name] = write_checkpoint(tmp_path / name, tensors)
    return dirs


def _recipe(tmp_path, name, text):
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    assert recipe_main([str(path), str(tmp_path / name), "--quiet"]) == 0
    return read_checkpoint(tmp_path / name)


def test_karcher_recipes_and_flags(tmp_path, family):
    base, ft1, ft2 = (read_checkpoint(family[k]) for k in ("base", "ft1", "ft2"))
    models = f"models: [{{model: {family['ft1']}}}, {{model: {family['ft2']}}}]\n"
    plain = _recipe(tmp_path, "k", "merge_method: karcher\n" + models + "parameters: {max_iter: 20, tol: 1.0e-6}\n")
    with_base = _recipe(tmp_path, "kb", f"merge_method: karcher\nbase_model: {family['base']}\n" + models)
    flags = resolve(MergeConfig(merge_method="karcher", model_path_list=[str(family["ft1"]), str(family["ft2"])],
                                karcher_max_iter=20, karcher_tol=1e-6, output_path=str(tmp_path / "f"), n_process=2))
    merge(flags)
    by_flags = read_checkpoint(tmp_path / "f")
    for name in ("big", "w", "b"):
        expected = MK.karcher([ft1[name], ft2[name]], 20, 1e-6)
        np.testing.assert_allclose(plain[name], expected, rtol=2e-5, atol=2e-6)
        assert by_flags[name].tobytes() == plain[name].tobytes()  # n_process 2 = 1
        # the base is a third input, last (mergekit appends it)
        np.testing.assert_allclose(with_base[name], MK.karcher([ft1[name], ft2[name], base[name]]), rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(plain["ids"], base["ids"])


def test_arcee_fusion_recipe_and_flags(tmp_path, family):
    base, ft2 = (read_checkpoint(family[k]) for k in ("base", "ft2"))
    out = _recipe(tmp_path, "af", f"merge_method: arcee_fusion\nbase_model: {family['base']}\n"
                                  f"models: [{{model: {family['ft2']}}}]\n")
    merge(resolve(MergeConfig(merge_method="arcee_fusion", model_path_list=[str(family["ft2"])],
                              base_model_path=str(family["base"]), output_path=str(tmp_path / "f"), n_process=2)))
    by_flags = read_checkpoint(tmp_path / "f")
    for name in ("big", "w", "b"):
        expected = MK.arcee_fusion(base[name], ft2[name])
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-6)
        assert 0 < np.count_nonzero(out[name] != base[name]) < out[name].size or name == "b"
        assert by_flags[name].tobytes() == out[name].tobytes()


@pytest.mark.parametrize("values, message", [
    ({"merge_method": "arcee_fusion", "two": True}, "arcee_fusion: needs --base_model_path and exactly 1 model, got 2 and no base"),
    ({"merge_method": "arcee_fusion", "two": True, "base": True}, "exactly 1 model, got 2"),
    ({"merge_method": "arcee_fusion"}, "got 1 and no base"),
    ({"merge_method": "karcher", "two": True, "base": True}, "--base_model_path: .* karcher takes no base"),
    ({"merge_method": "karcher", "two": True, "karcher_max_iter": -1}, "--karcher_max_iter: -1"),
    ({"merge_method": "karcher", "two": True, "karcher_tol": -1.0}, "--karcher_tol: -1.0"),
])
def test_refusals(tmp_path, family, values, message):
    values = dict(values)
    models = [str(family["ft1"]), str(family["ft2"])] if values.pop("two", False) else [str(family["ft1"])]
    if values.pop("base", False):
        values["base_model_path"] = str(family["base"])
    with pytest.raises(ConfigError, match=message):
        resolve(MergeConfig(model_path_list=models, output_path=str(tmp_path / "o"), **values))


def test_recipe_refusals(tmp_path, family):
    recipe = tmp_path / "bad.yml"
    recipe.write_text(f"merge_method: arcee_fusion\nmodels: [{{model: {family['ft1']}}}, {{model: {family['ft2']}}}]\n")
    with pytest.raises(ConfigError, match="arcee_fusion needs base_model"):
        recipe_to_config(yaml.safe_load(recipe.read_text()), str(tmp_path / "o"))
