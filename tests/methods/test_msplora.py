"""MSPLoRA oracles: global + mid-level (layer groups) + layer-specific LoRA."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.bank import MSPLoRA, layer_and_module
from jpeft.shared import attach_shared
from tests.methods.helpers import kernel

METHOD = MSPLoRA(rank=4, mid_rank=3, layer_rank=2, alpha=8.0, groups=3)
N_LAYERS = 6
SPEC = jpeft.Spec({r"layers_\d+/(q|v)/kernel": METHOD})


def params():
    return {f"layers_{i}": {"q": {"kernel": kernel(seed=2 * i, shape=(16, 24))},
                            "v": {"kernel": kernel(seed=2 * i + 1, shape=(24, 16))}} for i in range(N_LAYERS)}


def perturbed(tree, seed=3):
    rng = np.random.default_rng(seed)  # numpy noise: no per-shape compilation
    return jax.tree.map(lambda n: n.replace(train=jax.tree.map(
                            lambda v: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype), n.train))
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


def nodes_of(tree):
    return {(i, mod): tree[f"layers_{i}"][mod]["kernel"] for i in range(N_LAYERS) for mod in ("q", "v")}


def test_layer_and_module_parsing():
    assert layer_and_module("model/layers/10/attn/q_proj/kernel") == (10, "model/layers/*/attn/q_proj/kernel")
    assert layer_and_module("layers_3/q/kernel") == (3, "layers_*/q/kernel")
    assert layer_and_module("blk/q_proj/kernel") == (0, "blk/q_proj/kernel")


def test_slots_groups_identity_and_counts():
    tree = jpeft.init(jax.random.PRNGKey(0), params(), SPEC)
    for leaf, base in zip(jax.tree.leaves(jpeft.apply(tree, SPEC)), jax.tree.leaves(params())):
        np.testing.assert_array_equal(leaf, base)
    nodes = nodes_of(tree)
    # layers 0-1, 2-3, 4-5 share a mid-level LoRA per module (q and v separately); one global per module.
    for (i, _mod), node in nodes.items():
        assert int(node.frozen["global"]) == 0  # one module per shape bucket
        assert int(node.frozen["mid"]) == i // 2
    shared = nodes[(0, "q")].train["shared"]
    assert set(shared) == {"16x24", "24x16"} and shared["16x24"]["mid_a"].shape == (3, 16, 3)
    per_module = 4 * (16 + 24) + 3 * 3 * (16 + 24)       # global + 3 mid groups
    per_layer = 2 * (16 + 24)
    assert jpeft.count(tree).trainable == 2 * per_module + 2 * N_LAYERS * per_layer


def test_delta_is_the_sum_of_the_three_levels(x64):
    tree = perturbed(jpeft.init(jax.random.PRNGKey(0), params(), SPEC))
    nodes = nodes_of(tree)
    lent = dict(zip(nodes, attach_shared(list(nodes.values()))))
    sh = jax.tree.map(np.asarray, nodes[(0, "q")].train["shared"])
    delta = jax.jit(lambda n: n.method.materialise(n) - n.base)
    for (i, mod), node in lent.items():
        bucket = sh["16x24" if mod == "q" else "24x16"]
        a, b = np.asarray(node.train["a"]), np.asarray(node.train["b"])
        want = (2.0 * bucket["global_a"][0] @ bucket["global_b"][0]            # s_G = α/r_G = 8/4
                + 8.0 / 3 * bucket["mid_a"][i // 2] @ bucket["mid_b"][i // 2]  # s_M = 8/3
                + 4.0 * a @ b)                                                 # s_L = 8/2
        np.testing.assert_allclose(delta(node), want, rtol=1e-10, atol=1e-12)


def test_global_gradient_is_the_sum_of_per_layer_contributions(x64):
    tree = perturbed(jpeft.init(jax.random.PRNGKey(0), params(), SPEC))
    trainable, frozen = jpeft.split(tree)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16))

    def forward(eff):
        h = x
        for i in range(N_LAYERS):
            h = jnp.tanh(jnp.tanh(h @ eff[f"layers_{i}"]["q"]["kernel"]) @ eff[f"layers_{i}"]["v"]["kernel"])
        return jnp.sum(h ** 2)

    g = jax.jit(jax.grad(lambda t: forward(jpeft.apply(jpeft.combine(t, frozen), SPEC))))(trainable)
    g_global = g["layers_0"]["q"]["kernel"].train["shared"]["16x24"]["global_a"][0]

    # Reference: every layer gets its own copy of the global q factor; the shared gradient is their sum.
    lent = dict(zip(nodes_of(tree), attach_shared(list(nodes_of(tree).values()))))
    ga0 = lent[(0, "q")].train["shared"]["16x24"]["global_a"][0]

    def forward_copies(copies):
        eff = {f"layers_{i}": {} for i in range(N_LAYERS)}
        for (i, mod), node in lent.items():
            if mod == "q":
                sh = node.train["shared"]["16x24"]
                new = {**node.train["shared"], "16x24": {**sh, "global_a": sh["global_a"].at[0].set(copies[i])}}
                node = node.replace(train={**node.train, "shared": new})
            eff[f"layers_{i}"][mod] = {"kernel": node.method.materialise(node)}
        return forward(eff)

    per_layer = jax.jit(jax.grad(forward_copies))(jnp.stack([ga0] * N_LAYERS))
    np.testing.assert_allclose(g_global, per_layer.sum(0), rtol=1e-9, atol=1e-12)
    assert float(jnp.min(jnp.abs(per_layer).sum((1, 2)))) > 0  # every layer contributes
