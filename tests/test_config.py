"""MergeConfig validation: every rule, with a message naming flag, value and range."""

import dataclasses

import pytest

from llm_merge import methods
from llm_merge.config.options import FIELD_NAMES, METHOD_TABLE, MergeConfig
from llm_merge.config.validate import parse_size, resolve
from llm_merge.config.values import config_from_dict
from llm_merge.errors import ConfigError
from llm_merge.methods.registry import ENGINE_PARAMS


def cfg(**overrides):
    values = dict(model_path_list=["a", "b"], output_path="out")
    values.update(overrides)
    return MergeConfig(**values)


def error_of(**overrides) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(cfg(**overrides))
    return str(info.value)


def test_defaults_resolve_to_linear_with_unit_weights():
    resolved = resolve(cfg())
    assert (resolved.merge_method, resolved.sparsify_type, resolved.merge_type) == ("linear", "none", "linear")
    assert resolved.weight_list == [1.0, 1.0]
    assert resolved.reserve_p == 0.7 and resolved.epsilon == 0.14 and resolved.rescale is True


@pytest.mark.parametrize("method", list(METHOD_TABLE))
def test_method_table_rows(method):
    if method == "passthrough":  # copies exactly one model, without a base
        resolved = resolve(cfg(merge_method=method, model_path_list=["a"]))
    elif method == "nearswap":  # one model against a base, with its threshold
        resolved = resolve(cfg(merge_method=method, model_path_list=["a"], base_model_path="base", nearswap_t=0.1))
    elif method == "karcher":  # every input alike, no base
        resolved = resolve(cfg(merge_method=method))
    elif method == "arcee_fusion":  # one model against a base
        resolved = resolve(cfg(merge_method=method, model_path_list=["a"], base_model_path="base"))
    else:
        resolved = resolve(cfg(merge_method=method, base_model_path="base"))
    assert (resolved.sparsify_type, resolved.merge_type) == METHOD_TABLE[method]


def test_resolve_does_not_modify_input():
    original = cfg(merge_method="ties")
    resolve(original)
    assert original.weight_list is None and original.merge_type is None


def test_contradicting_merge_type_is_an_error():
    message = error_of(merge_method="dare_ties", merge_type="linear")
    assert "--merge_type" in message and "dare_ties" in message and "'ties'" in message


def test_restating_the_table_row_is_fine():
    assert resolve(cfg(merge_method="dare_ties", merge_type="ties", sparsify_type="dare")).merge_method == "dare_ties"


def test_custom_pairing_without_merge_method():
    resolved = resolve(cfg(sparsify_type="dare", merge_type="ties"))
    assert resolved.merge_method == "dare_ties"
    assert resolve(cfg(sparsify_type="trim", merge_type="linear")).merge_method is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(reserve_p=0), "--reserve_p: 0 out of range (0, 1]"),
        (dict(reserve_p=1.5), "--reserve_p: 1.5 out of range (0, 1]"),
        (dict(epsilon=1.0), "--epsilon: 1.0 out of range [0, 1)"),
        (dict(slerp_alpha=1.2), "--slerp_alpha: 1.2 out of range [0, 1]"),
        (dict(slerp_dot_threshold=0), "--slerp_dot_threshold"),
        (dict(slerp_normalize_eps=0), "--slerp_normalize_eps"),
        (dict(n_process=0), "--n_process: 0"),
        (dict(weight_list=[1.0]), "--weight_list: 1 weight(s) given for 2 model(s)"),
        (dict(weight_list=[1.0, float("nan")]), "non-finite"),
        (dict(weight_list=[1.0, -1.0]), "sums to 0"),
        (dict(merge_method="slerp", model_path_list=["a", "b", "c"]), "slerp merges exactly 2 models, got 3"),
        (dict(model_path_list=[]), "--model_path_list"),
        (dict(output_path=None), "--output_path: required"),
        (dict(merge_method="nope"), "--merge_method: 'nope' is not one of linear"),
        (dict(max_shard_size="lots"), "--max_shard_size"),
        (dict(device="gpu"), "--device: gpu needs --tensor_type pd"),
        (dict(output_path="a"), "is the same as input a"),
        (dict(output_path="a/sub"), "inside input a"),
        (dict(output_path=".", model_path_list=["x/a", "b"]), "contains input x/a"),
    ],
)
def test_invalid_values_name_flag_and_range(overrides, needle):
    assert needle in error_of(**overrides)


def test_della_bounds_use_half_epsilon():
    # PaddleNLP checks 1 - epsilon and wrongly rejects this; the valid span is (0.04, 0.96].
    assert resolve(cfg(merge_method="della", reserve_p=0.95, epsilon=0.08)).reserve_p == 0.95
    message = error_of(merge_method="della", reserve_p=0.98, epsilon=0.08)
    assert "--reserve_p: 0.98 out of range (0.04, 0.96] for epsilon=0.08" in message
    assert "(0.04, 0.96]" in error_of(merge_method="della_linear", reserve_p=0.04, epsilon=0.08)
    assert resolve(cfg(merge_method="della", reserve_p=0.93, epsilon=0.14)).reserve_p == 0.93  # the bound itself


def test_unknown_config_keys_are_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown option.*bogus"):
        config_from_dict({"bogus": 1, "model_path_list": ["a"]})


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("1024", 1024), ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_every_field_has_help():
    for f in dataclasses.fields(MergeConfig):
        assert f.metadata.get("help"), f.name


def test_every_method_parameter_is_a_config_field():
    for kind in ("sparsify", "merge"):
        for name in methods.names(kind):
            method = methods.get(kind, name)
            extra = set()
            for hook in (method.prepare, method.reduce):
                if hook is not None:
                    extra |= set(methods.registry.keyword_params(hook))
            produced = set(method.produces)  # its statistics, checked against options by the registry
            unknown = method.parameters() - FIELD_NAMES - ENGINE_PARAMS - produced
            assert not unknown, f"{kind} {name}: {unknown}"


def test_every_table_entry_resolves_to_registered_functions():
    for sparsify_type, merge_type in METHOD_TABLE.values():
        methods.get("sparsify", sparsify_type)
        methods.get("merge", merge_type)
