"""Nothing silent: a bounded, derandomised fuzz over method options × leaf ranks and dtypes.

Every outcome is either a jpeft error naming the method/option (construction) or the leaf path
(init), or a valid result: options of their declared types, the config hashable and round-tripping
through JSON, `apply == merge`, finite, and the identity at init where the config claims it.
Eager runs on tiny leaves (the issue's budget: ≤ 3 minutes with the tree checks below).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jpeft
from jpeft.methods.base import option_types
from jpeft.registry import method_from_dict

NAMES = jpeft.methods()
POOLS = {
    bool: [True, False, "false", "true", 0, 1, 2, None, 1.0, np.bool_(True)],
    int: [1, 2, 3, 4, 8, 0, -1, True, False, 4.7, 4.0, "4", None, 2 ** 40, np.int64(2)],
    float: [0.5, 1.0, 16, 0.0, -1.0, 1e-3, 2.0, math.nan, math.inf, -math.inf, "big", {}, None, True, np.float32(0.25)],
    str: ["nonsense", "", 3, None],
}
LEAVES = [((16, 12), "float32"), ((12, 16), "float32"), ((5, 5), "float32"), ((32, 24), "float32"),
          ((16, 12), "bfloat16"), ((16, 12), "int32"), ((24,), "float32"), ((4, 6, 8), "float32")]


def _fields(name):
    return sorted(jpeft.registry.options(name))


@st.composite
def configs(draw):
    name = draw(st.sampled_from(NAMES))
    cls = type(jpeft.method(name, total_step=10) if name == "adalora" else jpeft.method(name))
    types = option_types(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    fields = _fields(name)
    chosen = draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)) if fields else []
    cfg = {}
    for opt in chosen:
        kind = types[opt][0]
        cfg[opt] = draw(st.sampled_from(POOLS[kind] + [defaults[opt]]))
    if name == "adalora" and "total_step" not in cfg:
        cfg["total_step"] = 10
    return name, cls.name, cfg, draw(st.sampled_from(LEAVES))


def _construct(name, cls_name, cfg):
    try:
        return jpeft.method(name, **cfg)
    except jpeft.OptionError as e:
        msg = str(e)
        assert name in msg or cls_name in msg, msg
        assert any(opt in msg for opt in jpeft.registry.options(name)) or "fixes" in msg, msg
        return None


def _check_types(method):
    for opt, (kind, nullable) in option_types(type(method)).items():
        v = getattr(method, opt)
        if v is None:
            assert nullable, (method, opt)
        elif kind is float:
            assert type(v) is float and math.isfinite(v), (method, opt, v)
        else:
            assert type(v) is kind, (method, opt, v)


def _views(shape):
    return {"w": jpeft.View(inputs=(0,), outputs=(1, 2))} if len(shape) == 3 else None


@settings(max_examples=120, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs())
def test_every_option_and_leaf_is_a_clear_error_or_a_valid_result(case):
    name, cls_name, cfg, (shape, dtype) = case
    method = _construct(name, cls_name, cfg)
    if method is None:
        return
    _check_types(method)
    hash(method)
    assert method_from_dict(method.to_dict()) == method
    w = _leaf(shape, dtype)
    params = {"w": w, "bias": jnp.zeros((3,))}
    try:
        spec = jpeft.Spec({"w": method}, views=_views(shape) if method.adapts_matrix else None)
        assert jpeft.Spec.from_json(spec.to_json()) == spec
        calib = {"w": jnp.ones_like(w), "bias": None} if method.needs_calib else None
        tree = jpeft.init(jax.random.PRNGKey(1), params, spec, calib=calib)
    except (jpeft.AdapterError, jpeft.SpecError) as e:
        assert "w" in str(e), str(e)
        return
    _assert_valid_result(method, spec, tree, w)


@pytest.mark.parametrize("bad, message", [
    ({"rslora": "false"}, "option 'rslora' must be a bool, got 'false'"),
    ({"freeze_a": 2}, "option 'freeze_a' must be a bool, got 2"),
    ({"rank": True}, "option 'rank' must be an int, got True"),
    ({"rank": 4.7}, "option 'rank' must be an int, got 4.7"),
    ({"alpha": float("nan")}, "option 'alpha' must be a finite float, got nan"),
    ({"alpha": "big"}, "option 'alpha' must be a finite float, got 'big'"),
    ({"alpha": {}}, "option 'alpha' must be a finite float, got {}"),
])
def test_option_types_are_checked_by_name(bad, message):
    with pytest.raises(jpeft.OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jpeft.method("lora", **bad)
    d = jpeft.Spec({"w": jpeft.LoRA(rank=4)}).to_dict()
    d["rules"][0].update(bad)
    with pytest.raises(jpeft.SpecError, match=message.split(",")[0]):
        jpeft.Spec.from_dict(d)


def test_alternative_budgets_never_override_each_other():
    assert jpeft.method("lift", density=0.05).budget() == {"density": 0.05}
    assert jpeft.method("smt", density=0.05).budget() == {"density": 0.05}
    assert jpeft.method("lift").budget() == {"lora_rank": 128}
    for name, cfg in [("lift", {"density": 0.05, "lora_rank": 8}), ("smt", {"n_blocks": 2, "lora_rank": 3}),
                      ("s2ft", {"units": 2, "fraction": 0.1}), ("sltrain", {"density": 0.1, "lora_rank": 2}),
                      ("spiel", {"density": 0.1, "lora_rank": 2})]:
        with pytest.raises(jpeft.OptionError, match="set only one of"):
            jpeft.method(name, **cfg)


SWEEP_LEAVES = [((16, 12), "float32"), ((5, 5), "float32"), ((16, 12), "bfloat16"), ((16, 12), "int32"),
                ((16, 12), "zero-column")]


def _sweep_cases():
    from tests.conformance_table import CASES
    return CASES


@pytest.mark.parametrize("leaf", SWEEP_LEAVES, ids=lambda leaf: f"{leaf[1]}{list(leaf[0])}")
def test_every_conformance_config_on_every_leaf_kind(leaf):
    """Each conformance row's config on small, square-tiny, bf16 and integer leaves: a clear error
    naming the path, or a valid result (as in the fuzz above)."""
    shape, dtype = leaf
    bad = []
    for case in _sweep_cases():
        try:
            _check_outcome(case.method, shape, dtype)
        except AssertionError as e:
            bad.append(f"{case.id}: {e}")
    assert not bad, "\n".join(bad)


def _leaf(shape, dtype):
    """A test leaf: random (fp32 / bf16), an integer ramp, or random with a dead output unit
    ("zero-column": DoRA's 0/0 case)."""
    if dtype == "zero-column":
        return jax.random.normal(jax.random.PRNGKey(0), shape).at[:, 3].set(0.0)
    if dtype == "int32":
        return jnp.arange(np.prod(shape), dtype=jnp.int32).reshape(shape)
    return jax.random.normal(jax.random.PRNGKey(0), shape).astype(dtype)


def _check_outcome(method, shape, dtype):
    w = _leaf(shape, dtype)
    params = {"w": w}
    spec = jpeft.Spec({"w": method})
    try:
        calib = {"w": jnp.ones_like(w)} if method.needs_calib else None
        tree = jpeft.init(jax.random.PRNGKey(1), params, spec, calib=calib)
    except (jpeft.AdapterError, jpeft.SpecError) as e:
        assert "w" in str(e), str(e)
        return
    _assert_valid_result(method, spec, tree, w)


def _assert_valid_result(method, spec, tree, w):
    """`apply` keeps the leaf's shape and dtype, is finite, equals `merge`, and is the identity
    at init where the config claims it."""
    applied = jpeft.apply(tree, spec)["w"]
    merged = jpeft.merge(tree, spec)["w"]
    assert applied.shape == w.shape and applied.dtype == w.dtype, f"{method!r}: shape/dtype changed"
    assert bool(jnp.all(jnp.isfinite(applied.astype(jnp.float32)))), f"{method!r}: not finite"
    np.testing.assert_allclose(np.asarray(applied, np.float32), np.asarray(merged, np.float32), rtol=1e-5, atol=1e-5)
    if method.identity_at_init:
        _assert_identity(method, tree["w"], w, applied)


def _assert_identity(method, node, w, applied):
    """Identity to fp32 precision; on bf16 to the storage precision of the larger of the leaf and
    the stored (residual) base: a residual `W − s·BNA` with large factors rounds to bf16 at its
    own magnitude."""
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    scale = max(1.0, float(np.max(np.abs(f32(w)))))
    if w.dtype == jnp.bfloat16:
        tol = 2e-2 * max(scale, float(np.max(np.abs(f32(node.base)))) if node.base is not None else scale)
    else:
        tol = 2e-4 * scale
    err = float(np.max(np.abs(f32(applied) - f32(w))))
    assert err <= tol, f"{method!r} claims identity at init; off by {err} (tolerance {tol})"


def test_check_finite_names_the_leaf_eagerly_and_under_checkify():
    from jax.experimental import checkify

    params = {"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((6, 4))}}
    spec = jpeft.Spec({r".*kernel": jpeft.LoRA(rank=2)})
    tree = jpeft.init(jax.random.PRNGKey(0), params, spec)
    jpeft.apply(tree, spec, check_finite=True)        # finite: no error
    bad = dict(tree)
    node = tree["b"]["kernel"]
    bad["b"] = {"kernel": node.replace(train={**node.train, "b": node.train["b"].at[0, 0].set(jnp.nan)})}
    with pytest.raises(Exception, match=r"non-finite values in b/kernel \(adapter\)/train/b"):
        jpeft.apply(bad, spec, check_finite=True)
    err, _ = jax.jit(checkify.checkify(lambda t: jpeft.apply(t, spec, check_finite=True)))(bad)
    assert "b/kernel (adapter)" in str(err.get())
    err, _ = jax.jit(checkify.checkify(lambda t: jpeft.after_step(t, None, spec, step=1, key=jax.random.PRNGKey(0),
                                                                  check_finite=True)))(bad)
    assert "b/kernel (adapter, after the step hooks)" in str(err.get())
    assert jpeft.apply(bad, spec)["b"]["kernel"].shape == (6, 4)   # off by default
