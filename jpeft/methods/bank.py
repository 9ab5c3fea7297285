"""Family G: shared bank / random bases.

Every method here is an additive low-rank update in kernel layout, `K' = K_base + L @ R`, whose
factors `L ∈ R^{in×k}`, `R ∈ R^{k×out}` (the scale folded in) are built from per-layer parameters
and, for most of them, from model-level state created once by `create_shared`, stored in the first
node of the config and lent to the others while they are evaluated (`jpeft.shared`):

| method      | model-level state (once)                          | per layer                       |
|-------------|---------------------------------------------------|---------------------------------|
| VB-LoRA     | trainable vector bank `(h, b)`                    | top-k logits of every sub-vector |
| RandLoRA    | frozen random bases `A (r, d_max)`, `B (D_max, N_max, r)` | diagonals `λ (r, N)`, `γ (N, d)` |
| S2-LoRA     | trainable `a, b` per kernel shape                 | rank gates `λ (r,)`             |
| MSPLoRA     | trainable global LoRA per module, mid-level LoRA per (module, layer group) | layer LoRA + slot indices |
| Block-LoRA  | — (the down-projection is shared by the rank blocks of one layer) | `a_s`, `b_1..b_n`   |
| LoRI        | — (global mask extraction: `lori_sparsify`)       | frozen random `a`, `b`, mask    |

The shared skeleton is `BankMethod.factors(node) -> (L, R)`: `materialise` is `K + L@R` (fp32) and
`matmul` the factored `x@K + (x@L)@R`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpeft import linalg
from jpeft.adapter import Adapter, is_adapter
from jpeft.errors import AdapterError
from jpeft.hooks import HookResult
from jpeft.methods.base import Ranked, kaiming_uniform, require
from jpeft.paths import leaves_with_paths
from jpeft.registry import register
from jpeft.shared import SHARED


# ----------------------------------------------------------------------------------- skeleton
class BankMethod(Ranked):
    """Additive low-rank update `K' = K + L@R` with factors from per-layer and shared state."""

    def factors(self, node: Adapter) -> tuple[jax.Array, jax.Array]:
        """`(L, R)` with `L@R = ΔK` (kernel layout, scale included)."""
        raise NotImplementedError

    def delta(self, node: Adapter, rng: jax.Array | None = None) -> jax.Array:
        left, right = self.factors(node)
        return linalg.upcast(left) @ linalg.upcast(right)

    def matmul(self, node, x, rng=None):
        left, right = self.factors(node)
        y = x @ node.base
        return y + ((x @ left) @ right).astype(y.dtype)


def shared_state(node: Adapter) -> dict[str, Any]:
    """The config's shared state as lent to `node` (trainable and frozen parts merged)."""
    if SHARED not in node.train and SHARED not in node.frozen:
        raise AdapterError(f"{node.method!r}: this node has no shared state; evaluate adapters through "
                           "jpeft.apply / jpeft.merge / jpeft.factored, which lend it from the owner node")
    return {**node.frozen.get(SHARED, {}), **node.train.get(SHARED, {})}


