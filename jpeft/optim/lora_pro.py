"""LoRA-Pro — LoRA gradients adjusted towards the full gradient (Wang et al., ICLR 2025).

For an adapter pair the LoRA update is equivalent to a full-weight step along the low-rank
"equivalent gradient" `g̃ = s(B g_A + g_B A)` (paper layout, `W ∈ R^{m×n}`, `A ∈ R^{r×n}`,
`B ∈ R^{m×r}`). LoRA-Pro replaces `(g_A, g_B)` by the pair whose `g̃` is Frobenius-closest to the full
gradient `G`; with `g_A^lora = s BᵀG`, `g_B^lora = s G Aᵀ`:

    g_A = (1/s²)(BᵀB)⁻¹ g_A^lora + X A
    g_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B^lora (AAᵀ)⁻¹ − B X
    (BᵀB) X + X (AAᵀ) = −(1/s²)(BᵀB)⁻¹ g_A^lora Aᵀ          (Sylvester; X is a gauge: g̃ ignores it)

so that `g̃ = G − (I−P_B) G (I−P_A)`. Inverses are `pinv(· + δI)`, δ = 1e-8; at step 0 the
reference uses `g_A = g_A^lora`, `g_B = (1/s²) g_B^lora (AAᵀ)⁻¹`.

The reference (`mrflogs/LoRA-Pro`, DeepSpeed `stage_1_and_2.py`) runs Adam on the *full-size* `g̃`
(β = (0.9, 0.999), ε = 1e-8 on `√v̂`), takes the direction `Ĝ = m̂/(√v̂+ε)`, re-applies the closed form
to `Ĝ` and steps with plain SGD (the HF trainer is told `optim="sgd"`). `scale_by_lora_pro` does
exactly that for every LoRA pair (`adam=True`); with `adam=False` it only adjusts the gradients, for
any optimizer to consume. Moments are full `(in, out)` per pair — the memory of full fine-tuning's
optimizer, as in the reference.

Adapter trees are `jpeft.init`'s: LoRA-family `Adapter` nodes with `train = {"a": (in, r), "b": (r, out)}`
in kernel layout (`ΔK = s·a@b`, `s = node.method.scale`). Every other trainable leaf (DoRA nodes,
FFA-LoRA's lone `b`, plain leaves) goes through `inner` (Adam by default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jpeft import linalg
from jpeft.adapter import Adapter
from jpeft.methods.lowrank import LoRA
from jpeft.paths import path_str


def solve_sylvester(p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """`X` with `P X + X Q = C` for symmetric positive semi-definite `P`, `Q` (eigendecompositions;
    the reference uses a general complex-eigenvector solver). Modes with `λ_P + λ_Q = 0` get 0."""
    dp, up = jnp.linalg.eigh(p)
    dq, uq = jnp.linalg.eigh(q)
    den = dp[:, None] + dq[None, :]
    y = up.T @ c @ uq
    y = jnp.where(den > 0, y / jnp.where(den > 0, den, 1.0), 0.0)
    return up @ y @ uq.T


def adjust_paper(a_mat, b_mat, g_a, g_b, s, *, delta: float = 1e-8, first_step=False, with_x: bool = True):
    """The closed form in paper layout: `A (r,n)`, `B (m,r)`, `g_a = g_A^lora (r,n)`, `g_b = g_B^lora (m,r)`."""
    r = a_mat.shape[0]
    eye = jnp.eye(r, dtype=a_mat.dtype)
    aat = a_mat @ a_mat.T
    btb = b_mat.T @ b_mat
    aat_inv = jnp.linalg.pinv(aat + delta * eye)
    btb_inv = jnp.linalg.pinv(btb + delta * eye)
    inv_s2 = 1.0 / (s * s)
    new_a = inv_s2 * (btb_inv @ g_a)
    new_b = inv_s2 * ((g_b - b_mat @ (btb_inv @ (b_mat.T @ g_b))) @ aat_inv)
    if with_x:
        x = solve_sylvester(btb, aat, -inv_s2 * (btb_inv @ g_a @ a_mat.T))
        new_a = new_a + x @ a_mat
        new_b = new_b - b_mat @ x
    first_a, first_b = g_a, inv_s2 * (g_b @ aat_inv)
    return jnp.where(first_step, first_a, new_a), jnp.where(first_step, first_b, new_b)


def lora_pro_adjust(a, b, g_a, g_b, s, *, delta: float = 1e-8, first_step=False, with_x: bool = True):
    """The LoRA-Pro gradients in kernel layout: `a (in, r)`, `b (r, out)`, `ΔK = s·a@b`, `g_a`, `g_b` the
    LoRA gradients of the loss. Returns `(g_a, g_b)` adjusted (computed in float32, cast back)."""
    up = linalg.upcast
    new_a, new_b = adjust_paper(up(a).T, up(b).T, up(g_a).T, up(g_b).T, s, delta=delta,
                                first_step=first_step, with_x=with_x)
    return new_a.T.astype(g_a.dtype), new_b.T.astype(g_b.dtype)


def equivalent_gradient(a, b, g_a, g_b, s):
    """`g̃` in kernel layout: `s·(g_a @ b + a @ g_b)` (`(in, out)`)."""
    return s * (g_a @ b + a @ g_b)


class PairMoments(NamedTuple):
    mu: jax.Array  # (in, out)
    nu: jax.Array


class LoRAProState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states' `count` does
    pairs: dict[str, PairMoments | None]  # per LoRA pair (keyed by path); None when adam=False
    rest: Any  # the inner optimizer's state for every other trainable leaf


def is_lora_pair(node: Any) -> bool:
    """A LoRA-family adapter node whose trainable leaves are exactly `a` and `b` (2-D)."""
    if not isinstance(node, Adapter) or not isinstance(node.method, LoRA):
        return False
    train = {k: v for k, v in node.train.items() if v is not None}
    if set(train) != {"a", "b"}:
        return False
    a, b = train["a"], train["b"]
    # 2-D pairs, or stacks of them (a viewed node's batch axes in front)
    return getattr(a, "ndim", 0) >= 2 and getattr(b, "ndim", 0) == a.ndim and a.shape[:-2] == b.shape[:-2]


def _split(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Adapter))
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [x for _, x in flat]
    return paths, leaves, treedef


def scale_by_lora_pro(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, delta: float = 1e-8,
                      adam: bool = True,
                      inner: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """LoRA-Pro's direction for trees of `jpeft` adapters (before the learning rate; needs `params`).

    Args:
      b1, b2, eps: Adam on the equivalent gradient (reference values).
      delta: the `δI` added before each `pinv`.
      adam: True — the reference AdamW variant (full-size moments per pair, output is the adjusted
        Adam direction); False — output the adjusted gradients only (no state), for any optimizer.
      inner: transformation for the other trainable leaves (default `optax.scale_by_adam(b1, b2, eps)`).
    """
    inner = inner if inner is not None else optax.scale_by_adam(b1, b2, eps)

    def rest_tree(paths, leaves, treedef):
        return treedef.unflatten([None if is_lora_pair(x) else x for x in leaves])

    def init_fn(params):
        paths, leaves, treedef = _split(params)
        pairs = {}
        for p, node in zip(paths, leaves):
            if is_lora_pair(node):
                shape = (*node.train["a"].shape[:-1], node.train["b"].shape[-1])
                dt = jnp.promote_types(node.train["a"].dtype, jnp.float32)
                pairs[p] = PairMoments(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) if adam else None
        return LoRAProState(jnp.zeros([], jnp.int32), pairs, inner.init(rest_tree(paths, leaves, treedef)))

    def pair_update(node_g, node_p, moments, count):
        """One pair, or each slice of a stacked pair (`vmap`ped over its leading axes)."""
        a, b = linalg.upcast(node_p.train["a"]), linalg.upcast(node_p.train["b"])
        g_a, g_b = linalg.upcast(node_g.train["a"]), linalg.upcast(node_g.train["b"])
        f = functools.partial(pair_update_2d, s=node_p.method.scale, count=count)
        for _ in range(a.ndim - 2):
            f = jax.vmap(f)
        return f(a, b, g_a, g_b, moments)

    def pair_update_2d(a, b, g_a, g_b, moments, *, s, count):
        first = count == 0
        if not adam:
            ua, ub = lora_pro_adjust(a, b, g_a, g_b, s, delta=delta, first_step=first)
            return ua, ub, moments
        ga1, gb1 = lora_pro_adjust(a, b, g_a, g_b, s, delta=delta, first_step=first, with_x=False)
        equiv = equivalent_gradient(a, b, ga1, gb1, s)
        mu = b1 * moments.mu + (1 - b1) * equiv
        nu = b2 * moments.nu + (1 - b2) * jnp.square(equiv)
        t = (count + 1).astype(jnp.float32)
        direction = (mu / (1 - b1 ** t)) / (jnp.sqrt(nu) / jnp.sqrt(1 - b2 ** t) + eps)
        ua, ub = lora_pro_adjust(a, b, s * direction @ b.T, s * a.T @ direction, s, delta=delta, first_step=first)
        return ua, ub, PairMoments(mu, nu)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lora_pro needs params (the current adapter factors)")
        paths, g_leaves, treedef = _split(updates)
        p_leaves = treedef.flatten_up_to(params)
        rest_updates, rest_state = inner.update(rest_tree(paths, g_leaves, treedef), state.rest,
                                                rest_tree(paths, p_leaves, treedef))
        out = treedef.flatten_up_to(rest_updates)
        pairs = dict(state.pairs)
        for i, (path, g, p) in enumerate(zip(paths, g_leaves, p_leaves)):
            if not is_lora_pair(g):
                continue
            ua, ub, pairs[path] = pair_update(g, p, state.pairs[path], state.count)
            out[i] = g.replace(train={**g.train, "a": ua.astype(g.train["a"].dtype),
                                      "b": ub.astype(g.train["b"].dtype)})
        return treedef.unflatten(out), LoRAProState(optax.safe_int32_increment(state.count), pairs, rest_state)

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
             weight_decay: float = 0.0, mask: Any | Callable[[Any], Any] | None = None, delta: float = 1e-8,
             adam: bool = True, inner: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """LoRA-Pro (reference AdamW variant): `scale_by_lora_pro`, decoupled weight decay, the learning rate.
    The reference trains with weight decay 0."""
    return optax.chain(
        scale_by_lora_pro(b1, b2, eps, delta=delta, adam=adam, inner=inner),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
