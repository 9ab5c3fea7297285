"""Family C: sparse deltas `K' = K + scatter(idx, val)`.

The shared skeleton: `frozen["idx"] ∈ int32[k]` are sorted, unique flat indices into the
paper-layout `(m, n)` matrix (`(row, col) = divmod(idx, n)`, row = output, col = input), and
`train["val"] ∈ R^k` are the trainable values. In kernel layout (`K ∈ R^{n×m}`) the delta is
`ΔK[col, row] = val`. The trainable state and therefore the optimizer state is O(k).

- `materialise` scatters into the base (the "dense-scatter" path);
- `matmul` is the factored path `x@K + x@scatter(idx, val)ᵀ`: a gather-multiply-scatter over the
  k entries, chunked over tokens inside one `custom_vjp`, so neither the forward nor the backward
  holds an `(m, n)` array nor a `(tokens, k)` panel (only `(chunk, k)`, with `chunk` chosen so
  that it is a small fraction of `m·n`). On GPU/TPU the `pallas_kernels` kernels run instead
  when they are importable. `path="dense"` makes `matmul` return None (materialise + one GEMM:
  faster on CPU above ~1% density, an `(m, n)` temporary per matrix);
- index changes (SpIEL drop/regrow, LIFT mask refresh) go through `remap_moments`: the optimizer
  moments of surviving indices are carried bit for bit, new indices get zeros or a seed, removed
  indices are dropped.

Members: SpIEL (`spiel`), LIFT (`lift`), SMT (`smt`), S2FT (`s2ft`), LT-SFT (`lt_sft`), plus the
pure composition functions of LT-SFT (`SparseDelta`, `add`, `subtract`, `apply_deltas`, ...).

Dense gradients for selection. `jpeft.after_step(..., grads=g)` hands each hook the gradients of
its node's trainable leaves (`{"val": ...}`). Selection rules that score entries *outside* the
current support (SpIEL-rigl, LIFT has no such need) also need the dense kernel gradient
`∂L/∂K'` (`(in, out)`, like the kernel). Pass it under the key `"dense"` of the node's grads:
`jpeft.hooks.value_and_hook_grads(loss_fn, trainable, frozen, ...)` computes both in one backward
pass (the family sets `needs_dense_grads`, so the engine adds a zero probe to every sparse node,
whose gradient is the dense one), or build the tree with `jpeft.hooks.hook_grads(grads,
dense_tree)` from any dense gradients you have.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jpeft import linalg
from jpeft.adapter import Adapter
from jpeft.errors import AdapterError, leaf_error
from jpeft.hooks import DENSE, PROBE, HookResult
from jpeft.methods.base import Method, exclusive_options, require, require_float_matrix, require_rank
from jpeft.methods.sparse_ops import (
    INT32_MAX,
    PATHS,
    SparseDelta,
    budget,
    gather_kernel,
    linear_sparse_delta,
    lookup,
    pallas_ops,
    random_indices,
    regrow,
    remap_moments,
    rows_cols,
    scatter_kernel,
    select_topk,
    topk_kernel,
)
from jpeft.registry import register


# ============================================================================ the skeleton
@dataclasses.dataclass(frozen=True)
class SparseMethod(Method):
    """Shared skeleton of the sparse-delta methods (not registered itself).

    density / lora_rank: the budget `k` per matrix (`budget`): set at most one; with neither the
           method's `budget_default` applies (`density=0.01` here).
    path:  "sparse" (factored gather path, O(k) extra memory) or "dense" (materialise: scatter
           into the base then one GEMM).
    chunk: tokens per chunk of the sparse path (None: `auto_chunk`).
    """

    needs_dense_grads = True  # selection hooks score entries outside the support (`jpeft.hooks`)

    density: float | None = None
    lora_rank: int | None = None
    path: str = "sparse"
    chunk: int | None = None

    #: The budget when neither `density` nor `lora_rank` is set.
    budget_default: ClassVar[dict] = {"density": 0.01}
    #: The options that are alternative budgets (at most one may be set).
    budget_options: ClassVar[tuple[str, ...]] = ("density", "lora_rank")

    def budget(self) -> dict[str, Any]:
        """The budget option in force: the one set, or `budget_default`."""
        return exclusive_options(self, self.budget_options, self.budget_default)

    def validate(self) -> None:
        b = self.budget()
        require("density" not in b or 0.0 < b["density"] <= 1.0,
                f"{self.name}: density must be in (0, 1], got {b.get('density')!r}")
        require("lora_rank" not in b or b["lora_rank"] >= 1,
                f"{self.name}: lora_rank must be a positive int, got {b.get('lora_rank')!r}")
        require(self.path in PATHS, f"{self.name}: path must be one of {PATHS}, got {self.path!r}")
        require(self.chunk is None or (isinstance(self.chunk, int) and self.chunk >= 1),
                f"{self.name}: chunk must be None or a positive int, got {self.chunk!r}")

    # ------------------------------------------------------------------ shapes
    def k_for(self, w) -> int:
        n, m = w.shape
        b = self.budget()
        return budget(m, n, b.get("density"), b.get("lora_rank"))

    def check(self, path, w):
        require_float_matrix(path, w)
        if w.shape[0] * w.shape[1] > INT32_MAX:
            raise leaf_error(path, w.shape, w.dtype, "flat int32 indices need in·out < 2**31")

    # ------------------------------------------------------------------ init
    def select(self, key, w, calib, k) -> jax.Array:
        """Sorted paper-layout flat indices of the initial support."""
        raise NotImplementedError

    def init_state(self, w, k) -> dict:
        return {}

    def create(self, key, w, calib=None):
        k = self.k_for(w)
        idx = self.select(key, w, calib, k)
        return self.node(w, train={"val": jnp.zeros((k,), w.dtype)}, frozen={"idx": idx},
                         state=self.init_state(w, k))

    # ------------------------------------------------------------------ forward
    def values(self, node):
        return node.train["val"]

    def sparse_delta(self, node) -> SparseDelta:
        """The node's delta as a `SparseDelta` (paper layout)."""
        n, m = self.kernel_shape(node)
        return SparseDelta(node.frozen["idx"], self.values(node), (m, n))

    def kernel_shape(self, node):
        return node.base.shape

    def materialise(self, node, rng=None):
        base = node.base
        if PROBE in node.frozen:
            base = base + node.frozen[PROBE]
        return scatter_kernel(node.frozen["idx"], self.values(node), *base.shape, base=base).astype(node.base.dtype)

    def matmul(self, node, x, rng=None):
        if self.path == "dense":
            return None
        idx, val = node.frozen["idx"], self.values(node)
        y = None
        kernels = pallas_ops()
        if kernels is not None:
            y = kernels.linear_sparse_delta(x, node.base, idx, val, path="sparse")
        else:
            y = linear_sparse_delta(x, node.base, idx, val, chunk=self.chunk)
        if PROBE in node.frozen:
            y = y + x @ node.frozen[PROBE]
        return y


