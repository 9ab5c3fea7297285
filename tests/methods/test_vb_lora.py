"""VB-LoRA oracles: top-k admixture of one shared bank, not identity at init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.vb_lora import VBLoRA, vblora_storage, vblora_topk_export, vblora_topk_import
from jpeft.shared import attach_shared
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for

B, H, K = 8, 12, 2
METHOD = VBLoRA(rank=R, num_vectors=H, vector_length=B, topk=K)


def tree_of_layers(shapes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {f"layer{i}": {"kernel": jax.random.normal(k, s) / s[0] ** 0.5}
            for i, (k, s) in enumerate(zip(keys, shapes))}


SPEC = jpeft.Spec({r"layer\d+/kernel": METHOD})


def test_every_subvector_is_a_convex_combination_of_exactly_k_bank_rows(x64):
    node = node_for(METHOD, kernel(dtype=jnp.float64))
    bank = np.asarray(node.train["shared"]["bank"])
    a, b = (np.asarray(f) for f in METHOD.lora_factors(node))
    assert a.shape == (R, N_IN) and b.shape == (M_OUT, R)
    # Independent oracle: numpy argsort top-k, softmax, weighted sum of bank rows.
    for logits, subs in ((node.train["logits_a"], a.reshape(R, N_IN // B, B)),
                         (node.train["logits_b"], b.T.reshape(R, M_OUT // B, B).transpose(1, 0, 2))):
        logits = np.asarray(logits)
        idx = np.argsort(-logits, axis=-1)[..., :K]
        top = np.take_along_axis(logits, idx, axis=-1)
        w = np.exp(top - top.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        assert np.all(w > 0) and np.allclose(w.sum(-1), 1.0)
        np.testing.assert_allclose(subs, np.einsum("...k,...kb->...b", w, bank[idx]), rtol=1e-12, atol=1e-15)
        assert len(np.unique(idx[0, 0])) == K  # k distinct rows


def test_delta_is_b_at_a_without_scale_and_not_identity_at_init(x64):
    w = kernel(dtype=jnp.float64)
    node = node_for(METHOD, w)
    a, b = METHOD.lora_factors(node)
    delta = node.method.materialise(node) - w
    np.testing.assert_allclose(delta, (b @ a).T, rtol=1e-12, atol=1e-15)  # W' = W + BA, no α/r
    # Intentionally not the identity (`identity_at_init = False`): small but non-zero at init.
    assert float(jnp.max(jnp.abs(delta))) > 1e-6
    assert float(jnp.linalg.norm(delta)) < 1e-2 * float(jnp.linalg.norm(w))
    assert np.linalg.matrix_rank(np.asarray(delta), tol=1e-12) == R


def test_bank_rows_outside_every_top_k_get_exactly_zero_gradient():
    params = tree_of_layers([(16, 8), (8, 16)])
    method = VBLoRA(rank=1, num_vectors=64, vector_length=8, topk=2)  # 6 sub-vectors x 2 of 64 rows
    spec = jpeft.Spec({r"layer\d+/kernel": method})
    tree = jpeft.init(jax.random.PRNGKey(0), params, spec)
    trainable, frozen = jpeft.split(tree)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16))

    def loss(t):
        eff = jpeft.apply(jpeft.combine(t, frozen), spec)
        return jnp.sum(jnp.sin((x @ eff["layer0"]["kernel"]) @ eff["layer1"]["kernel"]))

    g_bank = np.asarray(jax.jit(jax.grad(loss))(trainable)["layer0"]["kernel"].train["shared"]["bank"])
    used = set()
    for node in (tree["layer0"]["kernel"], tree["layer1"]["kernel"]):
        for name in ("logits_a", "logits_b"):
            used |= set(np.asarray(jax.lax.top_k(node.train[name], 2)[1]).ravel().tolist())
    unused = sorted(set(range(64)) - used)
    assert unused and len(used) <= 12
    np.testing.assert_array_equal(g_bank[unused], 0.0)
    assert np.all(np.any(g_bank[sorted(used)] != 0, axis=1))


def test_bank_is_one_shared_leaf_lent_to_every_layer():
    params = tree_of_layers([(16, 24), (24, 16), (16, 24)])
    tree = jpeft.init(jax.random.PRNGKey(0), params, SPEC)
    nodes = [tree[f"layer{i}"]["kernel"] for i in range(3)]
    assert "shared" in nodes[0].train and all("shared" not in n.train for n in nodes[1:])
    banks = [x for x in jax.tree.leaves(tree) if np.shape(x) == (H, B)]
    assert len(banks) == 1
    lent = attach_shared(nodes)
    assert all(n.train["shared"]["bank"] is nodes[0].train["shared"]["bank"] for n in lent)
    # Replicated under sharding: one leaf, no per-layer copies to shard.
    trainable, _ = jpeft.split(tree)
    assert sum(np.size(x) for x in jax.tree.leaves(trainable)) == jpeft.count(tree).trainable


def test_trainable_and_stored_counts_match_the_formula():
    shapes = [(16, 24), (24, 16), (32, 8)]
    tree = jpeft.init(jax.random.PRNGKey(0), tree_of_layers(shapes), SPEC)
    subvectors = sum(R * (n + m) // B for n, m in shapes)
    count = jpeft.count(tree)
    assert count.trainable == H * B + subvectors * H          # bank once + full logits
    assert count.frozen == sum(n * m for n, m in shapes)       # only the base kernels
    storage = vblora_storage(tree)
    assert storage == (H * B, subvectors, subvectors * H, H * B + subvectors * K * 2,
                       int(H * B + subvectors * ((K - 1) + K * 0.25)))
    exported = vblora_topk_export(tree)
    stored = H * B + sum(np.size(v) for entry in exported.values() for v in entry.values())
    assert stored == storage.topk  # top-k storage: #subvectors·k·(index + weight) + h·b


def test_topk_export_reproduces_the_model():
    params = tree_of_layers([(16, 24), (24, 16)])
    tree = jpeft.init(jax.random.PRNGKey(0), params, SPEC)
    tree = jax.tree.map(lambda n: n.replace(train={**n.train, "logits_a": n.train["logits_a"] * 3.0})
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)
    restored = vblora_topk_import(tree, vblora_topk_export(tree))
    for a, b in zip(jax.tree.leaves(jpeft.merge(tree, SPEC)), jax.tree.leaves(jpeft.merge(restored, SPEC))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_init_distributions_follow_peft_defaults():
    node = node_for(VBLoRA(rank=4, num_vectors=256, vector_length=16), kernel(shape=(64, 128)))
    bank = node.train["shared"]["bank"]
    assert float(jnp.max(jnp.abs(bank))) <= 0.02 and float(jnp.max(jnp.abs(bank))) > 0.019
    assert float(jnp.std(node.train["logits_a"])) == pytest.approx(0.1, rel=0.05)
    assert node.train["logits_a"].shape == (4, 64 // 16, 256) and node.train["logits_b"].shape == (128 // 16, 4, 256)


def test_vector_length_must_divide_both_sides():
    with pytest.raises(jpeft.AdapterError, match=r"w.*\(32, 44\).*vector_length 8 must divide out = 44"):
        node_for(VBLoRA(rank=4, num_vectors=8, vector_length=8), jnp.ones((32, 44)))
    with pytest.raises(ValueError, match="topk"):
        VBLoRA(num_vectors=4, topk=5)


def test_a_node_without_its_lent_bank_names_the_problem():
    tree = jpeft.init(jax.random.PRNGKey(0), tree_of_layers([(16, 24), (24, 16)]), SPEC)
    with pytest.raises(jpeft.AdapterError, match="no shared state.*jpeft.apply"):
        METHOD.materialise(tree["layer1"]["kernel"])  # not the owner, not lent
