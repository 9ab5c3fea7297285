"""A small regression task for the examples: a base model is pretrained on teacher A, then
fine-tuned on teacher B = A with a low-rank change in its middle layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jpeft

IN, HIDDEN, OUT, SHIFT_RANK = 32, 128, 16, 4


def teachers(seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    w1 = jax.random.normal(ks[0], (IN, HIDDEN)) / IN ** 0.5
    w2 = jax.random.normal(ks[1], (HIDDEN, HIDDEN)) / HIDDEN ** 0.5
    w3 = jax.random.normal(ks[2], (HIDDEN, OUT)) / HIDDEN ** 0.5
    shift = (4.0 * jax.random.normal(ks[3], (HIDDEN, SHIFT_RANK)) @ jax.random.normal(ks[4], (SHIFT_RANK, HIDDEN))
             / HIDDEN)

    def teacher(w_mid):
        return lambda x: jnp.tanh(jnp.tanh(x @ w1) @ w_mid) @ w3

    return teacher(w2), teacher(w2 + shift)


def batch(key, size: int = 256):
    return jax.random.normal(key, (size, IN))


def mse(pred, target):
    return jnp.mean(jnp.square(pred - target))


def fit(loss_fn, trainable, steps, lr, log=None):
    """Adam on `loss_fn(trainable, key)`; returns the trained tree and the loss history."""
    tx = optax.adam(lr)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, key):
        value, grads = jax.value_and_grad(loss_fn)(trainable, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    losses = []
    for i in range(steps):
        trainable, opt_state, value = step(trainable, opt_state, jax.random.PRNGKey(1000 + i))
        losses.append(float(value))
        if log and (i % max(steps // 10, 1) == 0 or i == steps - 1):
            log(f"step {i:4d}  loss {losses[-1]:.5f}")
    return trainable, losses


def pretrain_and_adapt(forward, params, spec, steps: int, lr: float = 3e-3, log=None):
    """Pretrain `params` (`forward(params, x) -> y`) on teacher A, then fine-tune the adapters of
    `spec` on teacher B. Returns the losses, the parameter count, teacher-B losses before and
    after (merged weights) on a fixed evaluation batch, and the merged parameters."""
    teacher_a, teacher_b = teachers()

    def supervised(teacher):
        return lambda p, key: mse(forward(p, x := batch(key)), teacher(x))

    params, _ = fit(supervised(teacher_a), params, 600, 1e-2)  # the "pretrained" base model
    loss_b = supervised(teacher_b)
    needs_calib = any(m.needs_calib for _, m in spec.rules)
    calib = jax.grad(loss_b)(params, jax.random.PRNGKey(99)) if needs_calib else None
    adapted = jpeft.init(jax.random.PRNGKey(1), params, spec, calib=calib)
    trainable, frozen = jpeft.split(adapted)
    count = jpeft.count(adapted)
    eval_key = jax.random.PRNGKey(12345)
    before = float(loss_b(params, eval_key))
    if log:
        log(f"{spec!r}\nparameters: {count}\nteacher-B loss before fine-tuning: {before:.5f}")
    loss_fn = lambda t, key: loss_b(jpeft.apply(jpeft.combine(t, frozen), spec), key)  # noqa: E731
    trainable, losses = fit(loss_fn, trainable, steps, lr, log)
    merged = jpeft.merge(jpeft.combine(trainable, frozen), spec)
    after = float(loss_b(merged, eval_key))
    if log:
        log(f"teacher-B loss after fine-tuning (merged weights): {after:.5f}")
    return {"losses": losses, "count": count, "before": before, "after": after, "merged": merged}
