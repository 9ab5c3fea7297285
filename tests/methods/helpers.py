"""Small helpers shared by the per-method oracle tests (paper shapes m=48, n=32, r=4)."""

import jax
import jax.numpy as jnp

import jpeft

N_IN, M_OUT, R = 32, 48, 4


def kernel(seed=0, shape=(N_IN, M_OUT), dtype=None, decay=False):
    """A random kernel; with `decay`, singular values 1, 0.8, 0.64, ... (well separated)."""
    k = jax.random.normal(jax.random.PRNGKey(seed), shape, dtype or jnp.result_type(float))
    if not decay:
        return k
    u, _, vh = jnp.linalg.svd(k, full_matrices=False)
    return (u * 0.8 ** jnp.arange(min(shape))) @ vh


def node_for(method, w, key=0, calib=None):
    params = {"w": w}
    return jpeft.init(jax.random.PRNGKey(key), params, jpeft.Spec({"w": method}),
                      calib=None if calib is None else {"w": calib})["w"]
