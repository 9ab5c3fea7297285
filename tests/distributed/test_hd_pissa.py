"""HD-PiSSA oracles (the step of `jpeft.distributed.hd_pissa_step`) on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import distributed
from jpeft.methods.hd_pissa import HDPiSSA

N_IN, M_OUT = 48, 64


def mesh_of(k):
    return jax.sharding.Mesh(np.array(jax.devices()[:k]), ("dp",))


def kernel(dtype=None, shape=(N_IN, M_OUT)):
    return jax.random.normal(jax.random.PRNGKey(0), shape, dtype or jnp.result_type(float)) / shape[0] ** 0.5


def regression(w, k, per_device=8, seed=1):
    """A micro-batch per device of `y = x @ (w + shift)`."""
    kx, ks = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (k * per_device, w.shape[0]), w.dtype)
    return x, x @ (w + 0.3 * jax.random.normal(ks, w.shape, w.dtype))


def loss_for(spec):
    def loss(params, batch):
        x, y = batch
        return jnp.mean(jnp.square(x @ jpeft.apply(params, spec)["w"] - y))

    return loss


def hd_setup(w, k, rank, tx, alpha=None, frames="fixed"):
    spec = jpeft.Spec({"w": HDPiSSA(rank=rank, alpha=float(alpha or rank), devices=k, frames=frames)})
    params = jpeft.init(jax.random.PRNGKey(2), {"w": w}, spec)
    params, opt_state = distributed.place(params, tx, mesh_of(k))
    return spec, params, opt_state, distributed.hd_pissa_step(loss_for(spec), tx, mesh_of(k))


def numerical_rank(m):
    s = np.linalg.svd(np.asarray(m), compute_uv=False)
    return int(np.sum(s > 1e-9 * s[0]))


def test_device_frames_are_orthogonal_slices_of_the_principal_subspace(x64):
    k, r = 8, 2
    w = kernel()
    node = jpeft.init(jax.random.PRNGKey(0), {"w": w}, jpeft.Spec({"w": HDPiSSA(rank=r, alpha=r, devices=k)}))["w"]
    a, b = np.asarray(node.train["a"]), np.asarray(node.train["b"])        # (K, in, r), (K, r, out)
    assert a.shape == (k, N_IN, r) and b.shape == (k, r, M_OUT)
    u, sig, vh = np.linalg.svd(np.asarray(w), full_matrices=False)
    for i in range(k):
        for j in range(k):
            gram_a, gram_b = a[i].T @ a[j], b[i] @ b[j].T   # paper: V_{J_i}ᵀV_{J_j}, U_{J_i}ᵀU_{J_j} (scaled)
            want = np.diag(sig[i * r:(i + 1) * r]) if i == j else np.zeros((r, r))
            np.testing.assert_allclose(gram_a, want, atol=1e-12)
            np.testing.assert_allclose(gram_b, want, atol=1e-12)
        # device i's frame is PiSSA on components [i·r, (i+1)·r)
        np.testing.assert_allclose(a[i] @ b[i],
                                   (u[:, i * r:(i + 1) * r] * sig[i * r:(i + 1) * r]) @ vh[i * r:(i + 1) * r],
                                   atol=1e-12)
    assert numerical_rank(np.concatenate(list(b), axis=0)) == k * r
    np.testing.assert_array_equal(node.base, w)                     # no residual: W is the merged model
    np.testing.assert_array_equal(jpeft.merge({"w": node}, jpeft.Spec({"w": node.method}))["w"], w)


@pytest.mark.parametrize("k", [4, 8])
def test_one_step_update_has_rank_2kr_where_data_parallel_pissa_has_2r(x64, k):
    r, lr = 2, 1e-3
    w = kernel()
    batch = regression(w, k)
    tx = optax.adam(lr)
    _, params, opt_state, step = hd_setup(w, k, r, tx)
    new, new_state, _ = step(params, opt_state, batch)
    total = new["w"].base - params["w"].base
    # The first-order part, rebuilt from the devices' first Adam steps (each from its own batch).
    mom = new_state[0]
    upd = lambda key: -lr * (mom.mu["w"].train[key] / 0.1) / (jnp.sqrt(mom.nu["w"].train[key] / 1e-3) + 1e-8)  # noqa: E731
    frames = params["w"].frozen
    first = distributed.fold_delta(frames["a0"], frames["b0"], upd("a"), upd("b"), 1.0, first_order=True)
    full = distributed.fold_delta(frames["a0"], frames["b0"], upd("a"), upd("b"), 1.0)
    np.testing.assert_allclose(full, total, atol=1e-12)
    assert numerical_rank(first) == 2 * k * r
    assert numerical_rank(total) == 2 * k * r
    assert numerical_rank(total - first) <= k * r                    # the second-order term δa·δb

    # Data-parallel PiSSA: identical adapters, averaged gradients.
    spec = jpeft.Spec({"w": jpeft.PiSSA(rank=r, alpha=r)})
    dp = jpeft.init(jax.random.PRNGKey(2), {"w": w}, spec)
    dp_state = tx.init(jpeft.split(dp)[0])
    stepped, _, _ = distributed.data_parallel_step(loss_for(spec), tx, mesh_of(k))(dp, dp_state, batch)
    dp_total = jpeft.merge(stepped, spec)["w"] - jpeft.merge(dp, spec)["w"]
    assert numerical_rank(dp_total) == 2 * r


@pytest.mark.parametrize("frames", ["fixed", "trained"])
def test_weight_stays_identical_on_every_device(frames):
    k = 8
    w = kernel(jnp.float32)
    _, params, opt_state, step = hd_setup(w, k, 2, optax.adam(1e-2), frames=frames)
    init_a = np.asarray(params["w"].train["a"])
    for i in range(10):
        params, opt_state, _ = step(params, opt_state, regression(w, k, seed=10 + i))
    base = params["w"].base
    assert base.sharding.is_fully_replicated
    shards = [np.asarray(s.data) for s in base.addressable_shards]
    assert len(shards) == 8
    assert max(float(np.max(np.abs(s - shards[0]))) for s in shards) == 0.0
    assert float(np.max(np.abs(shards[0] - np.asarray(w)))) > 1e-3      # it did move
    a = params["w"].train["a"]
    assert {s.data.shape for s in a.addressable_shards} == {(1, N_IN, 2)}  # one frame per device
    mu = opt_state[0].mu["w"].train["a"]
    assert {s.data.shape for s in mu.addressable_shards} == {(1, N_IN, 2)}  # local Adam state
    if frames == "fixed":   # reference code: the adapters never move
        np.testing.assert_array_equal(a, init_a)
    else:                   # paper reading: they keep their own updates, the reference point follows
        assert float(np.max(np.abs(np.asarray(a) - init_a))) > 1e-3
        np.testing.assert_array_equal(a, params["w"].frozen["a0"])
    # Either way W is the merged model.
    np.testing.assert_array_equal(jpeft.merge(params, jpeft.Spec({"w": params["w"].method}))["w"], base)


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_k1_is_one_pissa_step_folded_into_w(x64, alpha):
    r = 4
    w = kernel()
    batch = regression(w, 1, per_device=32)
    tx = optax.adam(1e-2)
    spec, params, opt_state, step = hd_setup(w, 1, r, tx, alpha=alpha)
    hd, _, _ = step(params, opt_state, batch)

    p_spec = jpeft.Spec({"w": jpeft.PiSSA(rank=r, alpha=alpha)})
    pissa = jpeft.init(jax.random.PRNGKey(2), {"w": w}, p_spec)
    trainable, frozen = jpeft.split(pissa)
    g = jax.grad(lambda t: loss_for(p_spec)(jpeft.combine(t, frozen), batch))(trainable)
    updates, _ = tx.update(g, tx.init(trainable), trainable)
    merged = jpeft.merge(jpeft.combine(optax.apply_updates(trainable, updates), frozen), p_spec)["w"]
    np.testing.assert_allclose(hd["w"].base, merged, atol=1e-12)


def test_k1_trained_frames_is_pissa_training(x64):
    """With the paper reading (`frames="trained"`) and one device, HD-PiSSA is PiSSA, step by step."""
    r, steps = 4, 4
    w = kernel()
    tx = optax.adam(1e-2)
    _, params, opt_state, step = hd_setup(w, 1, r, tx, frames="trained")
    p_spec = jpeft.Spec({"w": jpeft.PiSSA(rank=r, alpha=r)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(2), {"w": w}, p_spec))
    p_state = tx.init(trainable)
    for i in range(steps):
        batch = regression(w, 1, per_device=32, seed=20 + i)
        params, opt_state, _ = step(params, opt_state, batch)
        g = jax.grad(lambda t, batch=batch: loss_for(p_spec)(jpeft.combine(t, frozen), batch))(trainable)
        updates, p_state = tx.update(g, p_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    np.testing.assert_allclose(params["w"].train["a"][0], trainable["w"].train["a"], atol=1e-10)
    np.testing.assert_allclose(params["w"].base, jpeft.merge(jpeft.combine(trainable, frozen), p_spec)["w"], atol=1e-10)


def test_planted_rank16_target_fits_with_k8_r2_but_not_with_data_parallel_pissa():
    """A rank-16 change inside the span of the K·r = 16 frames (8 input-side and 8 output-side
    principal directions): HD-PiSSA (K = 8, r = 2) fits it; DP-PiSSA (r = 2) cannot get below
    the Eckart–Young floor of its rank-2 adapter."""
    k, r, n, steps = 8, 2, 32, 120
    kw, kx, ky, kd = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(kw, (n, n)) / n ** 0.5
    u, sig, vh = np.linalg.svd(np.asarray(w))
    target = (u[:, :8] @ np.asarray(jax.random.normal(kx, (8, n))) +
              np.asarray(jax.random.normal(ky, (n, 8))) @ vh[:8]) / n ** 0.5
    assert np.linalg.matrix_rank(target) == 16
    w_star = w + target
    xs = jax.random.normal(kd, (steps, k * 16, n))
    tx = optax.adam(optax.cosine_decay_schedule(0.02, steps))

    def fit(spec, params, opt_state, make_step):
        def loss(p, x):
            return jnp.mean(jnp.square(x @ (jpeft.apply(p, spec)["w"] - w_star)))

        step = make_step(loss, tx, mesh_of(k), jit=False)

        def body(carry, x):
            params, opt_state, value = step(*carry, x)
            return (params, opt_state), value

        @jax.jit
        def train(params, opt_state):
            (params, _), losses = jax.lax.scan(body, (params, opt_state), xs)
            return params, losses

        params, losses = train(params, opt_state)
        err = np.sum(np.square(jpeft.merge(params, spec)["w"] - w_star)) / np.sum(np.square(target))
        return float(err), np.asarray(losses)

    hd_spec = jpeft.Spec({"w": HDPiSSA(rank=r, alpha=r, devices=k)})
    hd_params, hd_state = distributed.place(jpeft.init(jax.random.PRNGKey(1), {"w": w}, hd_spec), tx, mesh_of(k))
    hd_err, hd_losses = fit(hd_spec, hd_params, hd_state, distributed.hd_pissa_step)

    dp_spec = jpeft.Spec({"w": jpeft.PiSSA(rank=r, alpha=r)})
    dp_params = jpeft.init(jax.random.PRNGKey(1), {"w": w}, dp_spec)
    dp_err, dp_losses = fit(dp_spec, dp_params, tx.init(jpeft.split(dp_params)[0]), distributed.data_parallel_step)

    top = (u[:, :r] * sig[:r]) @ vh[:r]                            # DP-PiSSA's s·a₀b₀
    tail = np.linalg.svd(top + target, compute_uv=False)[r:]
    floor = float(np.sum(tail ** 2) / np.sum(target ** 2))          # best rank-r adapter, relative error
    assert floor > 0.5
    assert dp_err >= floor - 1e-3
    assert hd_err < 0.05 * floor
    assert np.mean(hd_losses[-5:]) < 0.05 * np.mean(dp_losses[-5:])


def test_step_communicates_one_all_gather_of_the_updates():
    k, r = 8, 2
    w = kernel(jnp.float32)
    tx = optax.adam(1e-2)
    _, params, opt_state, step = hd_setup(w, k, r, tx)
    text = step.lower(params, opt_state, regression(w, k)).compile().as_text()
    comm = distributed.collective_bytes(text)
    assert comm["all-gather"] == 4 * r * (N_IN + M_OUT)               # this device's (δa, δb)
    assert comm["all-reduce"] == 4                                     # the reported loss only
    assert comm["reduce-scatter"] == 0


def test_mismatched_device_count_is_a_clear_error():
    w = kernel(jnp.float32)
    spec = jpeft.Spec({"w": HDPiSSA(rank=2, devices=4)})
    params = jpeft.init(jax.random.PRNGKey(0), {"w": w}, spec)
    tx = optax.adam(1e-2)
    step = distributed.hd_pissa_step(loss_for(spec), tx, mesh_of(8))
    with pytest.raises(ValueError, match=r"over 4 devices but mesh axis 'dp' has 8"):
        step(params, tx.init(jpeft.split(params)[0]), regression(w, 8))
    with pytest.raises(jpeft.AdapterError,
                       match=r"w.*\(8, 64\).*rank 2 on each of 8 devices.*= 16 <= min\(in, out\) = 8"):
        jpeft.init(jax.random.PRNGKey(0), {"w": kernel(shape=(8, 64))}, jpeft.Spec({"w": HDPiSSA(rank=2, devices=8)}))


def test_mixed_tree_other_adapters_are_data_parallel():
    """A LoRA leaf beside an HD-PiSSA leaf gets averaged gradients and stays replicated."""
    k = 8
    w = kernel(jnp.float32)
    spec = jpeft.Spec({"w": HDPiSSA(rank=2, devices=k), "v": jpeft.LoRA(rank=2, alpha=2, init="gaussian")})
    base = {"w": w, "v": kernel(jnp.float32, shape=(M_OUT, 16))}

    def loss(params, batch):
        x, y = batch
        p = jpeft.apply(params, spec)
        return jnp.mean(jnp.square(x @ p["w"] @ p["v"] - y[:, :16]))

    tx = optax.adam(1e-2)
    params, opt_state = distributed.place(jpeft.init(jax.random.PRNGKey(0), base, spec), tx, mesh_of(k))
    step = distributed.hd_pissa_step(loss, tx, mesh_of(k))
    new, _, _ = step(params, opt_state, regression(w, k))
    b = new["v"].train["b"]
    assert b.sharding.is_fully_replicated and float(jnp.max(jnp.abs(b))) > 0
    # the same as the data-parallel step on the LoRA leaf alone (the mean gradient of all batches)
    x, y = regression(w, k)
    trainable, frozen = jpeft.split(params)
    g = jax.grad(lambda t: loss(jpeft.combine(t, frozen), (x, y)))(trainable)
    updates, _ = tx.update(g, tx.init(trainable), trainable)
    np.testing.assert_allclose(b, optax.apply_updates(trainable, updates)["v"].train["b"], rtol=1e-5, atol=1e-6)


def test_collective_bytes_reads_operands_from_hlo_text():
    text = """
  %p.1 = f32[256,8]{1,0} parameter(0)
  %f = f32[8,256]{1,0} fusion(%p.1), kind=kLoop
  %ar = (f32[256,8]{1,0}, f32[8,256]{1,0}, /*index=2*/f32[]) all-reduce(%p.1, %f, /*index=2*/%s), channel_id=1
  %s = f32[] parameter(1)
  %ags = (bf16[1,160]{1,0}, bf16[8,160]{1,0}) all-gather-start(bf16[1,160]{1,0} %c), dimensions={0}
  %agd = bf16[8,160]{1,0} all-gather-done(%ags)
  ROOT %rs = f32[2,4]{1,0} reduce-scatter(%g), dimensions={0}
  %g = f32[16,4]{1,0} parameter(2)
