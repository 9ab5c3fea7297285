"""The projected-optimizer combinator (family I, `jpeft.optim`) behind `galore`, `dct_adamw`,
`natural_galore` and `owlore`.

For every leaf the plan decides, from static shapes only, whether it is *projected* (seen as a
matrix `G ∈ R^{m×n}` through a `MatrixView`, with a `Projector`) or *falls through* to the inner
optimizer unchanged. A projected leaf's step:

    G ← G + E                                  (error feedback, optional)
    if count % update_proj_gap == 0:           (`lax.cond`: one program, refreshes never recompile)
        basis ← fit(G); moments ← keep | reset | rotate(old basis → new basis)
    g = down(G, basis)
    E ← G − up(g)                              (error feedback, optional)
    g ← precondition(g, history)               (Natural GaLore, optional)
    u, inner_state = inner.update(g, inner_state)
    U = scale · up(u, basis)

Every leaf has its own `LeafState` (its own step count and inner-optimizer state), so moments can be
reset, rotated or frozen leaf by leaf (OwLore's layer sampling; such state surgery is always explicit).
The consequence: the inner transformation sees one leaf at a time; put cross-leaf transforms such as
`optax.clip_by_global_norm` *before* the projected transform in an `optax.chain`, not inside `inner`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.tree_util import DictKey, GetAttrKey

from jpeft.optim.projector import MatrixView, Projector, apply_rotation
from jpeft.paths import path_str

MOMENT_POLICIES = ("keep", "reset", "rotate")
#: State fields treated as second moments by `moment_policy="rotate"` (rotated, then `abs`, as in
#: DCT-AdamW's reference); every other floating leaf of the low-rank shape is rotated linearly.
SECOND_MOMENT_NAMES = ("nu",)


class LeafState(NamedTuple):
    """Optimizer state of one leaf.

    count:   steps this leaf has taken (OwLore: only while its layer is active).
    basis:   projector state (`SVDBasis`, `DCTBasis`), or None for a fall-through leaf.
    inner:   the inner optimizer's state, on the low-rank shape for a projected leaf.
    history: preconditioner state (Natural GaLore's gradient window), or None.
    error:   error-feedback buffer `(m, n)`, or None.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states' `count` does
    basis: Any
    inner: Any
    history: Any = None
    error: Any = None


class ProjectedState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states' `count` does
    leaves: dict[str, LeafState]  # keyed by the `/`-joined path of the leaf


class Preconditioner(Protocol):
    """A stage between `down` and the inner optimizer (Natural GaLore)."""

    def init(self, low_shape: tuple[int, int], dtype) -> Any: ...

    def apply(self, g: jax.Array, history: Any, count: jax.Array) -> tuple[jax.Array, Any]: ...

    def on_refresh(self, history: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    view: MatrixView | None = None
    projector: Projector | None = None

    @property
    def projected(self) -> bool:
        return self.projector is not None

    def parts(self) -> tuple[MatrixView, Projector]:
        """`(view, projector)` of a projected leaf."""
        if self.view is None or self.projector is None:
            raise ValueError("a leaf plan without a matrix view and a projector is not projected")
        return self.view, self.projector


ViewsArg = None | MatrixView | Callable[[str, Any], "MatrixView | None"]
IncludeArg = None | str | Callable[[str, Any], bool]


def paths_and_leaves(tree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(kp) for kp, _ in flat]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"leaf paths must be unique to key the optimizer state; duplicated: {dup[:5]}")
    return paths, [leaf for _, leaf in flat], treedef


def _is_second_moment(keypath) -> bool:
    for k in keypath:
        name = k.name if isinstance(k, GetAttrKey) else k.key if isinstance(k, DictKey) else None
        if name in SECOND_MOMENT_NAMES:
            return True
    return False


def rotate_moments(inner_state: Any, rot, low_shape: tuple[int, ...]) -> Any:
    """Carry an inner state to a new basis: every floating leaf of shape `low_shape` becomes
    `R_left @ x @ R_right`; second moments (fields named `nu`) then take `abs` (DCT-AdamW's
    `rotate_subspace`: `v ← |v R|`). Counters and other leaves are unchanged."""

    def f(keypath, x):
        if not (hasattr(x, "shape") and tuple(x.shape) == tuple(low_shape)
                and jnp.issubdtype(x.dtype, jnp.floating)):
            return x
        y = apply_rotation(x, rot)
        return (jnp.abs(y) if _is_second_moment(keypath) else y).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(f, inner_state)


@dataclasses.dataclass(frozen=True, eq=False)
class Projected:
    """Configuration of a projected optimizer; `.transform()` gives the optax transformation.

    make_projector:  `(m, n) -> Projector | None` for a leaf seen as an `m×n` matrix.
    inner:           any optax transformation, run per leaf on the low-rank gradient (and on the
                     full gradient of fall-through leaves, with the leaf's params).
    views:           None (2-D leaves are matrices, others fall through), one `MatrixView` for every
                     leaf it fits, or `(path, leaf) -> MatrixView | None`.
    include:         None (every matrix leaf), a regex `fullmatch`ed against the leaf path, or
                     `(path, leaf) -> bool`; excluded leaves fall through.
    max_dim:         matrices with a dimension ≥ max_dim fall through (DCT-AdamW's embeddings / head).
    """

    make_projector: Callable[[int, int], Projector | None]
    inner: optax.GradientTransformation
    update_proj_gap: int = 200
    scale: float = 1.0
    moment_policy: str = "keep"
    views: ViewsArg = None
    include: IncludeArg = None
    max_dim: int | None = None
    preconditioner: Preconditioner | None = None
    error_feedback: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.moment_policy not in MOMENT_POLICIES:
            raise ValueError(f"moment_policy must be one of {MOMENT_POLICIES}, got {self.moment_policy!r}")
        if not (isinstance(self.update_proj_gap, int) and self.update_proj_gap >= 1):
            raise ValueError(f"update_proj_gap must be a positive int, got {self.update_proj_gap!r}")

    # ------------------------------------------------------------------ planning (static)
    def _view(self, path: str, leaf) -> MatrixView | None:
        shape = tuple(leaf.shape)
        if callable(self.views) and not isinstance(self.views, MatrixView):
            return self.views(path, leaf)
        if isinstance(self.views, MatrixView) and self.views.fits(shape):
            return self.views
        return MatrixView() if len(shape) == 2 else None

    def _included(self, path: str, leaf) -> bool:
        if self.include is None:
            return True
        if isinstance(self.include, str):
            return re.fullmatch(self.include, path) is not None
        return bool(self.include(path, leaf))

    def leaf_plan(self, path: str, leaf) -> LeafPlan:
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or not self._included(path, leaf):
            return LeafPlan()
        view = self._view(path, leaf)
        if view is None:
            return LeafPlan()
        m, n = view.matrix_shape(tuple(leaf.shape))
        if self.max_dim is not None and max(m, n) >= self.max_dim:
            return LeafPlan()
        projector = self.make_projector(m, n)
        return LeafPlan(view, projector) if projector is not None else LeafPlan()

    def plan(self, params) -> dict[str, LeafPlan]:
        """`{path: LeafPlan}` for every leaf of `params` (arrays or `jax.ShapeDtypeStruct`s)."""
        paths, leaves, _ = paths_and_leaves(params)
        return {p: self.leaf_plan(p, x) for p, x in zip(paths, leaves)}

    # ------------------------------------------------------------------ init
    def init_leaf(self, plan: LeafPlan, leaf) -> LeafState:
        count = jnp.zeros([], jnp.int32)
        if not plan.projected:
            return LeafState(count, None, self.inner.init(leaf))
        view, projector = plan.parts()
        m, n = view.matrix_shape(tuple(leaf.shape))
        low = projector.low_shape(m, n)
        return LeafState(
            count=count,
            basis=projector.init(m, n, leaf.dtype),
            inner=self.inner.init(jnp.zeros(low, leaf.dtype)),
            history=self.preconditioner.init(low, leaf.dtype) if self.preconditioner else None,
            error=jnp.zeros((m, n), leaf.dtype) if self.error_feedback else None,
        )

    def init(self, params) -> ProjectedState:
        paths, leaves, _ = paths_and_leaves(params)
        states = {p: self.init_leaf(self.leaf_plan(p, x), x) for p, x in zip(paths, leaves)}
        return ProjectedState(count=jnp.zeros([], jnp.int32), leaves=states)

    # ------------------------------------------------------------------ update
    def leaf_key(self, index: int, count: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), index), count)

    def update_leaf(self, plan: LeafPlan, index: int, g, ls: LeafState, param):
        """One leaf's step: `(update, new LeafState)`."""
        count = optax.safe_int32_increment(ls.count)
        if not plan.projected:
            u, inner = self.inner.update(g, ls.inner, param)
            return u, ls._replace(count=count, inner=inner)

        view, proj = plan.parts()
        mat = view.to_matrix(g)
        m, n = mat.shape
        low_shape = proj.low_shape(m, n)
        if ls.error is not None:
            mat = mat + ls.error
        key = self.leaf_key(index, ls.count)

        def refit(_):
            basis, low = proj.fit_down(mat, key)
            basis = jax.tree.map(lambda new, old: new.astype(old.dtype), basis, ls.basis)
            inner = ls.inner
            if self.moment_policy == "reset":
                inner = self.inner.init(jnp.zeros(low_shape, g.dtype))
            elif self.moment_policy == "rotate":
                inner = rotate_moments(inner, proj.rotation(ls.basis, basis), low_shape)
            history = self.preconditioner.on_refresh(ls.history) if self.preconditioner else ls.history
            return basis, low.astype(mat.dtype), inner, history

        def keep(_):
            return ls.basis, proj.down(mat, ls.basis).astype(mat.dtype), ls.inner, ls.history

        refresh = (ls.count % self.update_proj_gap) == 0
        basis, low, inner, history = lax.cond(refresh, refit, keep, None)
        error = ls.error
        if error is not None:
            error = (mat - proj.up(low, basis, (m, n))).astype(ls.error.dtype)
        if self.preconditioner is not None:
            low, history = self.preconditioner.apply(low, history, ls.count)
        u, inner = self.inner.update(low, inner, None)
        full = self.scale * view.from_matrix(proj.up(u, basis, (m, n)), g.shape)
        return full.astype(g.dtype), LeafState(count, basis, inner, history, error)

    def update(self, updates, state: ProjectedState, params=None, active: dict[str, Any] | None = None):
        """`active`: optional `{path: bool scalar}`; an inactive leaf gets a zero update and keeps its
        state unchanged (its count does not advance). Leaves not named are active."""
        paths, grads, treedef = paths_and_leaves(updates)
        params_flat = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        out, new_states = [], {}
        for index, (path, g, p) in enumerate(zip(paths, grads, params_flat)):
            plan = self.leaf_plan(path, g)
            ls = state.leaves[path]
            step = lambda g, ls, p, plan=plan, index=index: self.update_leaf(plan, index, g, ls, p)  # noqa: E731
            if active is None or path not in active:
                u, ls = step(g, ls, p)
            else:
                u, ls = lax.cond(active[path], step, lambda g, ls, p: (jnp.zeros_like(g), ls), g, ls, p)
            out.append(u)
            new_states[path] = ls
        new = ProjectedState(count=optax.safe_int32_increment(state.count), leaves=new_states)
        return jax.tree_util.tree_unflatten(treedef, out), new

    def transform(self) -> optax.GradientTransformation:
        return optax.GradientTransformation(self.init, lambda u, s, p=None: self.update(u, s, p))
