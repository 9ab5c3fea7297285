"""LaMDA and LaMDA++ (Azizi, Kundu and Pedram, EMNLP Findings 2024), SVD-core methods (family B) with a
step hook that freezes the up-projection progressively (family J), and LaMDA++'s spectral rank allocation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import linalg
from jpeft.adapter import Adapter, is_adapter_or_hole
from jpeft.hooks import HookResult
from jpeft.methods.base import kaiming_uniform, require
from jpeft.methods.svdcore import SVDCore, Term, frames
from jpeft.registry import register

LAMDA_INITS = ("svd", "kaiming")


@register
@dataclasses.dataclass(frozen=True)
class LaMDA(SVDCore):
    """LaMDA: `W' = W_base + s·B S A` with `A` (PMA) frozen, `S ∈ R^{r×r}`
    trainable and `B` (PMB) trainable early, then frozen progressively by the step hook.

    init:         "svd" (the paper's spectral init, **[UNVERIFIED details]**): `A = V_rᵀ`,
                  `B = U_r`, `S = Σ_r / s`, residual base `W − U_rΣ_rV_rᵀ` (so `W' = W`);
                  "kaiming" (the public code): `A` LoRA-Kaiming, `B = 0`, `S ~ U(±1/√r)`, base `W`.
    freeze_steps: `t_B`: column `j` of `B` (rank component j, largest singular value first)
                  freezes after `ceil((j+1)·t_B/r)` optimizer steps, so all of `B` is frozen after
                  `t_B` steps. The reference freezes the first `⌊step/(η·max_steps)⌋` columns
                  (η = 0.3), i.e. `t_B = r·η·max_steps`; it only zeroes their gradient (Adam
                  momentum and weight decay still move them) — here a frozen column is exact.

    Freezing (a pure, jit-able `step_hook`): the hook records each frozen column of `b` in
    `state["b_snap"]` (the forward reads frozen columns from there, so neither the gradient nor
    any optimizer update — weight decay included — reaches them) and zeroes their optimizer moments
    (explicit optimizer-state surgery: the dropped state, so Adam's update of that column is
    exactly 0). Once all of `B` is frozen, `lamda_compact(params, opt_state)` moves `b` to the frozen
    buffers and removes its moments (trainable count `r² + r·out → r²`).
    """

    name = "lamda"
    paper = ("LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation, "
             "Azizi, Kundu and Pedram, EMNLP Findings 2024")

    rank: int = 8
    alpha: float = 8.0
    init: str = "svd"
    freeze_steps: int = 100

    def validate(self) -> None:
        super().validate()
        require(self.init in LAMDA_INITS, f"{self.name}: init must be one of {LAMDA_INITS}, got {self.init!r}")
        require(isinstance(self.freeze_steps, int) and self.freeze_steps >= 0,
                f"{self.name}: freeze_steps must be a non-negative int, got {self.freeze_steps!r}")

    @property
    def rewrites_base(self) -> bool:
        return self.init == "svd"

    def keep_mask(self, sig, sig_all):
        """Which rank components are used: None (all) for LaMDA; see LaMDA++."""
        return None

    def create(self, key, w, calib=None):
        n, m = w.shape
        r, dt = self.rank, w.dtype
        state = {"frozen_cols": jnp.zeros((r,), jnp.float32), "b_snap": jnp.zeros((r, m), dt)}
        if self.init == "kaiming":
            ka, ks = jax.random.split(key)
            return self.node(w, train={"core": kaiming_uniform(ks, (r, r), r, jnp.float32).astype(dt),
                                       "b": jnp.zeros((r, m), dt)},
                             frozen={"a": kaiming_uniform(ka, (n, r), n, jnp.float32).astype(dt)}, state=state)
        v_all, sig_all, ut_all = frames(None, w)
        v, sig, ut = v_all[:, :r], sig_all[:r], ut_all[:r]
        keep = self.keep_mask(sig, sig_all)
        frozen = {"a": v.astype(dt)}
        if keep is not None:
            frozen["keep"] = keep.astype(jnp.float32)
            sig = sig * keep
        node = self.node(w, train={"core": jnp.diag(sig / self.scale).astype(dt), "b": ut.astype(dt)},
                         frozen=frozen, state=state)
        return node.replace(base=(linalg.upcast(w) - self.delta(node)).astype(dt))

    def core(self, node):
        return node.train["core"]

    def b_effective(self, node):
        if "b" not in node.train:                        # compacted: B is a frozen buffer
            return node.frozen["b"]
        frozen = node.state["frozen_cols"][:, None] > 0
        return jnp.where(frozen, node.state["b_snap"], node.train["b"])

    def terms(self, node):
        return [Term(node.frozen["a"], self.core(node), self.b_effective(node), "dense", self.scale)]

    def freeze_schedule(self) -> np.ndarray:
        """Step after which each column of `B` is frozen: `ceil((j+1)·t_B/r)`."""
        return np.ceil(np.arange(1, self.rank + 1) * self.freeze_steps / self.rank).astype(np.int32)

    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        due = (jnp.asarray(step) >= jnp.asarray(self.freeze_schedule())).astype(jnp.float32)
        new_nodes, new_moments = [], []
        for node, node_moments in zip(nodes, moments):
            if "b" not in node.train:
                new_nodes.append(node)
                new_moments.append(node_moments)
                continue
            old = node.state["frozen_cols"]
            mask = jnp.maximum(old, due)
            newly = jnp.logical_and(mask > 0, old == 0)[:, None]
            snap = jnp.where(newly, node.train["b"], node.state["b_snap"])
            new_nodes.append(node.replace(state={**node.state, "frozen_cols": mask, "b_snap": snap}))
            frozen = mask[:, None] > 0
            new_moments.append([{**mom, "b": jnp.where(frozen, jnp.zeros_like(mom["b"]), mom["b"])}
                                for mom in node_moments])
        return HookResult(new_nodes, new_moments, restarted=None)

    def trainable_count(self, node) -> int:
        """Trainable scalars this node really updates (frozen / unused components excluded)."""
        b_cols = 0 if "b" not in node.train else int(np.sum(np.asarray(node.state["frozen_cols"]) == 0))
        return self.rank * self.rank + b_cols * node.base.shape[1]


@register
@dataclasses.dataclass(frozen=True)
class LaMDAPP(LaMDA):
    """LaMDA++ (rank allocation **[UNVERIFIED formula]**): LaMDA with the
    spectral init whose per-layer rank comes from the *normalised* spectrum of the weight,
    `σ̂_i = σ_i / Σ_j σ_j`: component `i < rank` is used iff `σ̂_i >= threshold` (component 0
    always). Shapes stay at `rank` (static, jit-able); unused components are masked out of the core
    and stay in the base (`frozen["keep"]`). `lamda_pp_threshold(kernels, rank, budget)` picks the
    threshold that spends a global budget of components over all layers.
    """

    name = "lamda_pp"
    paper = "LaMDA++ (rank allocation), Azizi, Kundu and Pedram, EMNLP Findings 2024"

    threshold: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(self.init == "svd", f"{self.name}: the rank allocation is spectral; init must be 'svd'")
        require(self.threshold >= 0, f"{self.name}: threshold must be >= 0")

    def keep_mask(self, sig, sig_all):
        return normalised_spectrum_keep(sig, sig_all, self.threshold).astype(sig.dtype)

    def core(self, node):
        keep = node.frozen["keep"].astype(node.train["core"].dtype)
        return node.train["core"] * keep[:, None] * keep[None, :]

    def trainable_count(self, node) -> int:
        r_l = int(np.sum(np.asarray(node.frozen["keep"]) > 0))
        b_cols = 0 if "b" not in node.train else int(np.sum((np.asarray(node.frozen["keep"]) > 0)
                                                            & (np.asarray(node.state["frozen_cols"]) == 0)))
        return r_l * r_l + b_cols * node.base.shape[1]


def normalised_spectrum_keep(sig, sig_all, threshold):
    """LaMDA++'s component mask: `σ_i / Σ_j σ_j >= threshold`, component 0 always kept."""
    normalised = sig / jnp.sum(sig_all)
    return jnp.logical_or(normalised >= threshold, jnp.arange(sig.shape[0]) == 0)


def lamda_pp_threshold(kernels: list, rank: int, budget: int) -> float:
    """The LaMDA++ threshold that keeps `budget` rank components in total over `kernels` (each
    layer at most `rank`, at least 1): the largest normalised singular values win, globally.
    Computed with the same operations as the layers' masks, so the budget is met exactly (ties
    aside)."""
    require(budget >= len(kernels), f"budget {budget} must be >= the number of layers {len(kernels)}")
    scores = []
    for w in kernels:
        sig = linalg.svd(jnp.asarray(w))[1]
        scores.append(np.asarray(sig[:rank] / jnp.sum(sig))[1:])     # component 0 is always kept
    flat = np.sort(np.concatenate(scores))[::-1]
    extra = budget - len(kernels)
    if extra >= flat.size:
        return 0.0
    if extra == 0:
        return float(np.nextafter(flat[0], np.inf))
    return float(flat[extra - 1])


def lamda_compact(params: Any, opt_state: Any) -> tuple[Any, Any]:
    """Move `B` of every LaMDA node whose columns are all frozen into its frozen buffers and drop
    `B`'s optimizer moments (tested in `tests/methods/test_lamda.py`). Not jit-able (changes the tree
    structure); call once after the hook has frozen `B`, then keep using `opt_state` with the new
    trainable tree. Adapter-only checkpoints of a compacted tree are not supported (save before)."""
    from jpeft.core import split
    from jpeft.hooks import moment_trees

    trainable, _ = split(params)
    nodes, pdef = jax.tree_util.tree_flatten(params, is_leaf=is_adapter_or_hole)
    done = [isinstance(n, Adapter) and isinstance(n.method, LaMDA) and "b" in n.train
            and bool(np.all(np.asarray(n.state["frozen_cols"]) > 0)) for n in nodes]
    new_nodes = [n.replace(train={k: v for k, v in n.train.items() if k != "b"},
                           frozen={**n.frozen, "b": n.state["b_snap"]},
                           state={k: v for k, v in n.state.items() if k != "b_snap"}) if d else n
                 for n, d in zip(nodes, done)]
    leaves, sdef, positions = moment_trees(opt_state, trainable)
    for i in positions:
        flat, mdef = jax.tree_util.tree_flatten(leaves[i], is_leaf=is_adapter_or_hole)
        flat = [m.replace(train={k: v for k, v in m.train.items() if k != "b"}, frozen={**m.frozen, "b": None},
                          state={k: v for k, v in m.state.items() if k != "b_snap"}) if d else m
                for m, d in zip(flat, done)]
        leaves[i] = jax.tree_util.tree_unflatten(mdef, flat)
    return jax.tree_util.tree_unflatten(pdef, new_nodes), jax.tree_util.tree_unflatten(sdef, leaves)