def float_dtype(dtype) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _shape_key(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


# ----------------------------------------------------------------------------------- RandLoRA
BASES = ("dense", "sparse", "very_sparse")


@register
@dataclasses.dataclass(frozen=True)
class RandLoRA(BankMethod):
    """RandLoRA (PEFT `tuners/randlora`). Paper layout, `d = min(m, n)`,
    `D = max(m, n)`, `N = ⌈d/r⌉`: `ΔW = s · Σ_j B_j Λ_j A Γ_j` (transposed when `in > out`, so the
    random side with `N` bases is the larger dimension), `s = α/r`, one frozen `A` shared by the `N`
    terms (PEFT). Model-level frozen bases, sized for the largest adapted layer as PEFT does
    (`(out, in)` maxima): `A (r, d_max)`, `B (D_max, N_max, r)`; a layer uses `A[:, :d]` and
    `B[:D, :N]`, flattened to `B_flat (D, N·r)`, and `B_j` is the column block `{k·N + j}_k` of
    `B_flat` (PEFT's pairing; the columns are i.i.d., so this is the paper form up to relabelling).

    Trainable per layer: `λ (r, N)` (init 0, so `W' = W` at init) and `γ (N, d)` (init
    `1/max(N, d)`, PEFT's `reset_randlora_parameters`). Bases: uniform (PEFT: kaiming uniform, then
    divided by the tensor's std) or sparse ternary (`sparse`: P(±1) = 1/6 each; `very_sparse`:
    P(±1) = 1/(2√d_max) each), divided by their std.
    """

    name = "randlora"
    paper = "RandLoRA: Full-Rank Parameter-Efficient Fine-Tuning, Albert et al., ICLR 2025"

    rank: int = 32
    alpha: float = 640.0
    basis: str = "dense"

    def validate(self) -> None:
        super().validate()
        require(self.basis in BASES, f"{self.name}: basis must be one of {BASES}, got {self.basis!r}")

    def num_bases(self, d: int) -> int:
        return -(-d // self.rank)

    def create(self, key, w, calib=None):
        d = min(w.shape)
        nb = self.num_bases(d)
        dt = float_dtype(w.dtype)
        return self.node(w, train={"lam": jnp.zeros((self.rank, nb), dt),
                                   "gamma": jnp.full((nb, d), 1.0 / max(nb, d), dt)})

    def shared_shapes(self, shapes) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """PEFT `_find_dim`: the element-wise largest `(out, in)` over the adapted layers."""
        out_max = max(int(s[1]) for s in shapes)
        in_max = max(int(s[0]) for s in shapes)
        big, small = max(out_max, in_max), min(out_max, in_max)
        return (self.rank, small), (big, self.num_bases(small), self.rank)

    def create_shared(self, key, leaves):
        shape_a, shape_b = self.shared_shapes([w.shape for _, w in leaves])
        dt = float_dtype(jnp.result_type(*[w.dtype for _, w in leaves]))
        ka, kb = jax.random.split(key)
        if self.basis == "dense":
            draw = lambda k, s: jax.random.uniform(k, s, dt, -1.0, 1.0)  # noqa: E731
        else:
            sparsity = 3.0 if self.basis == "sparse" else math.sqrt(shape_a[1])
            draw = lambda k, s: ternary(k, s, sparsity, dt)  # noqa: E731
        a, b = draw(ka, shape_a), draw(kb, shape_b)
        return {}, {"a": a / jnp.std(a, ddof=1), "b": b / jnp.std(b, ddof=1)}

    def scaled_bases(self, node) -> tuple[jax.Array, jax.Array]:
        """`(B_flat (D, N·r), S (r·N, d))` with `S[k·N + j] = λ[k, j] · A[k] ⊙ γ[j]`, `ΔW = s·B_flat@S`
        in the orientation where `d` is the smaller dimension."""
        bases = shared_state(node)
        lam, gamma = node.train["lam"], node.train["gamma"]
        nb, d = gamma.shape
        big = max(node.base.shape)
        a = bases["a"][:, :d]
        b_flat = bases["b"][:big, :nb, :].reshape(big, nb * self.rank)
        s = (lam[:, :, None] * a[:, None, :] * gamma[None, :, :]).reshape(self.rank * nb, d)
        return b_flat, s

    def factors(self, node):
        b_flat, s = self.scaled_bases(node)
        n_in, n_out = node.base.shape
        if n_in <= n_out:  # d = in: ΔW = s·B_flat@S (out×in), ΔK = (s·S)ᵀ@B_flatᵀ
            return (self.scale * s).T, b_flat.T
        return b_flat, self.scale * s  # d = out: ΔW = (B_flat@S)ᵀ, ΔK = B_flat@(s·S)


def ternary(key, shape, sparsity: float, dtype) -> jax.Array:
    """Sparse random projection (PEFT `_init_randlora_A_randlora_B_sparse`): −1 / +1 each with
    probability `1/(2·sparsity)`, else 0 (not yet standardised)."""
    u = jax.random.uniform(key, shape, dtype)
    p = 1.0 / (2.0 * sparsity)
    return jnp.where(u < p, -1.0, jnp.where(u > 1.0 - p, 1.0, 0.0)).astype(dtype)


# ----------------------------------------------------------------------------------- S2-LoRA
@register
@dataclasses.dataclass(frozen=True)
class S2LoRA(BankMethod):
    """S2-LoRA: one trainable pair `a (in, r)`, `b (r, out)` per kernel shape,
    shared by every adapted layer of that shape; each layer trains only its rank gates `λ_l ∈ R^r`:
    `ΔK_l = s · a·diag(λ_l)·b` (paper `ΔW_l = s·B·diag(λ_l)·A`), `s = α/r`. Init: `a` kaiming
    uniform, `b = 0` (identity at init), `λ = 1`. Sparsity of `λ` **[UNVERIFIED regulariser]**: with
    `threshold > 0` a step hook soft-thresholds every `λ_l` by `threshold` after each optimizer step
    (SoRA-style proximal step; masking without reset: the optimizer moments are left untouched).
    """

    name = "s2_lora"
    paper = "S2-LoRA: Sparsely Shared LoRA, Liu et al. 2024"

    rank: int = 8
    alpha: float = 8.0
    threshold: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(self.threshold >= 0.0, f"{self.name}: threshold must be >= 0")

    def create(self, key, w, calib=None):
        return self.node(w, train={"lam": jnp.ones((self.rank,), float_dtype(w.dtype))})

    def create_shared(self, key, leaves):
        groups = {}
        for _, w in leaves:
            groups.setdefault(_shape_key(w.shape), (tuple(w.shape), w.dtype))
        train = {}
        for i, (name, (shape, dtype)) in enumerate(sorted(groups.items())):
            dt = float_dtype(dtype)
            train[name] = {"a": kaiming_uniform(jax.random.fold_in(key, i), (shape[0], self.rank), shape[0], dt),
                           "b": jnp.zeros((self.rank, shape[1]), dt)}
        return train, {}

    def factors(self, node):
        group = shared_state(node)[_shape_key(node.base.shape)]
        return group["a"] * (self.scale * node.train["lam"]), group["b"]

    @property
    def step_hook(self):  # type: ignore[override]
        return self._soft_threshold if self.threshold > 0 else None

    def _soft_threshold(self, nodes, moments, *, step, keys, grads=None):
        tau = self.threshold

        def prox(node):
            lam = node.train["lam"]
            return node.replace(train={**node.train, "lam": jnp.sign(lam) * jnp.maximum(jnp.abs(lam) - tau, 0.0)})

        return HookResult([prox(n) for n in nodes], moments, restarted=None)


# ----------------------------------------------------------------------------------- MSPLoRA
_NUMBER = re.compile(r"\d+")


def layer_and_module(path: str) -> tuple[int, str]:
    """The layer index (the first integer in the path) and the module key (the path with that integer
    replaced by `*`), as the MSPLoRA reference finds them (`re.findall(r"\\d+", key)[0]`)."""
    match = _NUMBER.search(path)
    if match is None:
        return 0, path
    return int(match.group()), path[: match.start()] + "*" + path[match.end():]


@register
@dataclasses.dataclass(frozen=True)
class MSPLoRA(BankMethod):
    """MSPLoRA (reference `msplora.py` in the authors' PEFT fork):
    `ΔW_l = s_G B_G A_G + s_M B_{g(l)} A_{g(l)} + s_L B_l A_l`, `s_x = α/r_x`.

    - global LoRA (rank `rank`) shared by the same module in every layer (the reference shares
      the module whose path has the layer number replaced);
    - mid-level LoRA (rank `mid_rank`) shared by that module within each of `groups` runs of
      consecutive layers (the reference splits the layers into 3 equal parts); with P distinct
      layers present, layer position p belongs to group `⌊p·G/P⌋`, `G = min(groups, P)`;
    - layer-specific LoRA (rank `layer_rank`).

    The layer index of a leaf is the first integer in its path. Shared factors are stacked per
    kernel shape; each node keeps its int32 slot indices `frozen["global"]`, `frozen["mid"]`.
    Init: every `a` kaiming uniform, every `b = 0` (identity at init).
    """

    name = "msplora"
    paper = "MSPLoRA: Multi-Scale Pyramid LoRA, Zhao, Yu and Yang 2025"
    rank_options = ("rank", "mid_rank", "layer_rank")

    rank: int = 8
    mid_rank: int = 4
    layer_rank: int = 2
    alpha: float = 16.0
    groups: int = 3

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.groups, int) and self.groups >= 1, f"{self.name}: groups must be a positive int")

    def create(self, key, w, calib=None):
        dt = float_dtype(w.dtype)
        return self.node(w, train={"a": kaiming_uniform(key, (w.shape[0], self.layer_rank), w.shape[0], dt),
                                   "b": jnp.zeros((self.layer_rank, w.shape[1]), dt)})

    def assignment(self, paths_shapes) -> tuple[dict[str, list], list[tuple[str, int, int]]]:
        """Per shape key: the module slots `[(module, n_groups)]`; per leaf: `(shape key, module slot,
        mid slot)`."""
        modules: dict[str, list[tuple[int, int, tuple]]] = {}
        for i, (path, shape) in enumerate(paths_shapes):
            layer, module = layer_and_module(path)
            modules.setdefault(module, []).append((i, layer, tuple(shape)))
        by_shape: dict[str, list[tuple[str, int]]] = {}
        per_leaf: list[Any] = [None] * len(paths_shapes)
        for module in sorted(modules):
            members = modules[module]
            shapes = {s for _, _, s in members}
            if len(shapes) > 1:
                raise AdapterError(f"msplora: the layers of module {module!r} have different shapes {sorted(shapes)}; "
                                   "the global / mid-level factors of a module need one shape")
            skey = _shape_key(next(iter(shapes)))
            layers = sorted({layer for _, layer, _ in members})
            n_groups = min(self.groups, len(layers))
            slots = by_shape.setdefault(skey, [])
            module_slot = len(slots)
            mid_base = sum(g for _, g in slots)
            slots.append((module, n_groups))
            for i, layer, _ in members:
                group = layers.index(layer) * n_groups // len(layers)
                per_leaf[i] = (skey, module_slot, mid_base + group)
        return by_shape, per_leaf

    def create_shared(self, key, leaves):
        by_shape, per_leaf = self.assignment([(p, w.shape) for p, w in leaves])
        dtypes = {}
        for (_, w), (skey, _, _) in zip(leaves, per_leaf):
            dtypes.setdefault(skey, w.dtype)
        train = {}
        for i, skey in enumerate(sorted(by_shape)):
            n, m = (int(d) for d in skey.split("x"))
            dt = float_dtype(dtypes[skey])
            n_modules = len(by_shape[skey])
            n_mid = sum(g for _, g in by_shape[skey])
            kg, km = jax.random.split(jax.random.fold_in(key, i))
            train[skey] = {
                "global_a": kaiming_uniform(kg, (n_modules, n, self.rank), n, dt),
                "global_b": jnp.zeros((n_modules, self.rank, m), dt),
                "mid_a": kaiming_uniform(km, (n_mid, n, self.mid_rank), n, dt),
                "mid_b": jnp.zeros((n_mid, self.mid_rank, m), dt),
            }
        extras = [{"global": jnp.asarray(g, jnp.int32), "mid": jnp.asarray(mid, jnp.int32)}
                  for _, g, mid in per_leaf]
        return train, {}, extras

    def level_factors(self, node) -> list[tuple[float, jax.Array, jax.Array]]:
        """`[(s, a, b)]` for the global, mid-level and layer LoRA of this node (kernel layout)."""
        sh = shared_state(node)[_shape_key(node.base.shape)]
        g, mid = node.frozen["global"], node.frozen["mid"]
        return [(self.alpha / self.rank, sh["global_a"][g], sh["global_b"][g]),
                (self.alpha / self.mid_rank, sh["mid_a"][mid], sh["mid_b"][mid]),
                (self.alpha / self.layer_rank, node.train["a"], node.train["b"])]

    def factors(self, node):
        levels = self.level_factors(node)
        return (jnp.concatenate([s * a for s, a, _ in levels], axis=1),
                jnp.concatenate([b for _, _, b in levels], axis=0))


