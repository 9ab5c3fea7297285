"""A planted-rank regression toy shared by the AdaLoRA / SoRA oracles."""

import jax
import jax.numpy as jnp
import optax

import jpeft

SHAPES = ((32, 48), (48, 32))  # kernel layout (in, out), non-square on purpose


def planted(seed, shape, rank):
    """A rank-`rank` kernel-layout delta with unit singular values."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    u = jnp.linalg.qr(jax.random.normal(k1, (shape[0], rank)))[0]
    v = jnp.linalg.qr(jax.random.normal(k2, (shape[1], rank)))[0]
    return u @ v.T


def train_planted(method, ranks, steps=200, lr=2e-2, seed=0, extra_loss=None):
    """Adam + `jpeft.after_step` (with gradients) on `y = x(K + ΔK*)` for two kernels whose planted
    deltas have ranks `ranks`; the loop is one `lax.scan`. Returns `(params, spec, losses)`."""
    base = {f"w{i}": jax.random.normal(jax.random.PRNGKey(10 + i), s) / s[0] ** 0.5 for i, s in enumerate(SHAPES)}
    deltas = {f"w{i}": planted(20 + i, s, r) for i, (s, r) in enumerate(zip(SHAPES, ranks))}
    xs = {f"w{i}": jax.random.normal(jax.random.PRNGKey(30 + i), (128, s[0])) for i, s in enumerate(SHAPES)}
    spec = jpeft.Spec({r"w\d": method})
    params = jpeft.init(jax.random.PRNGKey(seed), base, spec)
    tx = optax.adam(lr)
    trainable, frozen = jpeft.split(params)

    def loss(t, f):
        eff = jpeft.apply(jpeft.combine(t, f), spec)
        fit = sum(jnp.mean(jnp.square(xs[k] @ (eff[k] - base[k] - deltas[k]))) for k in base)
        return fit + (0.0 if extra_loss is None else extra_loss(t)), fit

    def step(carry, i):
        t, f, opt = carry
        (_, fit), g = jax.value_and_grad(loss, has_aux=True)(t, f)
        updates, opt = tx.update(g, opt, t)
        t = optax.apply_updates(t, updates)
        p, opt = jpeft.after_step(jpeft.combine(t, f), opt, spec, step=i, key=jax.random.PRNGKey(0), grads=g)
        t, f = jpeft.split(p)
        return (t, f, opt), fit

    run = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(1, steps + 1)))
    (trainable, frozen, _), losses = run((trainable, frozen, tx.init(trainable)))
    return jpeft.combine(trainable, frozen), spec, losses
