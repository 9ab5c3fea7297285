"""The factored execution path (DESIGN.md §2), for Flax Linen and NNX.

`jpeft.factored(model.apply, spec)` returns a function with `model.apply`'s signature that takes
the *adapted* tree. Every `nn.Dense` whose kernel is an adapter computes `method.matmul(node, x)`
(`x@K + s·(x@a)@b` for LoRA: `ΔK` and `K'` are never built). Any other use of an adapted leaf —
another layer type, a module reading its param directly — gets the materialised weight.

Which adapted leaves the Dense layers own is found by tracing the model once abstractly
(`jax.eval_shape`); it costs trace time only.

`jpeft.factored_nnx(graphdef, spec)` is the NNX equivalent: it rebuilds the module from the adapted
state, swaps every `nnx.Linear` whose kernel is an adapter for a factored stand-in, and gives every
other adapted `Param` its materialised weight.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from flax.core import unfreeze

from jpeft.adapter import Adapter, is_adapter
from jpeft.core import _materialise, check_fits, merge
from jpeft.hooks import leaf_key
from jpeft.paths import leaves_with_paths
from jpeft.shared import attach_shared
from jpeft.spec import Spec


def _dense_kernel(module: nn.Module) -> Any:
    if not isinstance(module, nn.Dense) or not module.has_variable("params", "kernel"):
        return None
    return module.get_variable("params", "kernel")


def _dense_factored(module: nn.Dense, node: Adapter, x: jax.Array, rng) -> jax.Array:
    """`nn.Dense.__call__` with an adapter kernel: dtype promotion, factored matmul, bias."""
    x = jnp.asarray(x, module.dtype or jnp.result_type(x, node.base if node.base is not None else x))
    y = node.method.matmul(node, x, rng)
    if y is None:
        y = _materialised_matmul(node, x, rng)
    if module.use_bias:
        y = y + jnp.asarray(module.get_variable("params", "bias"), y.dtype)
    return y


@jax.checkpoint
def _materialised_matmul(node: Adapter, x: jax.Array, rng) -> jax.Array:
    """`x @ K'` for a method without a factored form; `K'` is recomputed in the backward pass."""
    return x @ _materialise(node, rng).astype(x.dtype)


def _owned_paths(apply_fn, variables, args, kwargs) -> set[str]:
    """Paths (relative to `params`) of the kernels of the `nn.Dense` layers the model calls."""
    owned: set[str] = set()

    def record(next_fun, a, kw, context):
        if context.method_name == "__call__" and _dense_kernel(context.module) is not None:
            owned.add("/".join((*context.module.path, "kernel")))
        return next_fun(*a, **kw)

    def trace(variables):
        with nn.intercept_methods(record):
            return apply_fn(variables, *args, **kwargs)

    jax.eval_shape(trace, variables)
    return owned


def factored(apply_fn: Callable, spec: Spec, *, rng: jax.Array | None = None) -> Callable:
    """Wrap `model.apply` so that it takes the adapted tree and runs LoRA-style layers factored.

    `rng` enables adapter dropout (per token in factored layers).
    """

    def run(variables, *args, **kwargs):
        variables = unfreeze(variables)
        params = variables["params"]
        check_fits(params, spec)
        owned = _owned_paths(apply_fn, {**variables, "params": merge(params, spec)}, args, kwargs)
        pairs = leaves_with_paths(params, is_leaf=is_adapter)
        lent = attach_shared([leaf for _, leaf in pairs])
        leaves = [leaf if not isinstance(leaf, Adapter) or path in owned
                  else _materialise(leaf, None if rng is None else leaf_key(rng, path))
                  for (path, _), leaf in zip(pairs, lent)]
        mixed = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_adapter), leaves)

        def intercept(next_fun, a, kw, context):
            node = _dense_kernel(context.module) if context.method_name == "__call__" else None
            if not isinstance(node, Adapter):
                return next_fun(*a, **kw)
            path = "/".join((*context.module.path, "kernel"))
            return _dense_factored(context.module, node, a[0], None if rng is None else leaf_key(rng, path))

        with nn.intercept_methods(intercept):
            return apply_fn({**variables, "params": mixed}, *args, **kwargs)

    return run


class _FactoredLinear(nnx.Module):
    """Stands in for an `nnx.Linear` whose kernel is an adapter (same call, factored matmul)."""

    def __init__(self, linear: nnx.Linear, rng):
        self.node = nnx.data(linear.kernel.get_value())
        self.bias = linear.bias
        self.dtype = linear.dtype
        self.rng = nnx.data(rng)

    def __call__(self, x):
        x = jnp.asarray(x, self.dtype or jnp.result_type(x, self.node.base if self.node.base is not None else x))
        y = self.node.method.matmul(self.node, x, self.rng)
        if y is None:
            y = _materialised_matmul(self.node, x, self.rng)
        return y if self.bias is None else y + jnp.asarray(self.bias[...], y.dtype)


def factored_nnx(graphdef: Any, spec: Spec, *, rng: jax.Array | None = None) -> Callable:
    """`fn(adapted_state, *args, **kwargs)`: the NNX module of `graphdef` called on the adapted
    state, with its adapted `nnx.Linear` layers factored."""

    def run(state, *args, **kwargs):
        check_fits(state, spec)
        pairs = leaves_with_paths(state, is_leaf=is_adapter)
        linears = {"/".join(map(str, path)) + "/kernel": (path, module)
                   for path, module in nnx.iter_modules(nnx.merge(graphdef, jax.eval_shape(lambda: merge(state, spec))))
                   if isinstance(module, nnx.Linear)}
        lent = attach_shared([leaf for _, leaf in pairs])
        leaves = [leaf if not isinstance(leaf, Adapter) or path in linears
                  else _materialise(leaf, None if rng is None else leaf_key(rng, path))
                  for (path, _), leaf in zip(pairs, lent)]
        mixed = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state, is_leaf=is_adapter), leaves)
        model = nnx.merge(graphdef, mixed)
        for path, module in list(nnx.iter_modules(model)):
            kernel_path = "/".join(map(str, path)) + "/kernel"
            if isinstance(module, nnx.Linear) and isinstance(module.kernel.get_value(), Adapter):
                parent = model
                for key in path[:-1]:
                    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
                stand_in = _FactoredLinear(module, None if rng is None else leaf_key(rng, kernel_path))
                if isinstance(path[-1], int):
                    parent[path[-1]] = stand_in
                else:
                    setattr(parent, path[-1], stand_in)
        return model(*args, **kwargs)

    return run