# ----------------------------------------------------------------------------------- Block-LoRA
@register
@dataclasses.dataclass(frozen=True)
class BlockLoRA(BankMethod):
    """Block-LoRA: the rank-r LoRA split into `blocks` blocks of rank `r/n`
    whose down-projections are one shared matrix `A_s`: `ΔW = Σ_i B_i A_s = (Σ_i B_i) A_s`, so the
    product becomes a sum of up-projection blocks followed by one rank-`r/n` down-projection.
    Kernel layout: `a_s (in, r/n)`, `b (n, r/n, out)`; `ΔK = s·a_s@(Σ_i b_i)`, `s = α/r`
    **[UNVERIFIED scale; LoRA's]**. Init: `a_s` kaiming uniform, `b = 0` (identity at init).
    Parameters per layer `n·out·(r/n) + (r/n)·in`. The sharing is within the layer: no model-level
    state.
    """

    name = "block_lora"
    paper = "Block-LoRA, Zhou et al. 2025"

    rank: int = 8
    alpha: float = 8.0
    blocks: int = 2

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.blocks, int) and self.blocks >= 1 and self.rank % self.blocks == 0,
                f"{self.name}: blocks must be a positive divisor of rank = {self.rank}, got {self.blocks!r}")

    @property
    def block_rank(self) -> int:
        return self.rank // self.blocks

    def create(self, key, w, calib=None):
        dt = float_dtype(w.dtype)
        n, m = w.shape
        return self.node(w, train={"a": kaiming_uniform(key, (n, self.block_rank), n, dt),
                                   "b": jnp.zeros((self.blocks, self.block_rank, m), dt)})

    def factors(self, node):
        return self.scale * node.train["a"], jnp.sum(node.train["b"], axis=0)


