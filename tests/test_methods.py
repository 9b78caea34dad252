"""Merge functions against hand-computed vectors."""

import dataclasses
import functools
import math

import numpy as np
import pytest

from llm_merge import methods
from llm_merge.backends.numpy_backend import NumpyOps

OPS = NumpyOps()


def merge(name, ys, **params):
    fn = methods.get("merge", name)
    ys = [np.asarray(y, dtype=np.float32) for y in ys]
    if fn.reduce:
        params["sums"] = fn.reduce(ys, ops=OPS)["sums"]
    return fn.fn(ys, ops=OPS, **params)


def test_linear_weighted_mean_and_sum():
    ys = [[1, 2, 3], [3, -2, 1]]
    np.testing.assert_allclose(merge("linear", ys, weight_list=[1, 3], normalize=True), [2.5, -1, 1.5])
    np.testing.assert_allclose(merge("linear", ys, weight_list=[1, 3], normalize=False), [10, -4, 6])


def test_linear_one_model_is_identity():
    y = np.random.default_rng(0).normal(size=100).astype(np.float32)
    np.testing.assert_array_equal(merge("linear", [y], weight_list=[1.0], normalize=True), y)
    np.testing.assert_allclose(merge("linear", [y], weight_list=[0.3], normalize=True), y, rtol=2e-7)


def test_ties_sum_election_with_sign_conflicts():
    ys = [[1, -2, 3, 0], [-3, 1, 1, 0]]
    np.testing.assert_allclose(merge("ties", ys, weight_list=[1, 1], normalize=True, ties_elect_type="sum"), [-3, -2, 2, 0])
    np.testing.assert_allclose(merge("ties", ys, weight_list=[1, 1], normalize=False, ties_elect_type="sum"), [-3, -2, 4, 0])


def test_ties_count_election_differs_from_sum():
    ys = [[5, 2], [-1, 2], [-1, -1]]
    # element 0: sum 3 elects +, count (+1 -1 -1) elects -.
    np.testing.assert_allclose(merge("ties", ys, weight_list=[1, 1, 1], normalize=True, ties_elect_type="sum"), [5, 2])
    np.testing.assert_allclose(merge("ties", ys, weight_list=[1, 1, 1], normalize=True, ties_elect_type="count"), [-1, 2])


def test_ties_weights_scale_values_and_divisor():
    ys = [[2, -1], [1, 4]]
    # u = [[1, -0.5], [2, 8]]; votes + + ; element 0 keeps both: (1 + 2) / (0.5 + 2); element 1 keeps 8 / 2.
    out = merge("ties", ys, weight_list=[0.5, 2], normalize=True, ties_elect_type="sum")
    np.testing.assert_allclose(out, [3 / 2.5, 4])


def test_ties_zero_vote_counts_as_positive():
    out = merge("ties", [[1], [-1]], weight_list=[1, 1], normalize=True, ties_elect_type="sum")
    np.testing.assert_allclose(out, [1])


def test_slerp_orthogonal_unit_vectors():
    out = merge("slerp", [[1, 0], [0, 1]], slerp_alpha=0.5, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)
    np.testing.assert_allclose(out, [math.sqrt(0.5), math.sqrt(0.5)], rtol=1e-6)


def test_slerp_uses_normalized_angle_but_raw_vectors():
    out = merge("slerp", [[2, 0], [0, 3]], slerp_alpha=0.25, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)
    theta = math.pi / 2
    np.testing.assert_allclose(out, [2 * math.sin(0.75 * theta), 3 * math.sin(0.25 * theta)], rtol=1e-6)


def test_slerp_colinear_falls_back_to_lerp():
    out = merge("slerp", [[1, 2], [2, 4]], slerp_alpha=0.25, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)
    np.testing.assert_allclose(out, [1.25, 2.5])


@pytest.mark.parametrize("alpha, expected", [(0.0, 0), (1.0, 1)])
def test_slerp_endpoints(alpha, expected):
    rng = np.random.default_rng(1)
    ys = [rng.normal(size=50).astype(np.float32) for _ in range(2)]
    out = merge("slerp", ys, slerp_alpha=alpha, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)
    np.testing.assert_allclose(out, ys[expected], rtol=1e-6, atol=1e-7)


