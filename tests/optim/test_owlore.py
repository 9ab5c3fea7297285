"""OwLore oracles: selection frequencies follow p_l; non-sampled layers get zero
updates and keep their optimizer state for the interval."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jpeft.optim as jo
from jpeft.optim.owlore import layer_probabilities

SCORES = [0.05, 0.1, 0.2, 0.25, 0.4]
DRAWS = 10_000


def draws(n_active):
    probs = jnp.asarray(layer_probabilities(SCORES), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), DRAWS)
    return np.asarray(jax.jit(jax.vmap(lambda k: jo.sample_layers(k, probs, n_active)))(keys))


def test_single_layer_frequencies_follow_the_probabilities():
    """χ² goodness of fit over 10⁴ draws (γ = 1: one layer per draw, a multinomial)."""
    masks = draws(1)
    assert np.all(masks.sum(axis=1) == 1)
    counts = masks.sum(axis=0)
    expected = DRAWS * layer_probabilities(SCORES)
    assert scipy.stats.chisquare(counts, expected).pvalue > 1e-3


def test_inclusion_frequencies_without_replacement():
    """γ = 2: inclusion probabilities of successive weighted sampling (numpy.random.choice's law)."""
    p = layer_probabilities(SCORES)
    exact = np.zeros(len(p))
    for i, j in itertools.permutations(range(len(p)), 2):
        prob = p[i] * p[j] / (1 - p[i])
        exact[i] += prob
        exact[j] += prob
    masks = draws(2)
    assert np.all(masks.sum(axis=1) == 2)
    freq = masks.mean(axis=0)
    sigma = np.sqrt(exact * (1 - exact) / DRAWS)
    assert np.all(np.abs(freq - exact) < 4 * sigma), (freq, exact)


def params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    tree = {f"layers_{i}": {"w": jax.random.normal(k[i], (24, 16)), "b": jnp.zeros(16)} for i in range(3)}
    tree["embed"] = jax.random.normal(k[3], (10, 16))
    return tree


def test_inactive_layers_get_zero_updates_and_keep_their_state():
    interval = 3
    tx = jo.owlore(1e-2, [1.0, 2.0, 3.0], n_active=1, interval=interval, rank=4, update_proj_gap=2,
                   weight_decay=0.1)
    p = params()
    state, update = tx.init(p), jax.jit(tx.update)
    prev_active = None
    for t in range(4 * interval):
        g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.PRNGKey(t), x.shape), p)
        before = state[0].galore.leaves
        u, state = update(g, state, p)
        owl = state[0]
        active = np.asarray(owl.active)
        assert active.sum() == 1
        if t % interval:
            assert np.array_equal(active, prev_active)  # the draw holds for the whole interval
        prev_active = active
        for i in range(3):
            for name in ("w", "b"):
                path = f"layers_{i}/{name}"
                moved = bool(np.any(np.asarray(u[f"layers_{i}"][name]) != 0))
                assert moved == bool(active[i])
                same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before[path], owl.galore.leaves[path])
                assert all(jax.tree.leaves(same)) == (not active[i])
        assert np.any(np.asarray(u["embed"]) != 0)  # layer-less leaves always train
    assert int(owl.galore.leaves["embed"].count) == 4 * interval


def test_projector_refresh_follows_the_leaf_own_step_count():
    tx = jo.scale_by_owlore([1.0, 1.0], n_active=1, interval=2, rank=4, update_proj_gap=3)
    p = {"layers_0": {"w": jnp.zeros((24, 16))}, "layers_1": {"w": jnp.zeros((24, 16))}}
    state, update = tx.init(p), jax.jit(tx.update)
    for t in range(10):
        g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.PRNGKey(t), x.shape), p)
        _, state = update(g, state, p)
    counts = [int(state.galore.leaves[f"layers_{i}/w"].count) for i in range(2)]
    assert sum(counts) == 10
    for i in range(2):
        assert int(state.galore.leaves[f"layers_{i}/w"].inner.count) == counts[i]


def test_layer_rule_must_match_something():
    with pytest.raises(ValueError, match="layer rule"):
        jo.scale_by_owlore([1.0, 1.0], n_active=1).init({"w": jnp.zeros((4, 4))})
    with pytest.raises(ValueError, match="n_active"):
        jo.scale_by_owlore([1.0, 1.0], n_active=3)


def test_outlier_ratio_counts_weights_above_m_times_the_mean_score():
    k = jnp.ones((10, 10)).at[0, 0].set(1000.0).at[3, 4].set(500.0)
    x = jnp.ones((10,))
    assert float(jo.outlier_ratio([k], [x], m=5.0)) == pytest.approx(2 / 100)
    # a large input norm turns a whole row into outliers
    assert float(jo.outlier_ratio([jnp.ones((10, 10))], [jnp.ones(10).at[2].set(100.0)], m=5.0)) == pytest.approx(0.1)
