"""Spec matching, registry and the bad-input errors of the engine (docs/design.md §1)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jpeft
from tests.conformance_table import base_params


def test_first_match_wins_and_exclude_wins_over_all():
    spec = jpeft.Spec({r"blk/q_proj/kernel": jpeft.DoRA(rank=2), r"blk/.*/kernel": jpeft.LoRA(rank=4)},
                      exclude=r".*o_proj.*")
    ad = jpeft.init(jax.random.PRNGKey(0), base_params(), spec)
    assert ad["blk"]["q_proj"]["kernel"].method == jpeft.DoRA(rank=2)
    assert ad["blk"]["v_proj"]["kernel"].method == jpeft.LoRA(rank=4)
    assert not isinstance(ad["blk"]["o_proj"]["kernel"], jpeft.Adapter)


def test_rule_matching_nothing_names_rule_and_closest_paths():
    spec = jpeft.Spec({r"blk/k_proj/kernel": jpeft.LoRA(rank=2)})
    with pytest.raises(jpeft.SpecError,
                       match=r"rule 'blk/k_proj/kernel' matches no leaf.*closest paths: .*blk/q_proj/kernel"):
        jpeft.init(jax.random.PRNGKey(0), base_params(), spec)


def test_rule_whose_leaves_are_all_excluded_is_an_error():
    spec = jpeft.Spec({r".*o_proj/kernel": jpeft.LoRA(rank=2)}, exclude=r".*o_proj.*")
    with pytest.raises(jpeft.SpecError, match=r"matches no leaf \(after exclude="):
        jpeft.init(jax.random.PRNGKey(0), base_params(), spec)


def test_fully_shadowed_rule_with_another_config_is_ambiguous():
    spec = jpeft.Spec({r"blk/.*/kernel": jpeft.LoRA(rank=2), r"blk/q_proj/kernel": jpeft.DoRA(rank=2)})
    with pytest.raises(jpeft.SpecError, match=r"'blk/q_proj/kernel' \(dora\) is ambiguous.*'blk/\.\*/kernel' \(lora\)"):
        jpeft.init(jax.random.PRNGKey(0), base_params(), spec)


def test_shadowed_rule_with_the_same_config_is_fine():
    spec = jpeft.Spec({r"blk/.*/kernel": jpeft.LoRA(rank=2), r"blk/q_proj/kernel": jpeft.LoRA(rank=2)})
    jpeft.init(jax.random.PRNGKey(0), base_params(), spec)


def test_invalid_regex_and_non_method_values():
    with pytest.raises(jpeft.SpecError, match=r"rule '\(unclosed': invalid regex"):
        jpeft.Spec({"(unclosed": jpeft.LoRA()})
    with pytest.raises(jpeft.SpecError, match=r"rule 'a': expected a method config.*got dict"):
        jpeft.Spec({"a": {"rank": 8}})


def test_registry_names_and_unknown_names_or_options():
    names = jpeft.methods()
    assert {"lora", "dora", "pissa", "lora_ga", "ffa_lora", "periodic_lora", "full"} <= set(names)
    assert jpeft.method("pissa", rank=8) == jpeft.LoRA(rank=8, init="pissa")
    assert jpeft.method("lora", rank=8, rslora=True).scale == pytest.approx(8 / 8 ** 0.5)
    with pytest.raises(KeyError, match=r"unknown method 'loar'; known methods: .*lora"):
        jpeft.method("loar")
    with pytest.raises(TypeError, match=r"method 'lora' has no option\(s\) \['rnak'\]; options are .*rank"):
        jpeft.method("lora", rnak=8)
    with pytest.raises(TypeError, match=r"method 'pissa' fixes \{'init': 'pissa'\}"):
        jpeft.method("pissa", init="kaiming")


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive int"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"init": "xavier"}, "init must be one of"),
    ({"init": "orthogonal", "rank": 3}, "needs an even rank"),
])
def test_bad_method_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jpeft.LoRA(**kwargs)


def test_spec_that_does_not_fit_the_tree_at_apply_time():
    params = base_params()
    spec = jpeft.Spec({r"blk/q_proj/kernel": jpeft.LoRA(rank=2)})
    ad = jpeft.init(jax.random.PRNGKey(0), params, spec)
    with pytest.raises(jpeft.SpecError, match=r"blk/q_proj/kernel holds LoRA\(rank=2.*but the spec says LoRA\(rank=4"):
        jpeft.apply(ad, jpeft.Spec({r"blk/q_proj/kernel": jpeft.LoRA(rank=4)}))
    with pytest.raises(jpeft.SpecError,
                       match=r"blk/v_proj/kernel \(shape \(48, 32\)\) is targeted by the spec \(lora\) "
                             r"but is not an adapter"):
        jpeft.apply(ad, jpeft.Spec({r"blk/(q|v)_proj/kernel": jpeft.LoRA(rank=2)}))
    with pytest.raises(jpeft.SpecError,
                       match=r"blk/q_proj/kernel holds a lora adapter but the spec targets no such leaf"):
        jpeft.apply(ad, jpeft.Spec({r"blk/v_proj/kernel": jpeft.LoRA(rank=2)}))
    with pytest.raises(jpeft.SpecError, match=r"already contain adapter nodes"):
        jpeft.init(jax.random.PRNGKey(0), ad, spec)


@pytest.mark.parametrize("text, message", [
    ("{not json", "malformed spec JSON"),
    ('{"rules": 3}', "must be an object with a 'rules' list"),
    ('{"rules": [{"method": "lora"}]}', r"rule #0 must be an object with 'pattern' and 'method'"),
    ('{"rules": [{"pattern": "a", "method": "nope"}]}', r"rule #0 \('a'\): .*unknown method 'nope'"),
    ('{"rules": [{"pattern": "a", "method": "lora", "rank": -1}]}', r"rule #0 \('a'\): lora: rank must be"),
    ('{"rules": [{"pattern": "a", "method": "lora", "bogus": 1}]}', r"rule #0 \('a'\): .*no option\(s\) \['bogus'\]"),
    ('{"rules": [{"pattern": "a", "method": "lora", "version": 99}]}', r"lora version 99 was saved"),
    ('{"format": 7, "rules": []}', "spec format 7 is not supported"),
])
def test_malformed_spec_json(text, message):
    with pytest.raises(jpeft.SpecError, match=message):
        jpeft.Spec.from_json(text)


def test_json_roundtrip_keeps_order_exclude_and_options():
    spec = jpeft.Spec({r".*q_proj/kernel": jpeft.DoRA(rank=2, alpha=4, rslora=True),
                       r".*kernel": jpeft.LoRA(rank=4, init="olora", dropout=0.1)}, exclude=r".*o_proj.*")
    again = jpeft.Spec.from_json(spec.to_json())
    assert again == spec and again.rules[0][0] == r".*q_proj/kernel" and again.exclude == spec.exclude


def test_init_and_apply_are_jittable_with_a_static_spec():
    params = base_params()
    spec = jpeft.Spec({r"blk/(q|v)_proj/kernel": jpeft.DoRA(rank=2)})
    eager = jpeft.init(jax.random.PRNGKey(0), params, spec)
    jitted = jax.jit(jpeft.init, static_argnums=2)(jax.random.PRNGKey(0), params, spec)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)
    out = jax.jit(jpeft.apply, static_argnums=1)(jitted, spec)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, params)


def test_count_and_labels():
    params = base_params()
    spec = jpeft.Spec({r"blk/(q|v)_proj/kernel": jpeft.LoRA(rank=4)})
    ad = jpeft.init(jax.random.PRNGKey(0), params, spec)
    c = jpeft.count(ad)
    assert c.trainable == 2 * 4 * (32 + 48)
    assert c.total == c.trainable + sum(np.size(x) for x in jax.tree.leaves(params))
    assert jpeft.count(jax.eval_shape(lambda: ad)) == c
    labels = jax.tree.leaves(jpeft.labels(ad))
    assert labels.count("train") == 4 and labels.count("freeze") == 4
    assert "trainable 640" in str(c)


def test_split_combine_roundtrip_and_holes():
    ad = jpeft.init(jax.random.PRNGKey(0), base_params(), jpeft.Spec({r"blk/q_proj/kernel": jpeft.FFALoRA(rank=2)}))
    trainable, frozen = jpeft.split(ad)
    node_t, node_f = trainable["blk"]["q_proj"]["kernel"], frozen["blk"]["q_proj"]["kernel"]
    assert set(node_t.train) == {"b"} and node_t.frozen == {"a": None} and node_t.base is None
    assert node_f.train == {"b": None} and node_f.frozen["a"].shape == (32, 2)
    jax.tree.map(np.testing.assert_array_equal, jpeft.combine(trainable, frozen), ad)


def test_method_with_defaults_takes_only_the_options_a_method_has():
    from jpeft.registry import method_with_defaults, options

    run_level = {"rank": 4, "alpha": 8.0, "total_step": 50}
    assert method_with_defaults("lora", run_level) == jpeft.LoRA(rank=4, alpha=8.0)
    assert method_with_defaults("pissa", run_level, alpha=2.0) == jpeft.PiSSA(rank=4, alpha=2.0)
    assert method_with_defaults("adalora", run_level).total_step == 50     # which jpeft.method("adalora") lacks
    assert method_with_defaults("full", run_level) == jpeft.Full()
    assert "init" not in options("pissa") and "init" in options("lora")   # an alias's fixed options
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        options("nope")
