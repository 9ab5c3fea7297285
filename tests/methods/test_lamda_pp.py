"""LaMDA++ (rank allocation [UNVERIFIED formula]): per-layer ranks from the
normalised spectrum `σ_i / Σσ`, under a global budget of rank components."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.lamda import LaMDAPP, lamda_pp_threshold
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for

R = 6


def spectrum_kernel(decay, seed=0):
    """A kernel with singular values decay**i."""
    k = kernel(seed=seed)
    u, _, vh = jnp.linalg.svd(k, full_matrices=False)
    return (u * decay ** jnp.arange(N_IN)) @ vh


def test_mask_follows_the_normalised_spectrum_and_init_is_the_identity(x64):
    w = spectrum_kernel(0.6)
    sig = 0.6 ** np.arange(N_IN)
    normalised = sig / sig.sum()
    just_below = 1 - 1e-9  # the SVD recovers σ to ~1e-15, not bit-exactly: no threshold on a tie
    for threshold, kept in [(0.0, R), (float(normalised[2]) * just_below, 3), (1.0, 1)]:
        method = LaMDAPP(rank=R, threshold=threshold)
        node = node_for(method, w)
        np.testing.assert_array_equal(node.frozen["keep"], np.arange(R) < kept)
        np.testing.assert_allclose(method.materialise(node), w, atol=1e-12)
        assert method.trainable_count(node) == kept * kept + kept * M_OUT    # updated scalars
        assert jpeft.count({"w": node}).trainable == R * R + R * M_OUT         # arrays (static rank)


def test_masked_components_are_inert(x64):
    w = spectrum_kernel(0.6)
    sig = 0.6 ** np.arange(N_IN)
    method = LaMDAPP(rank=R, threshold=float((sig / sig.sum())[2]) * (1 - 1e-9))  # keeps 3 of 6
    node = node_for(method, w)
    noise = jax.random.normal(jax.random.PRNGKey(1), (R, R))
    masked = jnp.zeros((R, R)).at[3:, :].set(noise[3:]).at[:, 3:].set(noise[:, 3:])
    moved = node.replace(train={**node.train, "core": node.train["core"] + masked})
    np.testing.assert_allclose(method.materialise(moved), method.materialise(node), atol=1e-12)
    g = jax.grad(lambda t: jnp.sum(jnp.sin(method.materialise(node.replace(train=t)))))(node.train)
    assert not np.any(g["core"][3:]) and not np.any(g["core"][:, 3:]) and not np.any(g["b"][3:])
    assert np.all(np.any(g["b"][:3] != 0, axis=1))


def test_threshold_spends_the_global_budget(x64):
    kernels = [spectrum_kernel(d, seed=i) for i, d in enumerate([0.3, 0.6, 0.8, 0.95])]
    params = {f"l{i}": k for i, k in enumerate(kernels)}
    for budget in (4, 9, 13, 24):
        threshold = lamda_pp_threshold(kernels, R, budget)
        tree = jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec({"l.": LaMDAPP(rank=R, threshold=threshold)}))
        ranks = [int(np.sum(tree[f"l{i}"].frozen["keep"])) for i in range(4)]
        assert sum(ranks) == budget and all(1 <= r <= R for r in ranks)
    # the allocation is the global top of the normalised spectra (component 0 of each layer always)
    threshold = lamda_pp_threshold(kernels, R, 13)
    scores = sorted(((0.3, 0.6, 0.8, 0.95)[i], j) for i in range(4) for j in range(1, R))
    normalised = {(d, j): d ** j * (1 - d) / (1 - d ** N_IN) for d, j in scores}
    top = sorted(normalised, key=normalised.get, reverse=True)[: 13 - 4]
    want = [1 + sum(1 for d, _ in top if d == decay) for decay in (0.3, 0.6, 0.8, 0.95)]
    ranks = [int(np.sum(node_for(LaMDAPP(rank=R, threshold=threshold), k).frozen["keep"])) for k in kernels]
    assert ranks == want
