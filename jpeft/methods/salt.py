"""SALT (Elsayed et al. 2025): an SVD-core method (family B), scale and shift on the top singular values
plus a LoRA on the remaining subspace."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.errors import leaf_error
from jpeft.methods.base import kaiming_uniform, require
from jpeft.methods.svdcore import SVDCore, Term, frames
from jpeft.registry import register


@register
@dataclasses.dataclass(frozen=True)
class SALT(SVDCore):
    """SALT: trainable scale `α` and shift `β` on the top-r singular values and
    a LoRA on the remaining subspace:

        W' = U_r diag(σ_r ⊙ α + β) V_rᵀ + W_tail + ΔW_lora,   ΔW_lora = s·U_tail X Y V_tailᵀ

    `tail_projected=True` (the reference `BioMedIA-MBZUAI/SALT`, `SALTLinear`: the LoRA lives in
    the tail's singular basis, `X ∈ R^{(k−r)×q}`, `Y ∈ R^{q×(k−r)}`); False: a free LoRA
    `s·B A` on the whole weight. Init `α = 1`, `β = 0`, `X = 0`, `Y` Kaiming-uniform, so `W' = W`.
    `reference=True` is the reference code's form **[CODE≠PAPER?]**: `X, Y ~ 0.01·N(0, 1)` (not
    identity at init) and `W' = U·relu(S_new)·Vᵀ` with the ReLU over the whole modified
    singular-value matrix (a dense k×k core); it needs `tail_projected=True`.
    `node_penalty` is the reference regulariser `‖diag(σ_r⊙α+β) − diag(σ_r)‖_F + ‖s·XY‖_F`
    (`jpeft.penalty(params)` sums it).
    """

    name = "salt"
    paper = "SALT: Singular-value Adaptation with Low-rank Transformation, Elsayed et al. 2025"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """The paper form starts at `W`; `reference=True` draws `X, Y ~ 0.01·N(0, 1)`."""
        return not self.reference

    rank: int = 4
    lora_rank: int = 8
    lora_scale: float = 1.0
    tail_projected: bool = True
    reference: bool = False

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.lora_rank, int) and self.lora_rank >= 1,
                f"{self.name}: lora_rank must be a positive int, got {self.lora_rank!r}")
        require(not self.reference or self.tail_projected,
                f"{self.name}: reference=True is the reference code's tail-projected form; keep tail_projected=True")

    def check(self, path, w):
        super().check(path, w)
        if self.rank >= min(w.shape):
            raise leaf_error(path, w.shape, w.dtype, f"rank {self.rank} must be < min(in, out) = {min(w.shape)} "
                             "(the LoRA adapts the remaining singular subspace)")
        limit = min(w.shape) - self.rank if self.tail_projected else min(w.shape)
        if self.lora_rank > limit:
            where = (f"the tail subspace's dimension min(in, out) - rank = {limit}" if self.tail_projected
                     else f"min(in, out) = {limit}")
            raise leaf_error(path, w.shape, w.dtype, f"lora_rank {self.lora_rank} must be <= {where}")

    def create(self, key, w, calib=None):
        n, m = w.shape
        r, q = self.rank, self.lora_rank
        kx, ky = jax.random.split(key)
        keep = None if self.tail_projected else r
        v, sig, ut = frames(None, w, keep)
        dt = w.dtype
        t = v.shape[1] - r
        train = {"scale": jnp.ones((r,), dt), "shift": jnp.zeros((r,), dt)}
        if self.reference:
            train["x"] = (0.01 * jax.random.normal(kx, (t, q))).astype(dt)
            train["y"] = (0.01 * jax.random.normal(ky, (q, t))).astype(dt)
        elif self.tail_projected:
            train["x"] = jnp.zeros((t, q), dt)
            train["y"] = kaiming_uniform(ky, (q, t), t, jnp.float32).astype(dt)
        else:
            train["lora_a"] = kaiming_uniform(ky, (n, q), n, jnp.float32).astype(dt)
            train["lora_b"] = jnp.zeros((q, m), dt)
        return self.node(w, train=train, frozen={"a": v.astype(dt), "b": ut.astype(dt), "sigma": sig.astype(dt)})

    def head_core(self, node):
        """`σ_r ⊙ α + β − σ_r`: the change of the top-r singular values."""
        sig = node.frozen["sigma"][: self.rank]
        return sig * node.train["scale"] + node.train["shift"] - sig

    def terms(self, node):
        r, a, b = self.rank, node.frozen["a"], node.frozen["b"]
        if self.reference:
            return [Term(a, self.reference_core(node), b, "dense")]
        head = Term(a[:, :r], self.head_core(node), b[:r], "diag")
        if self.tail_projected:
            return [head, Term(a[:, r:], (node.train["x"], node.train["y"]), b[r:], "lowrank", self.lora_scale)]
        return [head, Term(node.train["lora_a"], None, node.train["lora_b"], "identity", self.lora_scale)]

    def reference_core(self, node):
        """`relu(S_new) − diag(σ)` (k×k): the reference's clamp of the modified spectrum."""
        r, sig = self.rank, node.frozen["sigma"]
        x, y = node.train["x"], node.train["y"]
        s_new = jnp.diag(jnp.concatenate([sig[:r] * node.train["scale"] + node.train["shift"], sig[r:]]))
        s_new = s_new.at[r:, r:].add(self.lora_scale * (x @ y))
        return jax.nn.relu(s_new) - jnp.diag(sig)

    def node_penalty(self, node):
        lora = self.lora_scale * (node.train["x"] @ node.train["y"]) if self.tail_projected else \
            self.lora_scale * (node.train["lora_a"] @ node.train["lora_b"])
        return jnp.linalg.norm(self.head_core(node)) + jnp.linalg.norm(lora)
