"""Family B: SVD-core adapters.

One skeleton: a frozen (possibly rewritten) base plus one or more *terms*

    K' = K_base + Σ_t s_t · a_t @ Core_tᵀ @ b_t          (kernel layout, `K = Wᵀ`)

where `a_t ∈ R^{in×r_in}` is the input-side frame (the paper's `V_r` or `Aᵀ`), `b_t ∈ R^{r_out×out}`
the output-side frame (`U_rᵀ` or `Bᵀ`) and `Core_t` the paper-layout core, one of

    dense     an r_out×r_in matrix            (LoRA-XS, LoRA-SB, SLoRA/NLoRA/IntTune, LaMDA)
    diag      a vector                        (SVFit, SALT head, KaSA)
    sparse    values on fixed positions Ω     (SVFT plain/banded/random/top-k)
    lowrank   a product X@Y                   (SALT tail LoRA)
    identity  no core (a plain `a@b` term)    (SALT with an unprojected LoRA)

The paper-layout update is `ΔW = Σ_t s_t · B_t Core_t A_t` (`B_t = b_tᵀ`, `A_t = a_tᵀ`). The
factored path never builds `ΔK`: `x@K' = x@K_base + Σ_t s_t · core(x@a_t) @ b_t`, which costs
`O(in·r_in + core + r_out·out)` per token and term.

`frames(w, r)` computes the SVD frames in kernel layout: the SVD of `K = V Σ Uᵀ` gives
`a = V_r` and `b = U_rᵀ` directly (`W = U Σ Vᵀ` in the papers' `(out, in)` layout).

Registry names: `lora_xs`, `lora_sb`, `svft`, `svfit`, `salt`, `kasa`, `slora`, `nlora`,
`inttune` (alias: `nlora` with `train_factors=False`), `lamda`, `lamda_pp`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.adapter import Adapter
from jpeft.methods.base import Ranked, kaiming_uniform, require
from jpeft.registry import register, register_alias

CORE_KINDS = ("dense", "diag", "sparse", "lowrank", "identity")


# ============================================================================ the skeleton
class Term(NamedTuple):
    """One `s · a @ Coreᵀ @ b` term (kernel layout; see the module docstring)."""

    a: jax.Array            # (in, r_in)
    core: Any               # dense (r_out, r_in) | diag (r,) | sparse values (nnz,) | (x, y) | None
    b: jax.Array            # (r_out, out)
    kind: str = "dense"
    scale: Any = 1.0
    idx: Any = None         # sparse: (rows, cols), paper-layout positions of the values in Core


def core_apply(term: Term, t: jax.Array) -> jax.Array:
    """`t @ Coreᵀ` over the last axis of `t` (`(..., r_in) -> (..., r_out)`)."""
    kind, core = term.kind, term.core
    if kind == "dense":
        return t @ core.T
    if kind == "diag":
        return t * core
    if kind == "sparse":
        rows, cols = term.idx
        out = jnp.zeros(t.shape[:-1] + (term.b.shape[0],), jnp.result_type(t, core))
        return out.at[..., rows].add(t[..., cols] * core)
    if kind == "lowrank":
        x, y = core
        return (t @ y.T) @ x.T
    if kind == "identity":
        return t
    raise ValueError(f"unknown core kind {kind!r}; expected one of {CORE_KINDS}")


def core_matrix(term: Term) -> jax.Array:
    """The dense paper-layout core (`r_out × r_in`) of a term (tests, export)."""
    r_in = term.a.shape[1]
    return core_apply(term, jnp.eye(r_in, dtype=term.a.dtype)).T


def _upcast_term(term: Term) -> Term:
    up = lambda x: None if x is None else linalg.upcast(jnp.asarray(x))  # noqa: E731
    core = tuple(up(c) for c in term.core) if term.kind == "lowrank" else up(term.core)
    return term._replace(a=linalg.upcast(jnp.asarray(term.a)), b=linalg.upcast(jnp.asarray(term.b)), core=core)


def delta(terms: list[Term]) -> jax.Array:
    """`ΔK = Σ_t s_t · a_t @ Core_tᵀ @ b_t`, in at least float32."""
    out = None
    for term in map(_upcast_term, terms):
        d = term.scale * (core_apply(term, term.a) @ term.b)
        out = d if out is None else out + d
    if out is None:
        raise ValueError("svdcore.delta: no terms")
    return out


def apply(x: jax.Array, base: jax.Array, terms: list[Term]) -> jax.Array:
    """`x @ (K_base + ΔK)` without building `ΔK` (the family's factored form)."""
    y = x @ base
    for term in terms:
        y = y + term.scale * (core_apply(term, x @ term.a) @ term.b)
    return y


def frames(key: jax.Array | None, m: jax.Array, rank: int | None = None, niter: int | None = None,
           part: str = "top") -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVD frames of a kernel-layout matrix `m ≈ a @ diag(sigma) @ b` (fp32 or wider).

    `a = V_r (in×r)`, `sigma = σ_r`, `b = U_rᵀ (r×out)` for the paper-layout `W = mᵀ = UΣVᵀ`.
    `rank=None` keeps all `min(in, out)` components; `part="bottom"` the smallest `rank`;
    `niter` (top part only) switches to a randomised SVD with that many power iterations.
    """
    k = min(m.shape)
    rank = k if rank is None else rank
    if part == "top" and niter is not None:
        if key is None:
            raise ValueError("frames: a randomised SVD (niter set) needs a key")
        return linalg.randomized_svd(key, m, rank, niter=niter)
    u, s, vh = linalg.svd(m)
    if part == "top":
        return u[:, :rank], s[:rank], vh[:rank]
    if part == "bottom":
        return u[:, k - rank:], s[k - rank:], vh[k - rank:]
    raise ValueError(f"part must be 'top' or 'bottom', got {part!r}")


def get(node: Adapter, name: str) -> jax.Array:
    """An array of the node wherever it lives (trainable or frozen)."""
    return node.train[name] if name in node.train else node.frozen[name]


def _check_niter(self) -> None:
    require(self.svd_niter is None or (isinstance(self.svd_niter, int) and self.svd_niter >= 0),
            f"{self.name}: svd_niter must be None or a non-negative int, got {self.svd_niter!r}")


@dataclasses.dataclass(frozen=True)
class SVDCore(Ranked):
    """Base of the family: subclasses build the node in `create` and list its `terms`."""

    def terms(self, node: Adapter) -> list[Term]:
        raise NotImplementedError

    def delta(self, node: Adapter, rng: jax.Array | None = None) -> jax.Array:
        """`ΔK = K' − K_base` in at least float32."""
        return delta(self.terms(node))

    def matmul(self, node, x, rng=None):
        return apply(x, node.base, self.terms(node))

    # Methods whose base is a deterministic function of the weight alone (a truncation or a
    # residual) rebuild it by running `create` again: the same code path gives the same bits.
    @property
    def rewrites_base(self) -> bool:
        return False

    def rebuild_base(self, w, node):
        if not self.rewrites_base:
            return w
        return self.create(jax.random.PRNGKey(0), w).base

    def penalty(self, nodes: list[Adapter]) -> jax.Array | None:
        """The sum of `node_penalty` over the config's nodes (KaSA, SALT), or None."""
        terms = [t for t in (self.node_penalty(n) for n in nodes) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def node_penalty(self, node: Adapter) -> jax.Array | None:
        """A loss regulariser of one node (a 2-D matrix slice), or None."""
        return None


def _scale(alpha: float | None, rank: int) -> float:
    """`α/r`, or 1 when `alpha` is None (LoRA-XS / LoRA-SB reference: α = r)."""
    return 1.0 if alpha is None else alpha / rank


# ============================================================================ LoRA-XS / LoRA-SB
@register
@dataclasses.dataclass(frozen=True)
class LoRAXS(SVDCore):
    """LoRA-XS: `W' = W + s·U_r R Σ_r V_rᵀ`; only `R ∈ R^{r×r}` trains.

    Frames: `a = V_rΣ_r` (singular values folded into the input side), `b = U_rᵀ`, frozen; the
    base is not modified. `R ~ N(0, init_std²)` (reference 1e-5, so `W' ≈ W` at init; 0 gives
    exactly `W`). `alpha=None` means `s = 1` (the math-tuning reference's α = r), else `s = α/r`.
    `svd_niter=None` uses an exact SVD (the current reference); an int uses a randomised SVD.
    """

    name = "lora_xs"
    paper = "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters, Bałazy et al. 2024"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """`init_std=0` gives `R = 0` (`W' = W`); the reference's 1e-5 is near, not at, it."""
        return self.init_std == 0.0

    rank: int = 8
    alpha: float | None = None  # type: ignore[assignment]  # None: α = r (the reference); `scale` handles it
    init_std: float = 1e-5
    svd_niter: int | None = None

    def validate(self) -> None:
        super().validate()
        _check_niter(self)
        require(self.init_std >= 0, f"{self.name}: init_std must be >= 0, got {self.init_std!r}")

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def create(self, key, w, calib=None):
        k_svd, k_core = jax.random.split(key)
        v, sig, ut = frames(k_svd, w, self.rank, self.svd_niter)
        core = self.init_std * jax.random.normal(k_core, (self.rank, self.rank), sig.dtype)
        return self.node(w, train={"core": core.astype(w.dtype)},
                         frozen={"a": (v * sig).astype(w.dtype), "b": ut.astype(w.dtype)})

    def terms(self, node):
        return [Term(node.frozen["a"], node.train["core"], node.frozen["b"], "dense", self.scale)]


@register
@dataclasses.dataclass(frozen=True)
class LoRASB(SVDCore):
    """LoRA-SB: LoRA-XS's architecture initialised from a gradient estimate.

    `calib` is the accumulated gradient `Ĝ` (kernel layout, shaped like the weight). The simulated
    first update `ΔK₁ = −step_size · sign(Ĝ)` (`sign=False`: `−step_size · Ĝ`, a plain SGD step) is
    factored by a rank-r SVD `ΔK₁ ≈ V_r S_r U_rᵀ`: `a = V_r`, `b = U_rᵀ` (orthonormal, frozen),
    `R = S_r` (trainable). So `B R A = best_rank_r(ΔW₁)` and, with the reference's `α = r`
    (`alpha=None`, `s = 1`), `W' = W + best_rank_r(ΔW₁)` at init — *not* the identity, by design.
    The reference's step size is the first warm-up learning rate, `lr / (warmup_ratio · steps)`
    (`lora_sb_step_size`).
    """

    name = "lora_sb"
    paper = "LoRA-SB: Initialization Using Update Approximation, Ponkshe, Singhal et al. 2024"
    identity_at_init = False
    needs_calib = True

    rank: int = 8
    alpha: float | None = None  # type: ignore[assignment]  # None: α = r (the reference); `scale` handles it
    step_size: float = 1e-3
    sign: bool = True
    svd_niter: int | None = None

    def validate(self) -> None:
        super().validate()
        _check_niter(self)
        require(self.step_size > 0, f"{self.name}: step_size must be > 0, got {self.step_size!r}")

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def first_update(self, grad: jax.Array) -> jax.Array:
        """The simulated first full fine-tuning update `ΔK₁` (kernel layout, fp32)."""
        g = linalg.upcast(grad)
        return -self.step_size * (jnp.sign(g) if self.sign else g)

    def create(self, key, w, calib=None):
        v, sig, ut = frames(key, self.first_update(calib), self.rank, self.svd_niter)
        return self.node(w, train={"core": jnp.diag(sig).astype(w.dtype)},
                         frozen={"a": v.astype(w.dtype), "b": ut.astype(w.dtype)})

    def terms(self, node):
        return [Term(node.frozen["a"], node.train["core"], node.frozen["b"], "dense", self.scale)]


def lora_sb_step_size(lr: float, warmup_ratio: float, total_steps: int) -> float:
    """The reference's `η_eff = lr / (warmup_ratio · total_steps)` (first step of a linear warm-up)."""
    return lr / (warmup_ratio * total_steps)


# ============================================================================ SVFit
@register
@dataclasses.dataclass(frozen=True)
class SVFit(SVDCore):
    """SVFit (**[UNVERIFIED details]**): train only the top-r singular values,
    `W' = U_r diag(σ_r + δ) V_rᵀ + W_tail = W + U_r diag(δ) V_rᵀ`, `δ = 0` at init (r parameters)."""

    name = "svfit"
    paper = "SVFit, Sun et al. 2024"

    rank: int = 8
    svd_niter: int | None = None

    def validate(self) -> None:
        super().validate()
        _check_niter(self)

    def create(self, key, w, calib=None):
        v, sig, ut = frames(key, w, self.rank, self.svd_niter)
        return self.node(w, train={"delta": jnp.zeros((self.rank,), w.dtype)},
                         frozen={"a": v.astype(w.dtype), "b": ut.astype(w.dtype)})

    def terms(self, node):
        return [Term(node.frozen["a"], node.train["delta"], node.frozen["b"], "diag")]


# ============================================================================ KaSA
@register
@dataclasses.dataclass(frozen=True)
class KaSA(SVDCore):
    """KaSA: drop the r smallest singular components of `W` ("noisy
    knowledge") from the frozen base, `W_world = U_{[:k−r]} Σ V_{[:k−r]}ᵀ`, and train
    `W' = W_world + s·B diag(d) A` (`A` Kaiming-uniform, `B = 0`, `d ~ N(0, 1)`), so `W' = W_world`
    at init (not `W`).

    `node_penalty(node) = β‖d‖² + γ(‖BᵀB − I_r‖_F + ‖AAᵀ − I_r‖_F)`, summed over the nodes by
    `jpeft.penalty(params)` (add it to the loss). `reference=True` is the reference code
    **[CODE≠PAPER]**: keep `in − r`
    components (not `min(in, out) − r`) and penalise `AᵀA` (in×in), `BBᵀ` (out×out).
    """

    name = "kasa"
    paper = "KaSA: Knowledge-Aware Singular-Value Adaptation, Wang et al., ICLR 2025"
    identity_at_init = False

    rank: int = 8
    alpha: float = 8.0
    beta: float = 1e-4
    gamma: float = 1e-3
    reference: bool = False

    def validate(self) -> None:
        super().validate()

    @property
    def rewrites_base(self) -> bool:
        return True

    def kept(self, w) -> int:
        """Number of singular components kept in `W_world`."""
        n, k = w.shape[0], min(w.shape)
        return min(k, n - self.rank) if self.reference else k - self.rank

    def world(self, w):
        v, sig, ut = frames(None, w)
        keep = self.kept(w)
        return ((v[:, :keep] * sig[:keep]) @ ut[:keep]).astype(w.dtype)

    def create(self, key, w, calib=None):
        n, m = w.shape
        ka, kd = jax.random.split(key)
        dt = w.dtype
        return self.node(self.world(w), train={
            "a": kaiming_uniform(ka, (n, self.rank), n, jnp.float32).astype(dt),
            "d": jax.random.normal(kd, (self.rank,)).astype(dt),
            "b": jnp.zeros((self.rank, m), dt)})

    def terms(self, node):
        return [Term(node.train["a"], node.train["d"], node.train["b"], "diag", self.scale)]

    def node_penalty(self, node):
        a, b, d = (linalg.upcast(node.train[k]) for k in ("a", "b", "d"))
        if self.reference:
            orth = jnp.linalg.norm(b.T @ b - jnp.eye(b.shape[1])) + jnp.linalg.norm(a @ a.T - jnp.eye(a.shape[0]))
        else:  # paper layout BᵀB = b bᵀ, AAᵀ = aᵀa (r×r)
            orth = jnp.linalg.norm(b @ b.T - jnp.eye(self.rank)) + jnp.linalg.norm(a.T @ a - jnp.eye(self.rank))
        return self.beta * jnp.sum(d * d) + self.gamma * orth


# ============================================================================ SLoRA / NLoRA / IntTune
@register
@dataclasses.dataclass(frozen=True)
class SLoRA(SVDCore):
    """SLoRA: three-factor LoRA `W' = W + s·B N A`, all trainable; `A`, `N`
    Kaiming-uniform, `B = 0` (so `W' = W`)."""

    name = "slora"
    paper = "SLoRA (with NLoRA), Guo, Chang and Wu, EMNLP Findings 2025"

    rank: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        super().validate()

    def create(self, key, w, calib=None):
        n, m = w.shape
        ka, kn = jax.random.split(key)
        dt = w.dtype
        r = self.rank
        return self.node(w, train={"a": kaiming_uniform(ka, (n, r), n, jnp.float32).astype(dt),
                                   "core": kaiming_uniform(kn, (r, r), r, jnp.float32).astype(dt),
                                   "b": jnp.zeros((self.rank, m), dt)})

    def terms(self, node):
        return [Term(get(node, "a"), node.train["core"], get(node, "b"), "dense", self.scale)]


@register
@dataclasses.dataclass(frozen=True)
class NLoRA(SLoRA):
    """NLoRA: Nyström-style init of the three factors from the weight itself,
    `A = W[:r, :]`, `B = W[:, :r]`, `N = W[:r, :r]⁺` (paper: `B N A` is the Nyström approximation of
    `W`), with the residual `W − s·BNA` as base so `W' = W` at init.

    `nystrom="reference"` uses `N = W[:r, :r]` (the reference's pseudo-inverse line is commented
    out) and `residual=False` keeps `W` as base (the reference), so `W' ≠ W` at init
    **[CODE≠PAPER]**. `train_factors=False` trains only `N` (IntTune, registry `inttune`).
    """

    name = "nlora"
    paper = "NLoRA: Nyström-initiated Low-Rank Adaptation, Guo, Chang and Wu, EMNLP Findings 2025"

    nystrom: str = "pinv"
    residual: bool = True
    train_factors: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.nystrom in ("pinv", "reference"), f"{self.name}: nystrom must be 'pinv' or 'reference'")

    @property
    def rewrites_base(self) -> bool:
        return self.residual

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """Only the residual base cancels `s·BNA` (`residual=False` keeps `W`: `W' = W + s·BNA`)."""
        return self.residual

    def factors(self, w):
        """`(a, core, b)` in kernel layout: `a = Aᵀ = K[:, :r]`, `b = Bᵀ = K[:r, :]`, `core = N`."""
        r = self.rank
        k = linalg.upcast(w)
        core = k[:r, :r].T                                      # W_II (paper layout)
        if self.nystrom == "pinv":
            core = jnp.linalg.pinv(core)
        return k[:, :r], core, k[:r, :]

    def create(self, key, w, calib=None):
        dt = w.dtype
        a, core, b = (x.astype(dt) for x in self.factors(w))
        node = self.node(w, train={"core": core}, frozen={})
        parts = {"a": a, "b": b}
        node = node.replace(train={**node.train, **parts}) if self.train_factors else node.replace(frozen=parts)
        if self.residual:
            node = node.replace(base=(linalg.upcast(w) - self.delta(node)).astype(dt))
        return node


register_alias("inttune", "nlora", train_factors=False,
               paper="IntTune: Guo, Chang and Wu, EMNLP Findings 2025 (with NLoRA)")