# ============================================================================ dense gradients
def abs_grad_sum(grads_list) -> Any:
    """`Σ_t |G_t|` over a list of gradient trees (SMT's warm-up block scores, `calib=`)."""
    return jax.tree.map(lambda *gs: sum(jnp.abs(g) for g in gs), *grads_list)


def _dense_of(grads, j):
    return None if grads is None or grads[j] is None else grads[j].get(DENSE)


# ============================================================================ SpIEL
SCHEDULES = ("linear", "cosine")
SELECTIONS = ("rigl", "sm3")


@register
@dataclasses.dataclass(frozen=True)
class SpIEL(SparseMethod):
    """SpIEL (Ansell et al. 2024): `K' = K + scatter(η, φ)`, η random at init,
    φ = 0 (identity). Every `reselection_steps` S the `⌊p·k⌋` entries of smallest `|φ|` are dropped
    and as many new indices grown; dropped values are discarded (the weight returns to `K`), new
    values start at 0.

    selection="rigl" (SpIEL-AG): candidates are the top-k entries of `|G|` (dense gradient) at the
    first step of an accumulation window, whose gradient sum and square sum are accumulated for
    `accumulation_steps` steps; growth takes the largest `|mean|`. New entries' Adam moments are
    seeded with the mean / mean square, counter-biased as `mean·(1−b1^t)`, `meansq·(1−b2^t)` so
    that optax's bias correction (shared step count t) returns the mean gradient (the reference's
    per-entry Adam ages are replaced by optax's shared count). Pass the dense gradient on the steps
    where `wants_dense_grads(step)` holds (`jpeft.hooks.value_and_hook_grads` / `hook_grads`); steps without
    it accumulate nothing, and a reselection with no samples changes nothing.
    selection="sm3" (SpIEL-MA): SM3 row/column accumulators of the *active* gradients
    (`ν = β·min(r[row], c[col]) + (1−β)·g²`, `r = max(r, ν)`, `c = max(c, ν)`) estimate the
    importance of every entry as `r[row]·c[col]`; growth takes the largest among inactive entries
    and new moments are zero. Needs `grads` at every `after_step`; the reselection forms an
    `(m, n)` score (only on reselection steps).

    Schedule (the hook's `step` t = optimizer updates so far): accumulation on `1 ≤ t mod S ≤ A`,
    reselection at `t mod S = A`; `p = 1` at the first one (t = A), then
    `p₀·(1 − t/T)` (linear) or `p₀·(1 + cos(πt/T))/2` (cosine) with T = `total_steps`, no
    reselection after T; `total_steps=None` keeps `p = p₀`. (The reference collects one more
    sample in later windows; here every window has A samples.)
    seed_moments: seed new entries' moments when the optimizer state has exactly two
    per-parameter moment trees (Adam's mu, nu), else they are zero.
    """

    name = "spiel"
    paper = "SpIEL: Scaling Sparse Fine-Tuning to Large Language Models, Ansell et al. 2024"

    reselection_steps: int = 20
    accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    schedule: str = "linear"
    total_steps: int | None = None
    selection: str = "rigl"
    sm3_beta: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    seed_moments: bool = True

    def validate(self) -> None:
        super().validate()
        require(1 <= self.accumulation_steps < self.reselection_steps,
                f"{self.name}: need 1 <= accumulation_steps < reselection_steps")
        require(0.0 <= self.initial_reselection_rate <= 1.0, f"{self.name}: initial_reselection_rate must be in [0, 1]")
        require(self.schedule in SCHEDULES, f"{self.name}: schedule must be one of {SCHEDULES}")
        require(self.selection in SELECTIONS, f"{self.name}: selection must be one of {SELECTIONS}")
        require(self.total_steps is None or self.total_steps >= 1, f"{self.name}: total_steps must be >= 1")
        require(0.0 <= self.sm3_beta < 1.0, f"{self.name}: sm3_beta must be in [0, 1)")

    def select(self, key, w, calib, k):
        n, m = w.shape
        return random_indices(key, m, n, k)

    def init_state(self, w, k):
        n, m = w.shape
        if self.selection == "sm3":
            return {"row_acc": jnp.zeros((m,), jnp.float32), "col_acc": jnp.zeros((n,), jnp.float32)}
        return {"cand": jnp.zeros((k,), jnp.int32), "cand_sum": jnp.zeros((k,), jnp.float32),
                "cand_sq": jnp.zeros((k,), jnp.float32), "samples": jnp.zeros((), jnp.float32)}

    # ------------------------------------------------------------------ schedule
    def wants_dense_grads(self, step: int) -> bool:
        """Whether the hook at optimizer step `step` reads the dense gradient (rigl)."""
        phase = step % self.reselection_steps
        return (self.selection == "rigl" and 1 <= phase <= self.accumulation_steps
                and (self.total_steps is None or step <= self.total_steps))

    def reselection_rate(self, step):
        t = jnp.asarray(step, jnp.float32)
        if self.total_steps is None:
            p = jnp.asarray(self.initial_reselection_rate, jnp.float32)
        elif self.schedule == "linear":
            p = self.initial_reselection_rate * (1.0 - t / self.total_steps)
        else:
            p = self.initial_reselection_rate * (1.0 + jnp.cos(jnp.pi * t / self.total_steps)) / 2.0
        return jnp.where(step == self.accumulation_steps, 1.0, p)

    def _active(self, step):
        return jnp.asarray(True) if self.total_steps is None else step <= self.total_steps

    # ------------------------------------------------------------------ hook
    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        step = jnp.asarray(step)
        if self.selection == "sm3" and grads is None:
            raise AdapterError("spiel(selection='sm3') reads the gradients of the active values at every step: "
                               "pass jpeft.after_step(..., grads=grads)")
        phase = step % self.reselection_steps
        due = (phase == self.accumulation_steps) & self._active(step)
        new_nodes, new_moments = [], []
        for j, (node, node_moments) in enumerate(zip(nodes, moments)):
            if self.selection == "sm3":
                node = self.sm3_accumulate(node, grads[j]["val"])
            else:
                dense = _dense_of(grads, j)
                if dense is not None:
                    window = (phase >= 1) & (phase <= self.accumulation_steps) & self._active(step)
                    node = lax.cond(window, lambda n=node, d=dense: self.rigl_accumulate(n, d, phase == 1),
                                    lambda n=node: n)
            node, node_moments = lax.cond(due, lambda n=node, mo=node_moments: self.reselect(n, mo, step),
                                          lambda n=node, mo=node_moments: (n, mo))
            new_nodes.append(node)
            new_moments.append(node_moments)
        return HookResult(new_nodes, new_moments)

    def rigl_accumulate(self, node, dense, start):
        st = node.state
        k = st["cand"].shape[0]
        g = linalg.upcast(dense)
        cand = lax.cond(start, lambda: jnp.sort(topk_kernel(jnp.abs(g), k)[1]), lambda: st["cand"])
        gc = gather_kernel(g, cand).astype(jnp.float32)
        keep = jnp.where(start, 0.0, 1.0)
        state = {**st, "cand": cand, "cand_sum": keep * st["cand_sum"] + gc,
                 "cand_sq": keep * st["cand_sq"] + gc * gc, "samples": keep * st["samples"] + 1.0}
        return node.replace(state=state)

    def sm3_accumulate(self, node, g):
        n, m = node.base.shape
        row, col = rows_cols(node.frozen["idx"], n)
        r, c = node.state["row_acc"], node.state["col_acc"]
        g = g.astype(jnp.float32)
        nu = self.sm3_beta * jnp.minimum(r[row], c[col]) + (1.0 - self.sm3_beta) * g * g
        return node.replace(state={**node.state, "row_acc": r.at[row].max(nu), "col_acc": c.at[col].max(nu)})

    def reselect(self, node, node_moments, step):
        idx, val = node.frozen["idx"], node.train["val"]
        k = idx.shape[0]
        n_drop = jnp.floor(self.reselection_rate(step) * k).astype(jnp.int32)
        seeds = None
        if self.selection == "sm3":
            n, m = node.base.shape
            score = jnp.outer(node.state["col_acc"], node.state["row_acc"])        # kernel layout (n, m)
            row, col = rows_cols(idx, n)
            score = score.at[col, row].set(-jnp.inf)                                # active entries are not candidates
            cand_score, cand = topk_kernel(score, k)
            new_idx = regrow(idx, val, cand, cand_score, n_drop)
            state = node.state
        else:
            st = node.state
            samples = st["samples"]
            score = jnp.where(samples > 0, jnp.abs(st["cand_sum"]), -jnp.inf)
            new_idx = regrow(idx, val, st["cand"], score, n_drop)
            if self.seed_moments and len(node_moments) == 2:
                safe = jnp.maximum(samples, 1.0)
                t = jnp.asarray(step, jnp.float32)
                order = jnp.argsort(st["cand"])
                pos, _ = lookup(st["cand"][order], new_idx)
                mean = (st["cand_sum"] / safe)[order][pos]
                meansq = (st["cand_sq"] / safe)[order][pos]
                seeds = [mean * (1.0 - self.b1 ** t), meansq * (1.0 - self.b2 ** t)]
            state = {**st, "samples": jnp.zeros_like(samples)}
        new_val = remap_moments(idx, new_idx, val)
        new_node = node.replace(train={**node.train, "val": new_val}, frozen={**node.frozen, "idx": new_idx},
                                state=state)
        return new_node, remap_node_moments(idx, new_idx, node_moments, seeds)