"""
    assert distributed.collective_bytes(text) == {"all-reduce": 4 * 4096 + 4, "all-gather": 320,
                                                  "reduce-scatter": 256, "count": 3, "total": 16384 + 4 + 320 + 256}


def test_data_parallel_step_all_reduces_every_gradient():
    k, r = 8, 2
    w = kernel(jnp.float32)
    spec = jpeft.Spec({"w": jpeft.PiSSA(rank=r, alpha=r)})
    params = jpeft.init(jax.random.PRNGKey(2), {"w": w}, spec)
    tx = optax.adam(1e-2)
    step = distributed.data_parallel_step(loss_for(spec), tx, mesh_of(k))
    text = step.lower(params, tx.init(jpeft.split(params)[0]), regression(w, k)).compile().as_text()
    comm = distributed.collective_bytes(text)
    assert comm["all-reduce"] == 4 * r * (N_IN + M_OUT) + 4 and comm["all-gather"] == 0


@pytest.mark.parametrize("frames", ["fixed", "trained"])
def test_single_device_fold_hook_equals_the_mesh_step_when_every_device_sees_the_same_batch(frames):
    """`jpeft.after_step` runs the fold on one device (all K frames see the same batch); the mesh
    step with K identical micro-batches must give the same weights (independent Adam states
    that happen to see equal gradients)."""
    k, r, steps = 8, 2, 3
    w = kernel(jnp.float32)
    tx = optax.adam(1e-2)
    spec, params, opt_state, step = hd_setup(w, k, r, tx, frames=frames)
    single = jpeft.init(jax.random.PRNGKey(2), {"w": w}, spec)
    trainable, frozen = jpeft.split(single)
    s_state = tx.init(trainable)
    for i in range(steps):
        x, y = regression(w, 1, per_device=8, seed=30 + i)
        params, opt_state, _ = step(params, opt_state, (jnp.tile(x, (k, 1)), jnp.tile(y, (k, 1))))
        g = jax.grad(lambda t, frozen=frozen, x=x, y=y: loss_for(spec)(jpeft.combine(t, frozen), (x, y)))(trainable)
        updates, s_state = tx.update(g, s_state, trainable)
        single, s_state = jpeft.after_step(jpeft.combine(optax.apply_updates(trainable, updates), frozen), s_state,
                                           spec, step=i + 1, key=jax.random.PRNGKey(0))
        trainable, frozen = jpeft.split(single)
    np.testing.assert_allclose(params["w"].base, single["w"].base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["w"].train["a"], single["w"].train["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jpeft.merge(single, spec)["w"], single["w"].base)