# ----------------------------------------------------------------------------------- LoRI
@register
@dataclasses.dataclass(frozen=True)
class LoRI(BankMethod):
    """LoRI (`juzhengz/LoRI`): `W' = W + s·(M ⊙ B)·A` with `A` a frozen random
    projection (PEFT kaiming uniform) and `B` trained (init 0, identity at init) under a fixed
    binary mask `M`, `s = α/r`. Kernel layout: `a (in, r)` frozen, `b (r, out)`, `mask (r, out)`.

    LoRI-D trains with `M = 1`. `lori_sparsify(params)` then extracts the mask globally (the
    magnitude top-`(1−sparsity)` of `|B|` pooled over all layers of the config) and restarts `B` from
    0 with the same `A` (LoRI-S); masked entries get no gradient, so they stay exactly 0.
    """

    name = "lori"
    paper = "LoRI: LoRA with Reduced Interference, Zhang et al., COLM 2025"

    rank: int = 32
    alpha: float = 64.0
    sparsity: float = 0.9

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.sparsity < 1.0, f"{self.name}: sparsity must be in [0, 1), got {self.sparsity!r}")

    def create(self, key, w, calib=None):
        dt = float_dtype(w.dtype)
        n, m = w.shape
        return self.node(w, train={"b": jnp.zeros((self.rank, m), dt)},
                         frozen={"a": kaiming_uniform(key, (n, self.rank), n, dt),
                                 "mask": jnp.ones((self.rank, m), dt)})

    def factors(self, node):
        return self.scale * node.frozen["a"], node.frozen["mask"] * node.train["b"]