def remap_node_moments(old_idx, new_idx, node_moments, seeds=None):
    """`remap_moments` over a hook's per-node moment list (`[{"val": mu}, {"val": nu}, ...]`);
    `seeds` (one array or None per moment tree) seed the new entries of `val`."""
    vals = [mom["val"] for mom in node_moments]
    new = remap_moments(old_idx, new_idx, vals, seeds)
    return [{**mom, "val": v} for mom, v in zip(node_moments, new)]


# ============================================================================ LIFT
@register
@dataclasses.dataclass(frozen=True)
class LIFT(SparseMethod):
    """LIFT (Liu et al., ICML 2025): fine-tune the principal weights, the top-k
    entries of `|best_rank_r(W)|` with `r` = `rank` (r_f) and `k = min((m+n)·lora_rank, m·n)`
    (or `⌊density·m·n⌋`). `K' = K + scatter(idx, val)`, `val = 0` at init (identity).

    Every `update_interval` optimizer steps the hook recomputes the mask from the current
    `K + Δ` (SVD again; `svd_niter` None = exact, else randomised with that many power
    iterations). Entries leaving the mask keep their trained value, folded into the base
    (`checkpoint_base`); entries that stay keep value and moments bit for bit; new entries start at
    0 with zero moments (reference `update_masks`).
    """

    name = "lift"
    paper = "LIFT: Low-rank Informed Sparse Fine-Tuning, Liu et al., ICML 2025"
    checkpoint_base = True
    budget_default = {"lora_rank": 128}

    rank: int = 128
    update_interval: int = 200
    svd_niter: int | None = None

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.rank, int) and self.rank >= 1,
                f"{self.name}: rank must be a positive int, got {self.rank!r}")
        require(self.update_interval >= 1, f"{self.name}: update_interval must be >= 1")
        require(self.svd_niter is None or self.svd_niter >= 0, f"{self.name}: svd_niter must be None or >= 0")

    def check(self, path, w):
        super().check(path, w)
        require_rank(path, w, self.rank)

    def principal_indices(self, key, w, k):
        """Sorted indices of the top-k entries of `|best rank-r approximation of w|`."""
        u, s, vh = linalg.leading_svd(key, w, self.rank, self.svd_niter)
        return select_topk(jnp.abs((u * s) @ vh), k)

    def select(self, key, w, calib, k):
        return self.principal_indices(key, w, k)

    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        step = jnp.asarray(step)
        due = (step > 0) & (step % self.update_interval == 0)
        out_nodes, out_moments = [], []
        for node, mom, key in zip(nodes, moments, keys):
            node, mom = lax.cond(due, lambda n=node, mo=mom, kk=key: self.refresh(n, mo, kk),
                                 lambda n=node, mo=mom: (n, mo))
            out_nodes.append(node)
            out_moments.append(mom)
        return HookResult(out_nodes, out_moments)

    def refresh(self, node, node_moments, key):
        idx, val = node.frozen["idx"], node.train["val"]
        current = self.materialise(node)
        new_idx = self.principal_indices(key, current, idx.shape[0])
        _, stays = lookup(new_idx, idx)
        n, m = node.base.shape
        base = scatter_kernel(idx, jnp.where(stays, jnp.zeros_like(val), val), n, m, base=node.base)
        new_node = node.replace(base=base, train={**node.train, "val": remap_moments(idx, new_idx, val)},
                                frozen={**node.frozen, "idx": new_idx})
        return new_node, remap_node_moments(idx, new_idx, node_moments)


