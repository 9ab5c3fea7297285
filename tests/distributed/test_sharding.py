"""Adapter shardings derived from the base's (docs/design.md §6: A follows the input axis, B the output axis)
on a 2×4 mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft import sharding
from jpeft.methods.base import Method
from jpeft.methods.hd_pissa import HDPiSSA


@dataclasses.dataclass(frozen=True)
class BankLoRA(Method):
    """Test-only shared-bank method: `K' = K + (a·g)@b`, one trainable `g` shared by all leaves."""

    name = "bank_lora_test"
    rank: int = 4

    def create(self, key, w, calib=None):
        ka, kb = jax.random.split(key)
        return self.node(w, train={"b": 0.1 * jax.random.normal(kb, (self.rank, w.shape[1]))},
                         frozen={"a": jax.random.normal(ka, (w.shape[0], self.rank)) / w.shape[0] ** 0.5})

    def create_shared(self, key, leaves):
        return {"g": jnp.ones((self.rank,))}, {"bank": jnp.ones((len(leaves), self.rank))}

    def materialise(self, node, rng=None):
        return node.base + (node.frozen["a"] * node.train["shared"]["g"]) @ node.train["b"]


def mesh():
    return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def base_params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {"q": {"kernel": jax.random.normal(k[0], (32, 64)) / 32 ** 0.5, "bias": jnp.zeros((64,))},
            "o": {"kernel": jax.random.normal(k[1], (64, 32)) / 8.0},
            "v": {"kernel": jax.random.normal(k[2], (32, 32)) / 32 ** 0.5},
            "u": {"kernel": jax.random.normal(k[3], (32, 32)) / 32 ** 0.5},
            "temperature": jnp.ones(())}


#: FSDP on "fsdp", Megatron-style tensor parallelism on "tp".
BASE_SPECS = {"q": {"kernel": P("fsdp", "tp"), "bias": P("tp")}, "o": {"kernel": P("tp", "fsdp")},
              "v": {"kernel": P("fsdp", None)}, "u": {"kernel": P(None, "tp")}, "temperature": None}

SPEC = jpeft.Spec({"q/kernel": jpeft.LoRA(rank=4, alpha=8, init="gaussian"),
                   "o/kernel": jpeft.DoRA(rank=4, alpha=8),
                   "(v|u)/kernel": BankLoRA()})


def forward(p, x):
    h = jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"])
    return (h @ p["o"]["kernel"]) @ p["v"]["kernel"] @ p["u"]["kernel"] * p["temperature"]


def test_derived_partition_specs():
    params = jpeft.init(jax.random.PRNGKey(1), base_params(), SPEC)
    specs = sharding.partition_specs(params, BASE_SPECS, mesh())
    q, o, v, u = specs["q"]["kernel"], specs["o"]["kernel"], specs["v"]["kernel"], specs["u"]["kernel"]
    assert (q.base, q.train["a"], q.train["b"]) == (P("fsdp", "tp"), P("fsdp"), P(None, "tp"))
    assert (o.base, o.train["a"], o.train["b"], o.train["m"]) == (P("tp", "fsdp"), P("tp"), P(None, "fsdp"), P("fsdp"))
    assert (v.base, v.frozen["a"], v.train["b"]) == (P("fsdp"), P("fsdp"), P())
    assert (u.base, u.frozen["a"], u.train["b"]) == (P(None, "tp"), P(), P(None, "tp"))
    # "u" comes first in tree order, so it owns the bank; banks are replicated
    assert u.train["shared"] == {"g": P()} and u.frozen["shared"] == {"bank": P()}
    assert "shared" not in v.train
    assert specs["q"]["bias"] == P("tp") and specs["temperature"] == P()
    # NamedShardings from NamedShardings (no mesh argument), and from a callable
    named = jax.tree.map(lambda s: NamedSharding(mesh(), s), BASE_SPECS, is_leaf=lambda x: isinstance(x, P))
    assert sharding.adapter_shardings(params, {**named, "temperature": None}, mesh())["q"]["kernel"].train["a"] == \
        NamedSharding(mesh(), P("fsdp"))
    by_path = sharding.partition_specs(params, lambda path, leaf: P("tp") if path == "q/bias" else P(), mesh())
    assert by_path["q"]["bias"] == P("tp") and by_path["q"]["kernel"].train["a"] == P()


def test_hd_pissa_stack_axis_wins_and_indivisible_dims_replicate():
    base = {"w": jax.random.normal(jax.random.PRNGKey(0), (32, 64))}
    params = jpeft.init(jax.random.PRNGKey(1), base, jpeft.Spec({"w": HDPiSSA(rank=2, devices=2)}))
    w = sharding.partition_specs(params, {"w": P("fsdp", "tp")}, mesh(), stack_axis="fsdp")["w"]
    assert w.train["a"] == P("fsdp") and w.train["b"] == P("fsdp", None, "tp")   # "fsdp" used once
    assert w.frozen["a0"] == P(None, "fsdp") and w.frozen["b0"] == P(None, None, "tp")
    odd = jpeft.init(jax.random.PRNGKey(1), {"w": jnp.ones((6, 64))}, jpeft.Spec({"w": jpeft.LoRA(rank=2)}))
    spec = sharding.partition_specs(odd, {"w": P("tp", "fsdp")}, mesh())["w"]
    assert spec.base == P(None, "fsdp") and spec.train["a"] == P() and spec.train["b"] == P(None, "fsdp")
    with pytest.raises(KeyError, match="no base sharding for 'w'"):
        sharding.partition_specs(odd, {"x": P()}, mesh())


def test_jitted_train_step_on_a_2x4_mesh_keeps_the_derived_shardings():
    m = mesh()
    params = jpeft.init(jax.random.PRNGKey(1), base_params(), SPEC)
    trainable, frozen = jpeft.split(params)
    train_sh, frozen_sh = sharding.split_shardings(params, BASE_SPECS, m)
    tx = optax.adamw(1e-2)
    opt_sh = sharding.opt_state_shardings(jax.eval_shape(tx.init, trainable), train_sh, m)
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 32))
    y = jax.random.normal(jax.random.PRNGKey(3), (16, 32))
    batch_sh = NamedSharding(m, P("fsdp"))

    def train_step(trainable, frozen, opt_state, x, y):
        def loss(t):
            return jnp.mean(jnp.square(forward(jpeft.apply(jpeft.combine(t, frozen), SPEC), x) - y))

        value, g = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    step = jax.jit(train_step, in_shardings=(train_sh, frozen_sh, opt_sh, batch_sh, batch_sh),
                   out_shardings=(train_sh, opt_sh, NamedSharding(m, P())))
    t, f = jax.device_put(trainable, train_sh), jax.device_put(frozen, frozen_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(t)
    ref_t, ref_opt = trainable, tx.init(trainable)
    for _ in range(2):
        t, opt_state, value = step(t, f, opt_state, x, y)
        ref_t, ref_opt, ref_value = jax.jit(train_step)(ref_t, frozen, ref_opt, x, y)

    expect = lambda *axes: NamedSharding(m, P(*axes))  # noqa: E731
    q, o, v = t["q"]["kernel"], t["o"]["kernel"], t["v"]["kernel"]
    assert q.train["a"].sharding == expect("fsdp") and q.train["b"].sharding == expect(None, "tp")
    assert o.train["a"].sharding == expect("tp") and o.train["b"].sharding == expect(None, "fsdp")
    assert o.train["m"].sharding == expect("fsdp")
    assert v.train["b"].sharding == expect() and t["u"]["kernel"].train["shared"]["g"].sharding == expect()
    assert {s.data.shape for s in q.train["a"].addressable_shards} == {(16, 4)}    # 32 / fsdp
    assert {s.data.shape for s in q.train["b"].addressable_shards} == {(4, 16)}    # 64 / tp
    assert {s.data.shape for s in o.train["m"].addressable_shards} == {(16,)}
    adam = opt_state[0]
    assert adam.mu["q"]["kernel"].train["a"].sharding == expect("fsdp")
    assert adam.nu["o"]["kernel"].train["m"].sharding == expect("fsdp")
    assert adam.count.sharding == expect()
    assert (f["q"]["kernel"].base.sharding == expect("fsdp", "tp")
            and f["v"]["kernel"].frozen["a"].sharding == expect("fsdp"))
    # the same numbers as the unsharded step
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(t), jax.tree.leaves(ref_t)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_viewed_nodes_follow_the_base_axes_and_keep_the_stack_sharded():
    """A scanned stack `(layers, in, heads, hd)` sharded `P("fsdp", None, "tp")`: the adapters keep
    the layer axis on fsdp; `b` (rank, heads·hd) follows the output group's major axis (heads on tp);
    an attention-out kernel `(heads, hd, out)` with `P("tp", None, "fsdp")`: `a` follows heads."""
    m = mesh()
    params = {"q": jnp.ones((2, 16, 4, 8)), "o": jnp.ones((4, 8, 16))}
    views = {"q": jpeft.View(inputs=(1,), outputs=(2, 3), batch=(0,)), "o": jpeft.View(inputs=(0, 1), outputs=(2,))}
    spec = jpeft.Spec({"q|o": jpeft.LoRA(rank=4)}, views=views)
    tree = jpeft.init(jax.random.PRNGKey(0), params, spec)
    specs = sharding.partition_specs(tree, {"q": P("fsdp", None, "tp"), "o": P("tp", None, "fsdp")}, m)
    assert specs["q"].base == P("fsdp", None, "tp")
    assert specs["q"].train["a"] == P("fsdp")                 # (layers, in, r): in is unsharded
    assert specs["q"].train["b"] == P("fsdp", None, "tp")     # (layers, r, heads·hd)
    assert specs["o"].train["a"] == P("tp")                    # (heads·hd, r)
    assert specs["o"].train["b"] == P(None, "fsdp")            # (r, out)
    shardings = jax.tree.map(lambda s: NamedSharding(m, s), specs, is_leaf=lambda x: isinstance(x, P))
    placed = jax.device_put(tree, shardings)
    merged = jax.jit(lambda t: jpeft.merge(t, spec))(placed)
    np.testing.assert_allclose(merged["q"], params["q"])


def test_fsdp_specs_split_the_largest_divisible_dimension_and_leave_small_arrays_replicated():
    base = {"embed": np.zeros((4096, 512)), "q": np.zeros((512, 1376)), "odd": np.zeros((513, 1375)),
            "stack": np.zeros((3, 512, 96)), "norm": np.zeros((512,))}
    specs = sharding.fsdp_specs(base, mesh(), "fsdp", tensor="tp")
    assert specs == {"embed": P("fsdp", "tp"), "q": P("tp", "fsdp"), "odd": P(), "stack": P(None, "fsdp", "tp"),
                     "norm": P()}
    assert sharding.fsdp_specs(base, mesh(), "fsdp") == {"embed": P("fsdp"), "q": P(None, "fsdp"), "odd": P(),
                                                          "stack": P(None, "fsdp"), "norm": P()}
    with pytest.raises(ValueError, match="no axis 'data'"):
        sharding.fsdp_specs(base, mesh(), "data")


def test_a_quantised_base_is_replicated_and_its_adapters_follow_its_logical_shape():
    """QLoRA under FSDP + tensor parallelism: a `QTensor`'s codes and scales are replicated, the
    adapters on it take the spec of its logical `(in, out)`, untargeted quantised leaves too are
    handled; the sharded step runs and matches the unsharded one."""
    base = {"q": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (512, 256))},
            "o": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (256, 512))}}
    spec = jpeft.Spec({"q/kernel": jpeft.LoRA(rank=8)})
    params = jpeft.quantize(jpeft.init(jax.random.PRNGKey(2), base, spec), {".*/kernel": jpeft.quant.nf4()})
    base_specs = sharding.fsdp_specs(base, mesh(), "fsdp", tensor="tp")
    assert base_specs["q"]["kernel"] == P("fsdp", "tp")
    specs = sharding.partition_specs(params, base_specs, mesh())
    node = specs["q"]["kernel"]
    assert node.train == {"a": P("fsdp"), "b": P(None, "tp")}     # (512, r) over fsdp, (r, 256) over tp
    assert jpeft.quant.is_quantized(node.base) and all(s == P() for s in jax.tree.leaves(node.base))
    assert (jpeft.quant.is_quantized(specs["o"]["kernel"])
            and all(s == P() for s in jax.tree.leaves(specs["o"]["kernel"])))
    train_sh, frozen_sh = jpeft.split(sharding.adapter_shardings(params, base_specs, mesh()))
    trainable, frozen = jpeft.split(params)
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 512))

    def loss(t, f):
        p = jpeft.combine(t, f)
        return jnp.sum(jnp.tanh(x @ jpeft.apply(p, spec)["q"]["kernel"]) @ jpeft.apply(p, spec)["o"]["kernel"])

    sharded = jax.jit(jax.grad(loss), in_shardings=(train_sh, frozen_sh))(trainable, frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b)))),
                 sharded, jax.grad(loss)(trainable, frozen))   # sums split over the mesh: 1e-5 of the scale
