"""SLTrain oracles: fixed random support, fused forward == dense, `∂val = G[idx]`,
parameter count `r(m+n) + ⌊δmn⌋`, and the pre-training mode without a base."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.methods import lowrank_sparse as lrs
from jpeft.methods import sparse as sp
from jpeft.methods import sparse_ops as ops
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for
from tests.methods.test_spiel import assert_support


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_init_count_and_support(mode):
    w = kernel()
    method = lrs.SLTrain(rank=R, alpha=8, density=0.03, mode=mode)
    node = node_for(method, w)
    k = math.floor(0.03 * M_OUT * N_IN)
    assert_support(node.frozen["idx"], k)                                      # (a) nnz = ⌊δmn⌋
    assert jpeft.count({"w": node}).trainable == R * (M_OUT + N_IN) + k         # (d)
    bound = 1 / math.sqrt(N_IN)
    assert np.all(np.abs(node.train["a"]) <= bound) and not np.any(node.train["b"])
    if mode == "finetune":
        np.testing.assert_array_equal(node.base, w)
        np.testing.assert_array_equal(method.materialise(node), w)               # identity (val = 0)
    else:
        assert node.base is None and jpeft.count({"w": node}).frozen == k        # only the indices
        assert np.all(np.abs(node.train["val"]) <= bound) and np.all(node.train["val"] != 0)
        want = ops.scatter_kernel(node.frozen["idx"], node.train["val"], N_IN, M_OUT)  # b = 0: W = S
        np.testing.assert_array_equal(method.materialise(node), want)
        assert method.rebuild_base(w, node) is None


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_fused_forward_equals_dense_and_val_gradient_is_the_gathered_dense_gradient(x64, mode):
    method = lrs.SLTrain(rank=R, alpha=8, density=0.1, mode=mode, chunk=5)
    node = node_for(method, kernel())
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 3))
    node = node.replace(train={k: v + 0.1 * jax.random.normal(next(keys), v.shape) for k, v in node.train.items()})
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 4, N_IN))
    np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), rtol=1e-12, atol=1e-12)  # (b)
    loss = lambda t: jnp.sum(jnp.sin(method.matmul(node.replace(train=t), x)))  # noqa: E731
    g_val = jax.grad(loss)(node.train)["val"]
    eff = method.materialise(node)
    G = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k)))(eff)
    np.testing.assert_allclose(g_val, ops.gather_kernel(G, node.frozen["idx"]), rtol=1e-10, atol=1e-12)  # (c)


def test_support_never_changes_during_training():
    method = lrs.SLTrain(rank=R, alpha=8, density=0.05)
    spec = jpeft.Spec({"w": method})
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, spec)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, N_IN))
    y = x @ kernel(seed=3)
    tx = optax.adam(0.05)
    t, f = jpeft.split(params)
    opt = tx.init(t)

    @jax.jit
    def step(t, opt, i):
        g = jax.grad(lambda t: jnp.mean(jnp.square(method.matmul(jpeft.combine(t, f)["w"], x) - y)))(t)
        u, opt = tx.update(g, opt, t)
        p, opt = jpeft.after_step(jpeft.combine(optax.apply_updates(t, u), f), opt, spec, step=i,
                                  key=jax.random.PRNGKey(i), grads=g)
        return jpeft.split(p)[0], jpeft.split(p)[1], opt

    for i in range(1, 11):
        t, f2, opt = step(t, opt, i)
        np.testing.assert_array_equal(f2["w"].frozen["idx"], params["w"].frozen["idx"])
    node = jpeft.combine(t, f)["w"]
    sparse_part = method.materialise(node) - node.base - method.lowrank_kernel(node)
    outside = np.ones(M_OUT * N_IN, bool)
    outside[np.asarray(node.frozen["idx"])] = False
    assert np.max(np.abs(np.asarray(sparse_part).T.reshape(-1)[outside])) < 1e-5
    assert np.any(np.asarray(node.train["val"]) != 0)


def test_pretrain_mode_learns_from_scratch():
    """No base at all: the weight is `s·BA + S`; a few Adam steps fit a random target better."""
    method = lrs.SLTrain(rank=8, alpha=8, density=0.2, mode="pretrain")
    node = node_for(method, kernel())
    x = jax.random.normal(jax.random.PRNGKey(1), (64, N_IN))
    y = x @ (kernel(seed=3) / N_IN ** 0.5)
    loss = jax.jit(lambda t: jnp.mean(jnp.square(method.matmul(node.replace(train=t), x) - y)))
    tx = optax.adam(0.02)
    t, opt = node.train, tx.init(node.train)
    first = float(loss(t))
    for _ in range(100):
        u, opt = tx.update(jax.grad(loss)(t), opt, t)
        t = optax.apply_updates(t, u)
    assert float(loss(t)) < 0.3 * first


def test_accelerator_dispatch_to_pallas_kernels_agrees(monkeypatch):
    """On GPU/TPU the sparse-family `matmul`s call `pallas_kernels` (here forced on CPU, where its
    dispatcher runs the jnp reference): same outputs and value gradients as the XLA path."""
    kernels = pytest.importorskip("pallas_kernels")
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, N_IN))
    for method in (sp.SpIEL(density=0.1), lrs.SLTrain(rank=R, alpha=8, density=0.1),
                   lrs.SLTrain(rank=R, alpha=8, density=0.1, mode="pretrain")):
        node = node_for(method, kernel())
        node = node.replace(train={k: v + 0.1 for k, v in node.train.items()})
        loss = lambda t, n=node, m=method: jnp.sum(jnp.sin(m.matmul(n.replace(train=t), x)))  # noqa: E731
        want, g_want = method.matmul(node, x), jax.grad(loss)(node.train)
        monkeypatch.setattr(sp, "pallas_ops", lambda: kernels)
        monkeypatch.setattr(lrs, "pallas_ops", lambda: kernels)
        np.testing.assert_allclose(method.matmul(node, x), want, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(jax.grad(loss)(node.train)), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()
