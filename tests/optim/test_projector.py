"""Projectors shared by the family-I optimizers (`jpeft.optim`): GaLore's orthonormal SVD basis, DCT-AdamW's
orthonormal DCT-II basis, its index selection and its FFT path."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from jpeft.optim.projector import (
    DCTBasis,
    DCTProjector,
    MatrixView,
    SVDProjector,
    apply_rotation,
    canonical_signs,
    dct_matrix,
    dct_rows,
    resolve_side,
)

M, N, R = 48, 32, 4  # the shared test shapes (m=48, n=32, r=4): non-square on purpose


def mat(shape=(M, N), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


@pytest.mark.parametrize("proj_type, tall, wide", [
    ("std", "right", "left"), ("reverse_std", "left", "right"), ("left", "left", "left"),
    ("right", "right", "right"), ("full", "both", "both")])
def test_resolve_side(proj_type, tall, wide):
    assert resolve_side(proj_type, M, N) == tall
    assert resolve_side(proj_type, N, M) == wide
    assert resolve_side(proj_type, N, N) == tall  # m ≥ n counts as tall (reference rule)


def test_resolve_side_rejects_unknown():
    with pytest.raises(ValueError, match="proj_type"):
        resolve_side("diagonal", M, N)


def test_matrix_view_roundtrip_and_shape():
    x = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    view = MatrixView(rows=(2, 0), cols=(3, 1))
    y = view.to_matrix(x)
    assert y.shape == (8, 15) == view.matrix_shape(x.shape)
    np.testing.assert_array_equal(y, np.transpose(np.asarray(x), (2, 0, 3, 1)).reshape(8, 15))
    np.testing.assert_array_equal(view.from_matrix(y, x.shape), x)
    assert not MatrixView(rows=0, cols=1).fits((2, 3, 4))
    with pytest.raises(ValueError, match="disjoint"):
        MatrixView(rows=(0, 1), cols=(1,)).to_matrix(x[0, 0])


# ----------------------------------------------------------------------------------- SVD projector
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_svd_basis_is_orthonormal_and_shapes_follow_the_side(side):
    proj = SVDProjector(rank=R, side=side)
    g = mat()
    p = proj.fit(g, None)
    if p.left is not None:
        assert p.left.shape == (M, R)
        np.testing.assert_allclose(p.left.T @ p.left, np.eye(R), atol=1e-5)
    if p.right is not None:
        assert p.right.shape == (R, N)
        np.testing.assert_allclose(p.right @ p.right.T, np.eye(R), atol=1e-5)
    low = proj.down(g, p)
    assert low.shape == proj.low_shape(M, N) == {"left": (R, N), "right": (M, R), "both": (R, R)}[side]
    assert proj.up(low, p, (M, N)).shape == (M, N)


def test_svd_projection_keeps_the_leading_singular_part():
    g = mat()
    u, s, vh = np.linalg.svd(np.asarray(g), full_matrices=False)
    best = (u[:, :R] * s[:R]) @ vh[:R]
    for side in ("left", "right"):
        proj = SVDProjector(rank=R, side=side)
        p = proj.fit(g, None)
        np.testing.assert_allclose(proj.up(proj.down(g, p), p, (M, N)), best, atol=1e-4)


def test_canonical_signs_make_the_largest_entry_positive_and_keep_the_product():
    u, s, vh = jnp.linalg.svd(mat(), full_matrices=False)
    cu, cvh = canonical_signs(-u, -vh)
    cols = np.argmax(np.abs(np.asarray(cu)), axis=0)
    assert np.all(np.asarray(cu)[cols, np.arange(cu.shape[1])] > 0)
    np.testing.assert_allclose((cu * s) @ cvh, (u * s) @ vh, atol=1e-5)
    cu2, _ = canonical_signs(u, vh)
    np.testing.assert_array_equal(cu, cu2)


def test_randomized_svd_finds_the_principal_subspace():
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    g = (jax.random.normal(k[0], (200, R)) * jnp.array([50.0, 30, 20, 10])) @ jax.random.normal(k[1], (R, 120))
    g = g + 0.01 * jax.random.normal(k[2], (200, 120))
    exact = jax.jit(SVDProjector(rank=R, side="left").fit)(g, None).left
    approx = jax.jit(SVDProjector(rank=R, side="left", method="randomized", niter=2).fit)(g, jax.random.PRNGKey(0)).left
    # principal angles: singular values of exactᵀ approx are cosines
    cos = np.linalg.svd(np.asarray(exact.T @ approx), compute_uv=False)
    assert cos.min() > 1 - 1e-5
    np.testing.assert_allclose(approx.T @ approx, np.eye(R), atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_svd_rotation_equals_down_of_up(side):
    proj = SVDProjector(rank=R, side=side)
    old, new = proj.fit(mat(seed=1), None), proj.fit(mat(seed=2), None)
    x = mat(proj.low_shape(M, N), seed=3)
    np.testing.assert_allclose(apply_rotation(x, proj.rotation(old, new)),
                               proj.down(proj.up(x, old, (M, N)), new), atol=1e-5)


# ----------------------------------------------------------------------------------- DCT projector
@pytest.mark.parametrize("d", [64, 96, 128])
def test_dct_basis_is_orthonormal(d, x64):
    c = np.asarray(dct_matrix(d, jnp.float64))
    np.testing.assert_allclose(c.T @ c, np.eye(d), atol=1e-5)
    np.testing.assert_allclose(c @ c.T, np.eye(d), atol=1e-5)


def test_dct_matrix_is_scipys_orthonormal_dct2():
    d = 50
    c = np.asarray(dct_matrix(d))
    np.testing.assert_allclose(c, scipy.fft.dct(np.eye(d), type=2, norm="ortho", axis=0), atol=1e-6)


def test_dct_rows_are_exact_for_large_sizes():
    """Integer reduction of the angle keeps float32 rows accurate where a naive k·(2j+1) would not."""
    d = 11008
    idx = jnp.array([0, 1, 5000, d - 1])
    rows = np.asarray(dct_rows(d, idx), np.float64)
    k = np.asarray(idx, np.float64)[:, None]
    j = np.arange(d)[None, :]
    ref = np.sqrt(np.where(k == 0, 1.0, 2.0) / d) * np.cos(np.pi * k * (2 * j + 1) / (2 * d))
    np.testing.assert_allclose(rows, ref, atol=2e-7)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_fft_path_equals_matmul_path(side):
    g = mat()
    mm, ff = DCTProjector(rank=R, side=side, mode="matmul"), DCTProjector(rank=R, side=side, mode="fft")

    @jax.jit
    def paths(g):
        out = {}
        for name, proj in (("mm", mm), ("ff", ff)):
            p, low = proj.fit_down(g, None)
            out[name] = dict(s=proj.transform(g), idx=p.indices, low=low, down=proj.down(g, p),
                             up=proj.up(low, p, (M, N)))
        return out

    out = paths(g)
    mm_, ff_ = out["mm"], out["ff"]
    np.testing.assert_allclose(ff_["s"], mm_["s"], atol=1e-5)
    # the FFT path is G Cᵀ along the projected axis
    axis = 1 if side == "right" else 0
    np.testing.assert_allclose(ff_["s"], scipy.fft.dct(np.asarray(g), type=2, norm="ortho", axis=axis), atol=1e-5)
    np.testing.assert_array_equal(mm_["idx"], ff_["idx"])
    np.testing.assert_allclose(mm_["low"], ff_["low"], atol=1e-5)
    np.testing.assert_allclose(mm_["down"], mm_["low"], atol=1e-5)
    np.testing.assert_allclose(ff_["down"], ff_["low"], atol=1e-5)
    np.testing.assert_allclose(mm_["up"], ff_["up"], atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_selection_maximises_the_l1_alignment(side):
    """The selected index set is the best one: brute force over all index sets on a small size."""
    g = mat((8, 6) if side == "right" else (6, 8), seed=4)
    d, r = 6, 3
    proj = DCTProjector(rank=r, side=side)
    chosen = set(np.asarray(proj.fit(g, None).indices).tolist())
    s = np.asarray(proj.transform(g))
    score = np.abs(s).sum(axis=0 if side == "right" else 1)
    best = max(itertools.combinations(range(d), r), key=lambda idx: score[list(idx)].sum())
    assert chosen == set(best)


def test_dct_state_is_int32_indices_only():
    proj = DCTProjector(rank=R, side="right")
    p = proj.init(M, N, jnp.float32)
    assert isinstance(p, DCTBasis) and p.indices.dtype == jnp.int32 and p.indices.shape == (R,)
    fitted = proj.fit(mat(), None)
    assert fitted.indices.dtype == jnp.int32 and len(set(np.asarray(fitted.indices).tolist())) == R


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_rotation_is_the_index_match_and_equals_down_of_up(side):
    proj = DCTProjector(rank=R, side=side)
    old, new = DCTBasis(jnp.array([3, 7, 1, 9], jnp.int32)), DCTBasis(jnp.array([1, 2, 3, 4], jnp.int32))
    x = mat(proj.low_shape(M, N), seed=5)
    rotated = apply_rotation(x, proj.rotation(old, new))
    np.testing.assert_allclose(rotated, proj.down(proj.up(x, old, (M, N)), new), atol=1e-5)
    take = (lambda a, i: a[:, i]) if side == "right" else (lambda a, i: a[i, :])
    np.testing.assert_array_equal(take(rotated, 0), take(x, 2))  # index 1 was old slot 2
    np.testing.assert_array_equal(take(rotated, 2), take(x, 0))  # index 3 was old slot 0
    np.testing.assert_array_equal(take(rotated, 1), 0.0)         # index 2 is new
