"""DCT-AdamW oracles (labelled below; the DCT basis and its selection are in test_projector.py) and a
step-by-step check against a NumPy transcription of the reference `DCTAdamW.dct_low_rank_step`
(rotation, error feedback, weight decay)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft.optim as jo
from jpeft.optim.projector import DCTBasis

M, N, R = 48, 32, 4


def normal(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("shape", [(M, N), (N, M)])
def test_full_rank_with_sgd_inner_is_sgd(shape, x64):
    """(c): with r = d the selected DCT vectors are the whole orthonormal basis."""
    params = {"w": jnp.zeros(shape, jnp.float64)}
    tx = jo.dct_adamw(0.1, rank=min(shape), update_proj_gap=3, inner=optax.identity())
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(4):
        g = {"w": normal(shape, t).astype(jnp.float64)}
        u, state = update(g, state, params)
        np.testing.assert_allclose(u["w"], -0.1 * g["w"], rtol=1e-9, atol=1e-12)


def test_projector_state_is_int32_indices_per_matrix():
    """(e): per matrix, the projector keeps `int32[r]` only (plus the inner optimizer's moments)."""
    params = {"w": jnp.zeros((M, N)), "b": jnp.zeros((N,))}
    state = jo.scale_by_dct_adamw(rank=R).init(params)
    basis = state.leaves["w"].basis
    assert isinstance(basis, DCTBasis)
    assert [(x.dtype, x.shape) for x in jax.tree.leaves(basis)] == [(jnp.int32, (R,))]
    assert state.leaves["w"].inner.mu.shape == (M, R)
    assert state.leaves["b"].basis is None


def test_large_matrices_fall_through_to_adamw():
    params = {"embed": jnp.zeros((40, 8)), "w": jnp.zeros((16, 8))}
    state = jo.scale_by_dct_adamw(rank=2, max_dim=40).init(params)
    assert state.leaves["embed"].basis is None and state.leaves["w"].basis is not None


def test_fft_and_matmul_paths_train_identically():
    params = {"a": normal((M, N), 0), "b": normal((N, M), 1)}
    grads = [{k: normal(v.shape, 10 * t + i) for i, (k, v) in enumerate(params.items())} for t in range(5)]
    outs = []
    for mode in ("matmul", "fft"):
        tx = jo.dct_adamw(1e-2, rank=R, update_proj_gap=2, mode=mode, rotate_subspace=True, error_feedback=True)
        state, update, p = tx.init(params), jax.jit(tx.update), params
        for g in grads:
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
        outs.append(p)
    for k in params:
        np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6)


def _reference_dct_adamw(w0, grads, *, lr, wd, rank, b1=0.9, b2=0.999, eps=1e-8):
    """NumPy transcription of the reference step (`fft_low_rank/dct_adamw.py`, `fft_projector.py`) for
    `update_proj_gap=1`, `rotate_subspace=True`, `use_ef=True`, with `Q = C_dᵀ` (its "makhoul" basis);
    2-D params use the low-rank step, 1-D params plain AdamW."""
    w = {k: np.array(v, np.float64) for k, v in w0.items()}
    st = {}
    history = []
    for t, g in enumerate(grads, start=1):
        bc1, sbc2 = 1 - b1 ** t, np.sqrt(1 - b2 ** t)
        for k in w:
            w[k] *= 1 - lr * wd
            grad = np.array(g[k], np.float64)
            if grad.ndim == 1:
                s = st.setdefault(k, {"m": np.zeros_like(grad), "v": np.zeros_like(grad)})
                s["m"] = b1 * s["m"] + (1 - b1) * grad
                s["v"] = b2 * s["v"] + (1 - b2) * grad ** 2
                w[k] += -lr * sbc2 / bc1 * s["m"] / (eps * sbc2 + np.sqrt(s["v"]))
                continue
            n, m = grad.shape
            right = n >= m
            d = min(n, m)
            kk, jj = np.arange(d)[:, None], np.arange(d)[None, :]
            c = np.sqrt(np.where(kk == 0, 1.0, 2.0) / d) * np.cos(np.pi * kk * (2 * jj + 1) / (2 * d))
            q = c.T
            low_shape = (n, rank) if right else (rank, m)
            s = st.setdefault(k, {"m": np.zeros(low_shape), "v": np.zeros(low_shape), "ef": np.zeros_like(grad),
                                  "idx": None})
            acc = grad + s["ef"]
            sim = acc @ q if right else q.T @ acc
            norms = np.abs(sim).sum(axis=0 if right else 1)
            prev, idx = s["idx"], np.argsort(-norms, kind="stable")[:rank]
            s["idx"] = idx
            a = sim[:, idx] if right else sim[idx, :]
            back = (lambda x, q=q, idx=idx: x @ q[:, idx].T) if right else (lambda x, q=q, idx=idx: q[:, idx] @ x)
            s["ef"] = acc - back(a)
            if t > 1:
                rot = q[:, prev].T @ q[:, idx] if right else q[:, idx].T @ q[:, prev]
                s["m"] = s["m"] @ rot if right else rot @ s["m"]
                s["v"] = np.abs(s["v"] @ rot if right else rot @ s["v"])
            s["m"] = b1 * s["m"] + (1 - b1) * a
            s["v"] = b2 * s["v"] + (1 - b2) * a ** 2
            w[k] += -lr * sbc2 / bc1 * back(s["m"] / (eps * sbc2 + np.sqrt(s["v"])))
        history.append({k: v.copy() for k, v in w.items()})
    return history


def test_matches_the_reference_step_with_rotation_error_feedback_and_weight_decay():
    rng = np.random.default_rng(0)
    shapes = {"tall": (M, N), "wide": (N, M), "bias": (N,)}
    w0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(8)]
    ref = _reference_dct_adamw(w0, grads, lr=1e-2, wd=0.1, rank=R)
    tx = jo.dct_adamw(1e-2, rank=R, update_proj_gap=1, weight_decay=0.1, rotate_subspace=True,
                      error_feedback=True, mode="matmul")
    params = jax.tree.map(jnp.asarray, w0)
    state, update = tx.init(params), jax.jit(tx.update)
    for g, expected in zip(grads, ref):
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, u)
        for k in shapes:
            got = np.asarray(params[k], np.float64)
            assert np.linalg.norm(got - expected[k]) <= 1e-5 * np.linalg.norm(expected[k]), k
            assert np.linalg.norm(got - expected[k]) <= 1e-3 * np.linalg.norm(expected[k] - w0[k]), k


def test_rotation_keeps_moments_of_reselected_indices():
    tx = jo.scale_by_dct_adamw(rank=R, update_proj_gap=1, rotate_subspace=True, b1=0.5)
    update = jax.jit(tx.update)
    state = tx.init({"w": jnp.zeros((M, N))})
    _, state = update({"w": normal((M, N), 0)}, state)
    before = state.leaves["w"]
    g = normal((M, N), 1)
    _, state = update({"w": g}, state)
    after = state.leaves["w"]
    old, new = np.asarray(before.basis.indices), np.asarray(after.basis.indices)
    low = np.asarray(jo.DCTProjector(rank=R, side="right").down(g, after.basis))
    for slot, index in enumerate(new):
        carried = before.inner.mu[:, list(old).index(index)] if index in old else 0.0
        np.testing.assert_allclose(after.inner.mu[:, slot], 0.5 * carried + 0.5 * low[:, slot], rtol=1e-5, atol=1e-6)
