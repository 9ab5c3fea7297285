"""PeriodicLoRA oracles and its explicit optimizer-state surgery."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests.methods.helpers import M_OUT, R, kernel


def training(method, steps, extra=None, lr=0.05):
    """Adam on a dense target through `jpeft.after_step`; yields (params, opt_state) per step."""
    params = {"w": kernel()} if extra is None else {"w": kernel(), **extra}
    spec = jpeft.Spec({"w": method, **({"head": jpeft.Full()} if extra else {})})
    params = jpeft.init(jax.random.PRNGKey(0), params, spec)
    target = kernel(seed=4)
    x = jax.random.normal(jax.random.PRNGKey(5), (64, 32))
    tx = optax.adam(lr)
    trainable, frozen = jpeft.split(params)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, frozen, opt_state, i):
        loss = lambda t: jnp.mean(jnp.square(x @ jpeft.apply(jpeft.combine(t, frozen), spec)["w"] - x @ target))  # noqa: E731
        updates, opt_state = tx.update(jax.grad(loss)(trainable), opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        params, opt_state = jpeft.after_step(jpeft.combine(trainable, frozen), opt_state, spec,
                                             step=i, key=jax.random.PRNGKey(i))
        return (*jpeft.split(params), opt_state)

    out = []
    for i in range(1, steps + 1):
        trainable, frozen, opt_state = step(trainable, frozen, opt_state, i)
        out.append((jpeft.combine(trainable, frozen), opt_state))
    return spec, out


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_unload_preserves_the_function_and_resets_moments(mu):
    method = jpeft.PeriodicLoRA(rank=R, alpha=8, period=3, unload_fraction=mu)
    node = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, jpeft.Spec({"w": method}))["w"]
    node = node.replace(train={**node.train, "b": jax.random.normal(jax.random.PRNGKey(1), (R, M_OUT))})
    moments = [{"a": jnp.ones_like(node.train["a"]), "b": jnp.ones_like(node.train["b"])}]
    for step, due in [(1, False), (3, True), (0, False), (6, True)]:
        res = method.step_hook([node], [moments], step=jnp.asarray(step), keys=[jax.random.PRNGKey(2)])
        new = res.nodes[0]
        np.testing.assert_allclose(method.materialise(new), method.materialise(node), rtol=1e-5, atol=1e-5)
        assert bool(res.restarted) == due
        for k in ("a", "b"):
            np.testing.assert_array_equal(res.moments[0][0][k], 0.0 if due else 1.0)
        if due and mu == 1.0:
            np.testing.assert_array_equal(new.train["b"], 0.0)
            assert not np.allclose(new.train["a"], node.train["a"])


def test_training_resets_adam_count_and_accumulates_rank_beyond_r():
    spec, history = training(jpeft.PeriodicLoRA(rank=R, alpha=8, period=5), steps=20)
    counts = [int(st[0].count) for _, st in history]
    assert counts == [1, 2, 3, 4, 0] * 4
    base0 = kernel()
    accumulated = history[-1][0]["w"].base - base0
    assert np.linalg.matrix_rank(np.asarray(accumulated), tol=1e-4) == 4 * R  # min(P·r, m, n), P = 4 stages
    mu = history[4][1][0].mu["w"].train
    assert not np.any(mu["a"]) and not np.any(mu["b"])


def test_restart_with_other_trainables_sharing_the_count_is_an_error():
    with pytest.raises(jpeft.SpecError, match="share the optax step count"):
        training(jpeft.PeriodicLoRA(rank=R, period=2), steps=1, extra={"head": jnp.ones((4,))})