def test_slerp_small_norm_is_not_normalized():
    # ||y0|| < eps: u0 = y0, so the cosine is tiny and the general formula applies.
    out = merge("slerp", [[1e-9, 0], [1, 0]], slerp_alpha=0.5, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)
    theta = math.acos(1e-9)
    np.testing.assert_allclose(out, [1e-9 * math.sin(theta / 2) / math.sin(theta) + math.sin(theta / 2) / math.sin(theta), 0], rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "ties", "slerp"])
def test_identical_inputs_give_that_input(name):
    y = np.random.default_rng(2).normal(size=64).astype(np.float32)
    params = {
        "linear": dict(weight_list=[1, 1], normalize=True),
        "ties": dict(weight_list=[1, 1], normalize=True, ties_elect_type="sum"),
        "slerp": dict(slerp_alpha=0.5, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995),
    }[name]
    np.testing.assert_allclose(merge(name, [y, y], **params), y, rtol=1e-6)


def test_inputs_are_not_modified():
    ys = [np.array([1, -2, 3], np.float32), np.array([-1, 2, 2], np.float32)]
    copies = [y.copy() for y in ys]
    merge("ties", ys, weight_list=[1, 2], normalize=True, ties_elect_type="sum")
    merge("linear", ys, weight_list=[1, 2], normalize=True)
    for y, c in zip(ys, copies):
        np.testing.assert_array_equal(y, c)


def test_a_misspelled_parameter_fails_when_the_method_is_registered():
    from llm_merge.errors import MergeError
    from llm_merge.methods import registry

    with pytest.raises(MergeError, match="reserve_pp"):
        registry.register("sparsify", "misspelled")(lambda t, *, reserve_pp, ops: t)
    assert "misspelled" not in registry.names("sparsify")


def test_a_statistic_may_not_share_a_name_with_an_option():
    """The engine binds statistics, engine values and options by name: they must never overlap."""
    from llm_merge.errors import MergeError
    from llm_merge.methods import registry

    with pytest.raises(MergeError, match="scale"):
        registry.register("merge", "ambiguous", reduce=lambda ys, *, ops: {"scale": 1.0},
                          produces=("scale",))(lambda ys, *, scale, ops: ys[0])


def test_a_compiled_kernel_comes_with_its_measured_numpy_cost():
    """The kernel choice (run.kernel_choice) weighs each method's NumPy cost: a kernel without one would never load."""
    from llm_merge.errors import MergeError
    from llm_merge.methods import registry

    with pytest.raises(MergeError, match="numpy_seconds_per_gb"):
        registry.register("merge", "uncosted", kernel="linear")(lambda ys, *, ops: ys[0])
    assert "uncosted" not in registry.names("merge")


def test_binding_names_the_parameter_that_has_no_value():
    from llm_merge.errors import MergeError
    from llm_merge.run.binding import call

    def method(t, *, reserve_p, threshold, ops):
        return t

    assert call(method, 1, {"threshold": 2}, {"ops": None}, {"reserve_p": 0.5}) == 1
    with pytest.raises(MergeError, match="'threshold'"):
        call(method, 1, {}, {"ops": None}, {"reserve_p": 0.5})


def test_every_method_declares_what_it_produces():
    """The statistics its prepare/reduce pass returns are exactly the ones it declares (on a small tensor)."""
    from llm_merge.config.options import MergeConfig
    from llm_merge.kernels.counter_rng import CounterRNG
    from llm_merge.run.binding import call

    ops = NumpyOps(compiled=False)
    options = dataclasses.asdict(MergeConfig(model_path_list=["a", "b"], weight_list=[1.0, 1.0]))
    engine = {"ops": ops, "host": ops, "numel": 12, "shape": (3, 4), "start": 0, "rng_at": functools.partial(CounterRNG, 7),
              "base": np.zeros(12, np.float32)}
    t = np.linspace(-1, 1, 12, dtype=np.float32)
    for kind in ("sparsify", "merge"):
        for name in methods.names(kind):
            spec = methods.get(kind, name)
            hook = spec.prepare or spec.reduce
            if hook is None:
                assert spec.produces == (), name
                continue
            first = t if kind == "sparsify" else [t, t[::-1].copy()][: spec.inputs]
            produced: dict = {}
            for one_pass in (hook, *spec.later_reduces):  # a later pass reads the earlier ones' statistics
                produced.update(call(one_pass, first, produced, engine, options))
            assert set(produced) == set(spec.produces), name
