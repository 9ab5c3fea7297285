"""LoRI oracles: frozen random A, B under a global magnitude mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.methods.bank import LoRI, lori_sparsify
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for

METHOD = LoRI(rank=R, alpha=8.0, sparsity=0.9)
SHAPES = [(32, 48), (48, 32), (32, 24)]
SPEC = jpeft.Spec({r"l\d/kernel": METHOD})


def params():
    return {f"l{i}": {"kernel": kernel(seed=i, shape=s)} for i, s in enumerate(SHAPES)}


def train(tree, steps=5, seed=0):
    trainable, frozen = jpeft.split(tree)
    x = jax.random.normal(jax.random.PRNGKey(seed), (8, 32))
    y = jax.random.normal(jax.random.PRNGKey(seed + 1), (8, 24))

    def loss(t):
        p = jpeft.apply(jpeft.combine(t, frozen), SPEC)
        return jnp.mean(jnp.square(((x @ p["l0"]["kernel"]) @ p["l1"]["kernel"]) @ p["l2"]["kernel"] - y))

    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(trainable)

    @jax.jit
    def step(t, s):
        updates, s = tx.update(jax.grad(loss)(t), s, t)
        return optax.apply_updates(t, updates), s

    for _ in range(steps):
        trainable, state = step(trainable, state)
    return jpeft.combine(trainable, frozen)


def test_identity_at_init_and_delta_formula():
    w = kernel()
    node = node_for(METHOD, w)
    np.testing.assert_array_equal(node.method.materialise(node), w)
    a = node.frozen["a"]
    assert a.shape == (N_IN, R) and float(jnp.max(jnp.abs(a))) <= 1 / N_IN ** 0.5  # kaiming uniform
    b = jax.random.normal(jax.random.PRNGKey(1), (R, M_OUT))
    mask = (jax.random.uniform(jax.random.PRNGKey(2), (R, M_OUT)) < 0.3).astype(b.dtype)
    node = node.replace(train={"b": b}, frozen={**node.frozen, "mask": mask})
    np.testing.assert_allclose(node.method.materialise(node) - w, METHOD.scale * a @ (mask * b), rtol=1e-5, atol=1e-6)


def test_a_is_frozen_and_unchanged_by_training():
    tree = jpeft.init(jax.random.PRNGKey(0), params(), SPEC)
    trained = train(tree)
    for i in range(3):
        np.testing.assert_array_equal(trained[f"l{i}"]["kernel"].frozen["a"], tree[f"l{i}"]["kernel"].frozen["a"])
        assert float(jnp.max(jnp.abs(trained[f"l{i}"]["kernel"].train["b"]))) > 0
    assert jpeft.count(tree).trainable == sum(R * m for _, m in SHAPES)  # b only (dense LoRI-D)


def test_global_mask_keeps_the_largest_entries_jointly_and_masked_entries_stay_zero():
    dense = train(jpeft.init(jax.random.PRNGKey(0), params(), SPEC))  # LoRI-D
    sparse = lori_sparsify(dense)  # LoRI-S: global mask, B restarted from 0
    nodes_d = [dense[f"l{i}"]["kernel"] for i in range(3)]
    nodes_s = [sparse[f"l{i}"]["kernel"] for i in range(3)]
    total = sum(n.train["b"].size for n in nodes_d)
    kept = sum(int(jnp.sum(n.frozen["mask"])) for n in nodes_s)
    assert kept == round(0.1 * total) and kept <= (1 - 0.9) * total + 0.5  # nnz ≤ (1−ρ)·total jointly
    per_layer = [float(jnp.mean(n.frozen["mask"])) for n in nodes_s]
    assert max(per_layer) != min(per_layer)  # a global (pooled) threshold, not per layer
    kept_mag = np.concatenate([np.abs(np.asarray(d.train["b"]))[np.asarray(s.frozen["mask"]) > 0]
                               for d, s in zip(nodes_d, nodes_s)])
    dropped_mag = np.concatenate([np.abs(np.asarray(d.train["b"]))[np.asarray(s.frozen["mask"]) == 0]
                                  for d, s in zip(nodes_d, nodes_s)])
    assert kept_mag.min() >= dropped_mag.max()
    assert all(not np.any(n.train["b"]) for n in nodes_s)  # restarted
    for d, s in zip(nodes_d, nodes_s):  # same A
        np.testing.assert_array_equal(d.frozen["a"], s.frozen["a"])

    trained = train(sparse, steps=5, seed=3)
    for s, t in zip(nodes_s, [trained[f"l{i}"]["kernel"] for i in range(3)]):
        off = np.asarray(s.frozen["mask"]) == 0
        np.testing.assert_array_equal(np.asarray(t.train["b"])[off], 0.0)  # exactly 0: no gradient, no decay
        assert np.any(np.asarray(t.train["b"])[~off] != 0)
        delta = np.asarray(t.method.materialise(t) - t.base)
        np.testing.assert_allclose(delta,
                                   t.method.scale * np.asarray(t.frozen["a"]) @ (np.asarray(t.train["b"]) * ~off),
                                   rtol=1e-5, atol=1e-6)
