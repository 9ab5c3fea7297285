"""`jpeft.inspect`: find dense deltas in a training step (a jaxpr walker).

`big_dependents(fn, args, taint, min_size)` traces `fn(*args)` with `jax.make_jaxpr`, marks the
inputs `taint(path, leaf)` selects (e.g. an adapter's trainable leaves), propagates through every
equation (into `pjit`, `custom_jvp`/`custom_vjp`, `remat`, `scan`, `while` and `cond` bodies), keeps
only values that reach an output (dead code removed), and returns the live tainted values with at
least `min_size` elements, as `(primitive, shape)` pairs. An empty list means no kernel-sized value
depends on the adapters. `shapes=` (a set of shapes) instead flags the live tainted values whose
dimensions, as a multiset, equal one of them: for workloads whose activations outnumber a
kernel's elements (`kernel_shapes(tree)` gives an adapted tree's kernel and slice shapes).
"""

from __future__ import annotations

import functools
import math
import operator

import jax
from jax.extend import core as jcore

from jpeft.adapter import Adapter
from jpeft.paths import path_str
from jpeft.views import PLAIN

_CALLS = {"pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
          "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "custom_lin": None}


def _open(j):
    return j.jaxpr if hasattr(j, "jaxpr") and not isinstance(j, jcore.Jaxpr) else j


def _size(v):
    aval = getattr(v, "aval", None)
    shape = getattr(aval, "shape", None)
    return (math.prod(shape), tuple(shape)) if shape is not None else (0, ())


class _Walk:
    def __init__(self, min_size, shapes=None):
        self.min_size = min_size
        self.shapes = None if shapes is None else {tuple(sorted(s)) for s in shapes}
        self.found = []

    def flagged(self, size, shape):
        if self.shapes is not None:
            return tuple(sorted(shape)) in self.shapes
        return size >= self.min_size

    def run(self, jaxpr, tainted_in: list[int], live_out: list[bool]) -> list[int]:
        """Taint of `jaxpr`'s outputs given its inputs' (bit masks: bit i = depends on source i;
        booleans work as one source); records big live tainted values (with `live_out` saying
        which outputs are used)."""
        jaxpr = _open(jaxpr)
        taint = {v: t for v, t in zip(jaxpr.invars, tainted_in)}
        for v in jaxpr.constvars:
            taint[v] = 0
        is_t = lambda a: taint.get(a, 0) if isinstance(a, jcore.Var) else 0  # noqa: E731
        eq_out = []
        for eqn in jaxpr.eqns:
            ins = [is_t(a) for a in eqn.invars]
            outs = self._eqn(eqn, ins, None)
            for v, t in zip(eqn.outvars, outs):
                taint[v] = t
            eq_out.append(outs)
        # liveness (backwards)
        live = {v for v, used in zip(jaxpr.outvars, live_out) if used and isinstance(v, jcore.Var)}
        for eqn, outs in reversed(list(zip(jaxpr.eqns, eq_out))):
            used = [v in live for v in eqn.outvars]
            if any(used) or eqn.effects:
                for v, t in zip(eqn.outvars, outs):
                    if t and v in live:
                        size, shape = _size(v)
                        if self.flagged(size, shape):
                            self.found.append((eqn.primitive.name, shape))
                self._eqn(eqn, [is_t(a) for a in eqn.invars], used)
                live.update(a for a in eqn.invars if isinstance(a, jcore.Var))
        return [is_t(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins, used):
        """Output taints of one equation; when `used` is given, walk its bodies for records."""
        name, p = eqn.primitive.name, eqn.params
        record = used is not None
        sub = None
        if name in _CALLS:
            sub = p.get(_CALLS[name]) if _CALLS[name] else None
            if sub is None:
                sub = next((v for v in p.values() if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))), None)
        if sub is not None:
            n = len(_open(sub).invars)
            walker = self if record else _Walk(float("inf"))
            return walker.run(sub, ins[-n:] if len(ins) >= n else ins + [0] * (n - len(ins)),
                              used if record else [True] * len(eqn.outvars))
        if name == "scan":
            nc, ncarry = p["num_consts"], p["num_carry"]
            body = p["jaxpr"]
            carry = ins[nc:nc + ncarry]
            for _ in range(len(carry) + 1):
                outs = _Walk(float("inf")).run(body, ins[:nc] + carry + ins[nc + ncarry:], [True] * len(eqn.outvars))
                new = [a | b for a, b in zip(carry, outs[:ncarry])]
                if new == carry:
                    break
                carry = new
            if record:
                self.run(body, ins[:nc] + carry + ins[nc + ncarry:], [True] * len(eqn.outvars))
            return carry + outs[ncarry:]
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            carry = ins[cn + bn:]
            for _ in range(len(carry) + 1):
                outs = _Walk(float("inf")).run(p["body_jaxpr"], ins[cn:cn + bn] + carry, [True] * len(carry))
                new = [a | b for a, b in zip(carry, outs)]
                if new == carry:
                    break
                carry = new
            if record:
                self.run(p["body_jaxpr"], ins[cn:cn + bn] + carry, [True] * len(carry))
            return carry
        if name == "cond":
            outs = [0] * len(eqn.outvars)
            for br in p["branches"]:
                walker = self if record else _Walk(float("inf"))
                bo = walker.run(br, ins[1:], used if record else [True] * len(eqn.outvars))
                outs = [a | b | ins[0] for a, b in zip(outs, bo)]
            return outs
        nested = [v for v in p.values() if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        if len(nested) == 1 and len(_open(nested[0]).invars) == len(ins) \
                and len(_open(nested[0]).outvars) == len(eqn.outvars):
            # an unlisted call-like primitive (one body, inputs and outputs one to one)
            walker = self if record else _Walk(float("inf"))
            return walker.run(nested[0], ins, used if record else [True] * len(eqn.outvars))
        # a first-order primitive, or an unknown higher-order one (conservative): every output
        # depends on every input
        return [functools.reduce(operator.or_, ins, 0)] * len(eqn.outvars)


def kernel_shapes(tree) -> set[tuple[int, ...]]:
    """The shapes a dense delta of an adapted tree would have: each adapted kernel's own shape,
    its matrix view `(in, out)` and, for a stack, one slice of it."""
    out = set()
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Adapter)):
        if isinstance(leaf, Adapter) and leaf.base is not None:
            shape = tuple(leaf.base.shape)
            view = leaf.view or PLAIN
            out |= {shape, view.matrix_shape(shape), shape[len(view.batch):]}
    return out


def big_dependents(fn, args, taint, min_size=None, *, shapes=None):
    """See the module docstring. `taint(path, leaf) -> bool` over the flattened `args`."""
    closed = jax.make_jaxpr(fn)(*args)
    flat = jax.tree_util.tree_flatten_with_path(args)[0]
    marks = [bool(taint(path_str(kp), leaf)) for kp, leaf in flat]
    walker = _Walk(float("inf") if min_size is None else min_size, shapes)
    walker.run(closed.jaxpr, marks, [True] * len(closed.jaxpr.outvars))
    return walker.found


def output_sources(fn, args, source) -> int:
    """Which sources the outputs of `fn(*args)` depend on, as a bit mask: `source(path, leaf)`
    gives each flattened argument's source number (or None); bit k of the result is set when some
    output depends on an argument of source k."""
    closed = jax.make_jaxpr(fn)(*args)
    flat = jax.tree_util.tree_flatten_with_path(args)[0]
    marks = []
    for kp, leaf in flat:
        k = source(path_str(kp), leaf)
        marks.append(0 if k is None else 1 << k)
    outs = _Walk(float("inf")).run(closed.jaxpr, marks, [True] * len(closed.jaxpr.outvars))
    return functools.reduce(operator.or_, outs, 0)