# ============================================================================ SMT
@register
@dataclasses.dataclass(frozen=True)
class SMT(SparseMethod):
    """SMT, Sparse Matrix Tuning (He et al. 2024, [UNVERIFIED details]): train
    the `n_blocks` `block×block` sub-matrices with the largest warm-up gradient mass
    `Σ_t Σ_block |G_t|`, dense within each block. Pass the warm-up gradients as
    `jpeft.init(..., calib=g)` with `g` one gradient tree or `abs_grad_sum([G_1, ..., G_T])`.

    The support is the Family C skeleton (`idx` = every entry of the selected blocks, sorted;
    `val` flat) plus `frozen["blocks"]` (paper-layout block ids `br·(n/b) + bc`, sorted). The
    budget is `n_blocks`, or `⌊k/b²⌋` blocks for the `density` / `lora_rank` budget `k` (at least
    one). The factored path multiplies each selected block densely: `(tokens, blocks, b)` panels.
    Both dimensions must be multiples of `block`.
    """

    name = "smt"
    paper = "SMT: Sparse Matrix Tuning, He et al. 2024"
    needs_calib = True
    budget_default = {"lora_rank": 8}
    budget_options = ("density", "lora_rank", "n_blocks")

    block: int = 256
    n_blocks: int | None = None

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.block, int) and self.block >= 1, f"{self.name}: block must be a positive int")
        require(self.budget().get("n_blocks", 1) >= 1, f"{self.name}: n_blocks must be None or >= 1")

    def grid(self, w):
        n, m = w.shape
        return m // self.block, n // self.block

    def count_blocks(self, w) -> int:
        gm, gn = self.grid(w)
        if "n_blocks" in self.budget():
            return min(self.n_blocks, gm * gn)
        return max(1, min(gm * gn, self.k_for(w) // self.block ** 2))

    def check(self, path, w):
        super().check(path, w)
        if w.shape[0] % self.block or w.shape[1] % self.block:
            g = math.gcd(*w.shape)
            raise leaf_error(path, w.shape, w.dtype,
                             f"smt needs both dimensions to be multiples of block={self.block}; "
                             f"set block to a divisor of gcd(in, out) = {g}, for every targeted leaf")

    def block_scores(self, calib):
        """Kernel-layout `(n/b, m/b)` grid of `Σ |calib|` per block."""
        n, m = calib.shape
        b = self.block
        return jnp.abs(linalg.upcast(calib)).reshape(n // b, b, m // b, b).sum(axis=(1, 3))

    def block_indices(self, blocks, n):
        """Sorted flat indices of every entry of the given paper-layout blocks."""
        b, gn = self.block, n // self.block
        br, bc = blocks // gn, blocks % gn
        i = jnp.arange(b)
        flat = ((br[:, None, None] * b + i[None, :, None]) * n + bc[:, None, None] * b + i[None, None, :])
        return jnp.sort(flat.reshape(-1)).astype(jnp.int32)

    def create(self, key, w, calib=None):
        n, m = w.shape
        n_blocks = self.count_blocks(w)
        scores = self.block_scores(calib)                       # (n/b, m/b), kernel layout
        _, blocks = topk_kernel(scores, n_blocks)               # paper-layout block ids br·(n/b) + bc
        blocks = jnp.sort(blocks).astype(jnp.int32)
        idx = self.block_indices(blocks, n)
        return self.node(w, train={"val": jnp.zeros((idx.shape[0],), w.dtype)},
                         frozen={"idx": idx, "blocks": blocks})

    def block_values(self, node):
        """`val` as `(blocks, b_out, b_in)` paper-layout blocks (a gather, differentiable)."""
        n, m = node.base.shape
        b, gn = self.block, n // self.block
        blocks = node.frozen["blocks"]
        br, bc = blocks // gn, blocks % gn
        i = jnp.arange(b)
        flat = ((br[:, None, None] * b + i[None, :, None]) * n + bc[:, None, None] * b + i[None, None, :])
        pos, _ = lookup(node.frozen["idx"], flat)
        return node.train["val"][pos]

    def matmul(self, node, x, rng=None):
        if self.path == "dense":
            return None
        n, m = node.base.shape
        b, gn = self.block, n // self.block
        blocks = node.frozen["blocks"]
        br, bc = blocks // gn, blocks % gn
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n)
        xb = x2.reshape(-1, gn, b)[:, bc]                                   # (T, blocks, b_in)
        yb = jnp.einsum("tqj,qij->tqi", xb, self.block_values(node).astype(x.dtype))
        y = (x2 @ node.base).reshape(-1, m // b, b).at[:, br].add(yb.astype(x.dtype))
        y = y.reshape(*lead, m)
        if PROBE in node.frozen:
            y = y + x @ node.frozen[PROBE]
        return y


# ============================================================================ LT-SFT
@register
@dataclasses.dataclass(frozen=True)
class LTSFT(SparseMethod):
    """LT-SFT, composable sparse fine-tuning (Ansell et al., ACL 2022,
    [UNVERIFIED details]): (1) full fine-tuning `θ₀ → θ₁`; (2) the mask μ = top-k of `|θ₁ − θ₀|`;
    (3) from `θ₀`, train only μ: `K' = K + scatter(idx, val)`, `val = 0` at init.

    Pass `θ₁ − θ₀` as `jpeft.init(..., calib=diff)` (a tree shaped like the params). The optional
    L1 pull toward θ₀, `l1_weight·Σ|val|` over the config's nodes, is its `penalty`
    (`jpeft.penalty(params)`; `l1_weight = 0`, the default, adds nothing). Trained deltas compose:
    `deltas(params)` extracts `{path: SparseDelta}`, `add` / `subtract` combine them,
    `apply_deltas` adds several to one base.
    """

    name = "lt_sft"
    paper = "LT-SFT: Composable Sparse Fine-Tuning, Ansell et al., ACL 2022"
    needs_calib = True

    l1_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(self.l1_weight >= 0.0, f"{self.name}: l1_weight must be >= 0, got {self.l1_weight}")

    def penalty(self, nodes: list[Adapter]) -> jax.Array | None:
        if not nodes or self.l1_weight == 0.0:
            return None
        return self.l1_weight * jnp.sum(jnp.stack([jnp.sum(jnp.abs(self.sparse_delta(n).val)) for n in nodes]))

    def select(self, key, w, calib, k):
        return select_topk(jnp.abs(linalg.upcast(calib)), k)
