"""Shared helpers for the kernel tests: random operands, tolerances, jaxpr inspection."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

import pallas_kernels as pk

RTOL = 1e-5
# Coarse tiles keep interpreted grids small (each interpreted grid step costs ~0.1 ms).
SMALL = pk.Blocks(tokens=32, out=32, inner=32, chunk=16)


def normal(seed, shape):
    """Standard-normal float32 operand (numpy-generated: no per-op XLA compiles in tests)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def sparse_support(seed, m, n, k):
    """k sorted unique flat indices into the paper-layout (m, n) matrix, int32."""
    idx = np.random.default_rng(seed).choice(m * n, size=k, replace=False)
    return jnp.asarray(np.sort(idx), jnp.int32)


def assert_close(actual, expected, rtol=RTOL):
    """Relative fp32 check, scaled by the largest reference entry."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def linear_loss(fn, ct):
    """Loss Σ fn(...)·ct: its gradient is the VJP of fn with a random cotangent."""
    return lambda *args: jnp.sum(fn(*args) * ct)


def _sub_jaxprs(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _sub_jaxprs(v)


def iter_eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, custom_vjp, loops, kernels)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                yield from iter_eqns(sub)


def float_outputs_of_shape(closed_jaxpr, shapes, skip=("stop_gradient",)):
    """(primitive, shape) of every float intermediate with a shape in `shapes`."""
    hits = []
    for eqn in iter_eqns(closed_jaxpr.jaxpr):
        if eqn.primitive.name in skip:
            continue
        for v in eqn.outvars:
            aval = v.aval
            if (getattr(aval, "shape", None) in shapes
                    and jnp.issubdtype(aval.dtype, jnp.floating)):
                hits.append((eqn.primitive.name, aval.shape))
    return hits


def pallas_calls(closed_jaxpr):
    return [e for e in iter_eqns(closed_jaxpr.jaxpr) if e.primitive.name == "pallas_call"]


def value_and_vjp(fn, args, argnums, ct):
    """(fn(*args), grads of Σ fn(*args)·ct w.r.t. args[argnums]) in one jitted call.

    One compilation per check keeps the interpret-mode tests fast.
    """
    def both(*args):
        return fn(*args), jax.grad(linear_loss(fn, ct), argnums=argnums)(*args)

    return jax.jit(both)(*args)


def assert_matches(kernel_fn, reference_fn, args, argnums, ct):
    """Kernel and reference agree on the forward and on every requested gradient; returns the
    kernel's (value, grads) for further oracles."""
    y, grads = value_and_vjp(kernel_fn, args, argnums, ct)
    y_ref, grads_ref = value_and_vjp(reference_fn, args, argnums, ct)
    assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)
    return y, grads
