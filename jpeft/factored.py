"""The factored execution path (docs/design.md §2, docs/any_model.md), for Flax Linen, NNX and custom layers.

`jpeft.factored(model.apply, spec)` returns a function with `model.apply`'s signature that takes
the *adapted* tree. Wherever the model multiplies an adapted kernel, the method's factored form
runs (`x@K + s·(x@a)@b` for LoRA: neither `ΔK` nor `K'` is built); every other use of an adapted
leaf gets the materialised weight.

The mechanism (op-level, over public functions only: no custom tracers, no JAX internals) is
`jpeft.intercept`.

- Which kernels run factored is found by one abstract probe trace first (`_probe`). A kernel no
  intercepted op consumes (a bare `x @ kernel`, an `astype`) or that is also used elsewhere (a
  regulariser on the weight) gets the materialised weight, with a one-time warning naming it.

`jpeft.infer_views(model.apply, variables, *args)` uses the same interception to read each
kernel's view off the ops that multiply it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.core import unfreeze

from jpeft.adapter import Adapter, is_adapter
from jpeft.core import check_fits, materialise_leaf
from jpeft.execution import using_impl
from jpeft.inspect import output_sources
from jpeft.intercept import (
    STATE,
    SUFFIX,
    Kernel,
    attend_factored,
    bind_nnx_ops,
    intercepting,
    lookup_kernel,
    register_kernel,
)
from jpeft.paths import leaf_key, leaves_with_paths, path_str
from jpeft.quant import dequantize, is_quantized, placeholder
from jpeft.shared import SHARED, attach_shared
from jpeft.spec import Spec
from jpeft.views import View


# ============================================================================ Linen
def _linen_register(next_fun, args, kwargs, context):
    """Register the adapted kernels of the module that is about to run (inside `nn.scan` these
    are the sliced arrays)."""
    module = context.module
    scope_params = module.variables.get("params", {}) if module.scope is not None else {}
    for name, value in scope_params.items():
        if isinstance(name, str) and name.endswith(SUFFIX) and isinstance(value, (Adapter, Kernel)):
            base_name = name[: -len(SUFFIX)]
            array = scope_params.get(base_name)
            if array is None:
                continue
            if isinstance(value, Adapter):
                outer = STATE.meta["/".join((*module.path, base_name))]
                node = value if is_quantized(value.base) else value.replace(base=array)
                register_kernel(array, dataclasses.replace(outer, node=node))
    if context.method_name == "attend" and isinstance(module, nn.Embed):
        embedding = scope_params.get("embedding")
        kernel = lookup_kernel(embedding)
        if kernel is not None and not STATE.infer:
            query, emb = module.promote_dtype(args[0], embedding, dtype=module.dtype)
            y = attend_factored(lookup_kernel(emb) or kernel, emb, query)
            if y is not None:
                return y
    return next_fun(*args, **kwargs)


def _has_factored_form(node: Adapter) -> bool:
    return any(node.method.overrides(f) for f in ("matmul", "matmul_t", "lookup", "conv"))


def _candidates(pairs) -> dict[str, Adapter]:
    """Adapter nodes that may run factored: the method has a factored form; shared state (lent to
    every node) is not batched, so a stacked node with shared state is materialised instead."""
    out = {}
    for path, leaf in pairs:
        if isinstance(leaf, Adapter) and _has_factored_form(leaf):
            shared = SHARED in leaf.train or SHARED in leaf.frozen
            if not (shared and leaf.view is not None and leaf.view.batch):
                out[path] = leaf
    return out


def _with_siblings(params, factored_nodes: dict[str, Adapter], materialised: dict[str, Any]):
    """The params tree the Linen model sees: each factored kernel holds its base, with its node
    (without the base) beside it under `<name><SUFFIX>`; materialised kernels hold `K'`."""
    def walk(tree, prefix):
        if isinstance(tree, Adapter) or not isinstance(tree, dict):
            return tree
        out = {}
        for k, v in tree.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if path in factored_nodes:
                node = factored_nodes[path]   # with its shared state lent
                if is_quantized(node.base):   # the model multiplies a stand-in; the node keeps the codes
                    out[k] = placeholder(node.base)
                    out[f"{k}{SUFFIX}"] = node
                else:
                    out[k] = node.base
                    out[f"{k}{SUFFIX}"] = node.replace(base=None)
            elif path in materialised:
                out[k] = materialised[path]
            else:
                out[k] = walk(v, path)
        return out

    return walk(params, "")




def _probe(call, cand, nodes, rng):
    """One abstract pass (`jax.make_jaxpr`, trace time only) over the model with the candidates'
    bases as inputs. A candidate runs factored when an intercepted op consumed it and nothing else
    used it: factored ops compute with zeros in this pass (`compute_base`), so an output that
    still depends on a base (`jpeft.inspect.output_sources`) reveals another use (a bare
    `x @ kernel`, a regulariser on the weight, ...), which must see `K'`. The rest get the
    materialised weight, with a warning unless their method declined (it has no factored form for
    its config)."""
    paths = sorted(cand)
    seen: list = []
    mat = {p: n for p, n in nodes.items() if p not in cand}

    def probe(bases):
        fact = {p: cand[p].replace(base=b) for p, b in zip(paths, bases)}
        out, used = call(fact, {p: materialise_leaf(p, n, rng) for p, n in mat.items()}, probing=True)
        seen.append(used)
        return out

    def source(path, leaf):
        head, _, rest = path.partition("/")
        return int(rest.split("/")[0]) if head == "0" and rest else None

    other_mask = output_sources(probe, ([cand[p].base for p in paths],), source)
    consumed, declined = seen[0]
    other = {p for i, p in enumerate(paths) if other_mask >> i & 1}
    fact = {p: n for p, n in cand.items() if p in consumed and p not in declined and p not in other}
    mixed = other & consumed
    _warn_fallback(set(cand) - set(fact) - declined - mixed)
    _warn_fallback(mixed, "is also used outside a factorable op (so it must see K')")
    return fact


_WARNED: set[str] = set()


def _warn_fallback(paths, why: str | None = None):
    new = sorted(set(paths) - _WARNED)
    if new:
        _WARNED.update(new)
        why = why or ("is multiplied by no factorable op (e.g. a bare `x @ kernel`, an `astype`, or a layer "
                      "that transposes its kernel)")
        warnings.warn(f"jpeft.factored: {new[:8]} {why}; they use the materialised weight", stacklevel=3)


def factored(apply_fn: Callable, spec: Spec, *, rng: jax.Array | None = None, impl: str = "auto") -> Callable:
    """Wrap a Linen `model.apply` so that it takes the adapted tree and runs every adapted kernel
    it multiplies factored (see the module docstring). `rng` enables adapter dropout. `impl`
    selects the fused kernels (`jpeft.execution`: "auto" | "kernel" | "reference")."""

    def run(variables, *args, **kwargs):
        with using_impl(impl):
            return _run_linen(variables, *args, **kwargs)

    def _run_linen(variables, *args, **kwargs):
        variables = unfreeze(variables)
        check_fits(variables["params"], spec)
        params = dequantize(variables["params"], bases=False)  # quantised leaves no spec targets
        pairs = leaves_with_paths(params, is_leaf=is_adapter)
        lent = attach_shared([leaf for _, leaf in pairs])
        pairs = [(p, leaf) for (p, _), leaf in zip(pairs, lent)]
        nodes = {p: n for p, n in pairs if isinstance(n, Adapter)}
        shapes = {p: tuple(n.base.shape) for p, n in nodes.items() if n.base is not None}
        cand = {p: n for p, n in _candidates(pairs).items() if p in shapes}
        keyed = lambda p: None if rng is None else leaf_key(rng, p)  # noqa: E731

        def call(fact, mat, probing=False):
            tree = _with_siblings(params, fact, mat)
            with intercepting({}, probing=probing) as state:
                state.meta = {p: Kernel(p, None, shapes[p], keyed(p)) for p in fact}
                with nn.intercept_methods(_linen_register):
                    out = apply_fn({**variables, "params": tree}, *args, **kwargs)
                return out, (set(state.consumed), set(state.declined))

        fact = _probe(call, cand, nodes, rng)
        mat = {p: materialise_leaf(p, n, rng) for p, n in nodes.items() if p not in fact}
        return call(fact, mat)[0]

    return run


# ============================================================================ NNX
def factored_nnx(graphdef: Any, spec: Spec, *, rng: jax.Array | None = None, impl: str = "auto") -> Callable:
    """`fn(adapted_state, *args, **kwargs)`: the NNX module of `graphdef` called on the adapted
    state, with every adapted kernel it multiplies factored (`impl` as in `factored`)."""

    def run(state, *args, **kwargs):
        with using_impl(impl):
            return _run_nnx(state, *args, **kwargs)

    def _run_nnx(state, *args, **kwargs):
        check_fits(state, spec)
        state = dequantize(state, bases=False)  # quantised leaves no spec targets
        pairs = leaves_with_paths(state, is_leaf=is_adapter)
        lent = attach_shared([leaf for _, leaf in pairs])
        pairs = [(p, leaf) for (p, _), leaf in zip(pairs, lent)]
        nodes = {p: n for p, n in pairs if isinstance(n, Adapter)}
        cand = {p: n for p, n in _candidates(pairs).items() if n.base is not None}
        keyed = lambda p: None if rng is None else leaf_key(rng, p)  # noqa: E731
        treedef = jax.tree_util.tree_structure(state, is_leaf=is_adapter)

        def call(fact, mat, probing=False):
            seen = {p: placeholder(n.base) if is_quantized(n.base) else n.base for p, n in fact.items()}
            leaves = [(seen[p] if p in fact else mat[p] if p in mat else leaf) for p, leaf in pairs]
            model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
            kernels = {id(seen[p]): (seen[p], Kernel(p, n, tuple(n.base.shape), keyed(p))) for p, n in fact.items()}
            with intercepting(kernels, probing=probing) as st:
                bind_nnx_ops(model)
                out = model(*args, **kwargs)
                return out, (set(st.consumed), set(st.declined))

        fact = _probe(call, cand, nodes, rng)
        mat = {p: materialise_leaf(p, n, rng) for p, n in nodes.items() if p not in fact}
        return call(fact, mat)[0]

    return run


# ============================================================================ infer_views
def infer_views(apply_fn: Callable, variables: Any, *args, paths: str | None = None, **kwargs) -> dict[str, View]:
    """`{escaped path: View}` for the kernels the model multiplies, read off its ops by one
    abstract trace of `apply_fn(variables, *args, **kwargs)`: a Linen `model.apply` and its
    variables, or for NNX the `graphdef` and state of `nnx.split(model)`. Only kernels that are not
    plain `(in, out)` matrices are listed; `paths` (a regex) restricts the search. Pass the result
    as `jpeft.Spec(rules, views=...)`."""
    variables = unfreeze(variables) if isinstance(variables, dict) else variables
    params = variables["params"] if isinstance(variables, dict) and "params" in variables else variables
    rx = re.compile(paths) if paths is not None else None
    found: dict[str, View] = {}

    def trace(variables):
        pairs = leaves_with_paths(params)
        kernels, full = {}, {}
        for p, leaf in pairs:
            if np.ndim(leaf) >= 2 and (rx is None or rx.fullmatch(p)):
                full[p] = tuple(np.shape(leaf))

        def register_linen(next_fun, a, kw, context):
            module = context.module
            scope_params = module.variables.get("params", {}) if module.scope is not None else {}
            for name, value in scope_params.items():
                p = "/".join((*module.path, str(name)))
                if p in full and hasattr(value, "shape"):
                    register_kernel(value, Kernel(p, None, full[p]))
            return next_fun(*a, **kw)

        with intercepting(kernels, infer=True) as st:
            if isinstance(variables, dict) and "params" in variables:
                with nn.intercept_methods(register_linen):
                    apply_fn(variables, *args, **kwargs)
            else:
                flat = jax.tree_util.tree_flatten_with_path(variables)[0]
                for (kp, leaf) in flat:
                    p = path_str(kp)
                    if p in full:
                        register_kernel(leaf, Kernel(p, None, full[p]))
                if isinstance(apply_fn, nnx.GraphDef):
                    model = nnx.merge(apply_fn, variables)
                    bind_nnx_ops(model)
                    model(*args, **kwargs)
                else:
                    apply_fn(variables, *args, **kwargs)
            found.update(st.views)
        return 0

    jax.eval_shape(trace, variables)
    return {re.escape(p): v for p, v in sorted(found.items()) if not v.is_plain}