def lori_sparsify(params: Any, sparsity: float | None = None, *, reset: bool = True) -> Any:
    """LoRI-D → LoRI-S: for each LoRI config, keep the `round((1−ρ)·total)` largest `|M ⊙ B|` entries
    pooled over all its layers (ties broken by position), write them as the new masks, and (with
    `reset`) restart `B` from 0. `ρ` defaults to the config's `sparsity`."""
    pairs = leaves_with_paths(params, is_leaf=is_adapter)
    groups: dict[Any, list[int]] = {}
    for i, (_, node) in enumerate(pairs):
        if isinstance(node, Adapter) and isinstance(node.method, LoRI):
            groups.setdefault(node.method, []).append(i)
    leaves = [leaf for _, leaf in pairs]
    for method, members in groups.items():
        rho = method.sparsity if sparsity is None else sparsity
        scores = [jnp.abs(leaves[i].frozen["mask"] * leaves[i].train["b"]).ravel() for i in members]
        flat = jnp.concatenate(scores)
        keep = int(round((1.0 - rho) * flat.size))
        chosen = (jnp.zeros(flat.size, bool).at[lax.top_k(flat, keep)[1]].set(True) if keep
                  else jnp.zeros(flat.size, bool))
        offset = 0
        for i in members:
            node = leaves[i]
            size = node.train["b"].size
            mask = chosen[offset: offset + size].reshape(node.train["b"].shape).astype(node.frozen["mask"].dtype)
            offset += size
            train = {**node.train, "b": jnp.zeros_like(node.train["b"])} if reset else node.train
            leaves[i] = node.replace(train=train, frozen={**node.frozen, "mask": mask})
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_adapter), leaves)
