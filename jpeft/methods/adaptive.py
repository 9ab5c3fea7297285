"""Families B + J (SVD-core, step hooks): adaptive-rank adapters, SoRA and AdaLoRA.

Both keep an explicit per-component scalar between two factors and learn *which* components
survive: AdaLoRA by masking the least important singular values to a global budget, SoRA by a
proximal (soft-threshold) step on a gate. The step hooks mask (set entries to zero, shapes never
change; the hooks explicitly leave the optimizer moments untouched); `jpeft.compact` slices the
dead components away at export.

Kernel layout (Flax `K ∈ R^{in×out}`): `a ∈ R^{in×r}` is the paper's right factor transposed
(AdaLoRA's `Qᵀ`, PEFT `lora_A.T`), `b ∈ R^{r×out}` the left factor transposed (AdaLoRA's `Pᵀ`,
PEFT `lora_B.T`), so `ΔK = s·a·diag(e)·b = (s·P diag(λ) Q)ᵀ`.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import linalg
from jpeft.adapter import Adapter, is_adapter
from jpeft.hooks import HookResult
from jpeft.methods.base import Ranked, kaiming_uniform, require
from jpeft.registry import register


# ------------------------------------------------------------------------------------ shared
def gated_delta(a, gate, b, scale) -> jax.Array:
    """`s·a·diag(gate)·b` in at least fp32."""
    a, gate, b = (linalg.upcast(t) for t in (a, gate, b))
    return scale * ((a * gate) @ b)


def gated_matmul(x, base, a, gate, b, scale) -> jax.Array:
    """`x@K + s·((x@a) ⊙ gate)@b`: O(tokens·r·(in+out)) for the adapter, no `ΔK`."""
    return x @ base + scale * (((x @ a) * gate) @ b)


def _keep_components(node: Adapter, keep: np.ndarray, gate_key: str, state_keys: dict[str, int]) -> Adapter:
    """Slice rank components: columns of `a`, rows of `b`, entries of the gate (and the state
    arrays whose rank axis is given in `state_keys`)."""
    idx = np.flatnonzero(keep)
    train = dict(node.train)
    train["a"] = train["a"][:, idx]
    train["b"] = train["b"][idx, :]
    train[gate_key] = train[gate_key][idx]
    state = {k: (jnp.take(v, idx, axis=state_keys[k]) if k in state_keys else v) for k, v in node.state.items()}
    return node.replace(train=train, state=state)


def _safe_fro(m: jax.Array) -> jax.Array:
    """Frobenius norm whose gradient is 0 (not NaN) at `m == 0`."""
    ss = jnp.sum(jnp.square(m))
    return jnp.sqrt(jnp.maximum(ss, jnp.finfo(ss.dtype).tiny))


# ------------------------------------------------------------------------------------ AdaLoRA
@register
@dataclasses.dataclass(frozen=True)
class AdaLoRA(Ranked):
    """AdaLoRA (Zhang et al. 2023): `K' = K + (α/r₀)·a·diag(e)·b`, all of `a`
    (`Qᵀ`), `e` (`λ`) and `b` (`Pᵀ`) trainable; init `e = 0`, `a, b ~ N(0, 0.02²)` (PEFT).

    The step hook (`jpeft.after_step(..., grads=g)`; it needs the gradients) keeps per entry the
    EMA sensitivity `Ī ← β1·Ī + (1−β1)·|θ·g|` and uncertainty `Ū ← β2·Ū + (1−β2)·|I − Ī|`, scores
    triplet i by `S_i = s(e_i) + mean_j s(a_ji) + mean_j s(b_ij)` with `s = Ī·Ū`, and on every
    `delta_t`-th step of the budget phase `tinit < t ≤ total_step − tfinal` zeroes the `e_i` whose
    score is among the `b₀ − b(t)` smallest over *every* node of this config (cubic schedule `b(t)`
    from `b₀ = Σ r₀` to `b_T = target_r · #matrices`). Masked `e_i` stay trainable until the final
    phase (`t > total_step − tfinal`), where the last mask (`state["keep"]`) is re-applied every
    step. Moments are not touched. `step` is PEFT's `global_step` (updates applied so far).

    The scale follows PEFT: `(alpha if alpha > 0 else r₀) / r₀` (PEFT divides by `r₀ + 1e-5`; the
    difference is a relative 1e-5/r₀). The regulariser `(1/L)·Σ γ·(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F)` with
    `P = bᵀ`, `Q = aᵀ`, γ = `orth_reg_weight`, over the config's L matrices is its `penalty`
    (`jpeft.penalty(params)`; add it to the training loss); `orth_reg_per_matrix=True` divides by
    the number of factors `2L` instead, as HF PEFT's `regu_loss / num_param` does.
    """

    name = "adalora"
    paper = "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, Zhang et al., ICLR 2023"
    rank_options = ("init_r",)

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    init_std: float = 0.02
    orth_reg_per_matrix: bool = False

    def validate(self) -> None:
        super().validate()
        n = self.name
        require(isinstance(self.target_r, int) and 0 <= self.target_r <= self.init_r,
                f"{n}: target_r must be an int in [0, init_r={self.init_r}], got {self.target_r!r}")
        require(isinstance(self.total_step, int) and self.total_step > 0,
                f"{n}: total_step (the number of training steps) must be a positive int, got {self.total_step!r}")
        total_step = cast(int, self.total_step)  # required just above
        require(self.tinit >= 0 and self.tfinal >= 0, f"{n}: tinit and tfinal must be >= 0")
        require(self.tinit < total_step - self.tfinal,
                f"{n}: tinit={self.tinit} < total_step - tfinal = {total_step - self.tfinal} is needed "
                f"for a budgeting phase")
        require(self.delta_t >= 1, f"{n}: delta_t must be >= 1, got {self.delta_t}")
        require(0.0 < self.beta1 < 1.0 and 0.0 < self.beta2 < 1.0, f"{n}: beta1 and beta2 must be in (0, 1)")
        require(self.orth_reg_weight >= 0.0, f"{n}: orth_reg_weight must be >= 0, got {self.orth_reg_weight}")

    @property
    def rank(self) -> int:
        """The initial rank `r₀` (`init_r`)."""
        return self.init_r

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / self.init_r

    def create(self, key, w, calib=None):
        n, m = w.shape
        r = self.init_r
        ka, kb = jax.random.split(key)
        a = (self.init_std * jax.random.normal(ka, (n, r), jnp.float32)).astype(w.dtype)
        b = (self.init_std * jax.random.normal(kb, (r, m), jnp.float32)).astype(w.dtype)
        zeros = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
        state = {"ipt_a": zeros((n, r)), "unc_a": zeros((n, r)), "ipt_e": zeros((r,)), "unc_e": zeros((r,)),
                 "ipt_b": zeros((r, m)), "unc_b": zeros((r, m)), "keep": jnp.ones((r,), bool)}
        return self.node(w, train={"a": a, "e": jnp.zeros((r,), w.dtype), "b": b}, state=state)

    def delta(self, node, rng=None):
        return gated_delta(node.train["a"], node.train["e"], node.train["b"], self.scale)

    def matmul(self, node, x, rng=None):
        return gated_matmul(x, node.base, node.train["a"], node.train["e"], node.train["b"], self.scale)

    # ------------------------------------------------------------------ budget
    def budget(self, step, b0: int, b_target: int):
        """`(b(t), masking due at t)`: PEFT `budget_schedule` (cubic, floored) plus the forced
        final mask at `t = total_step − tfinal`."""
        t = jnp.asarray(step)
        ti, final = self.tinit, cast(int, self.total_step) - self.tfinal  # an int: `validate` requires it
        frac = 1.0 - (t - ti).astype(jnp.float32) / float(final - ti)
        cubic = jnp.floor((b0 - b_target) * frac ** 3 + b_target).astype(jnp.int32)
        budget = jnp.where(t <= ti, b0, jnp.where(t > final, b_target, cubic))
        due = (t > ti) & (t <= final) & ((t % self.delta_t == 0) | (t == final))
        return budget, due

    @staticmethod
    def triplet_scores(state) -> jax.Array:
        """`S_i = s(e_i) + mean_in s(a_·i) + mean_out s(b_i·)` with `s = Ī·Ū`."""
        s = {k: state[f"ipt_{k}"] * state[f"unc_{k}"] for k in ("a", "e", "b")}
        return s["e"] + jnp.mean(s["a"], axis=0) + jnp.mean(s["b"], axis=1)

    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        if grads is None:
            raise ValueError("adalora's step hook scores parameters by |θ·∂L/∂θ|: pass the gradients of "
                             "the step, jpeft.after_step(params, opt_state, spec, step=..., key=..., grads=g)")
        t = jnp.asarray(step)
        final = self.total_step - self.tfinal
        update = t < final
        states = []
        for node, g in zip(nodes, grads):
            st = dict(node.state)
            for k in ("a", "e", "b"):
                ipt = jnp.abs(linalg.upcast(node.train[k]) * linalg.upcast(g[k])).astype(jnp.float32)
                ema = self.beta1 * st[f"ipt_{k}"] + (1.0 - self.beta1) * ipt
                unc = self.beta2 * st[f"unc_{k}"] + (1.0 - self.beta2) * jnp.abs(ipt - ema)
                st[f"ipt_{k}"] = jnp.where(update, ema, st[f"ipt_{k}"])
                st[f"unc_{k}"] = jnp.where(update, unc, st[f"unc_{k}"])
            states.append(st)

        ranks = [node.train["e"].shape[0] for node in nodes]
        b0, b_target = sum(ranks), self.target_r * len(nodes)
        budget, due = self.budget(t, b0, b_target)
        scores = [self.triplet_scores(st) for st in states]
        n_masked = b0 - budget
        if b0 > 0:
            ordered = jnp.sort(jnp.concatenate(scores))
            threshold = ordered[jnp.clip(n_masked - 1, 0, b0 - 1)]
        else:
            threshold = jnp.zeros((), jnp.float32)

        new_nodes = []
        for node, st, score in zip(nodes, states, scores):
            keep_now = jnp.where(n_masked > 0, score > threshold, True)
            keep = jnp.where(due, keep_now, st["keep"])
            apply_mask = due | (t > final)
            e = node.train["e"]
            e = jnp.where(apply_mask & ~keep, jnp.zeros_like(e), e)
            # The scores restart once the final mask is fixed (PEFT `reset_ipt`).
            st = {k: (jnp.where(t == final, jnp.zeros_like(v), v) if k.startswith(("ipt_", "unc_")) else v)
                  for k, v in st.items()}
            st["keep"] = keep
            new_nodes.append(node.replace(train={**node.train, "e": e}, state=st))
        return HookResult(new_nodes, moments)

    # ------------------------------------------------------------------ export
    def compact(self, node: Adapter) -> Adapter:
        """Drop the triplets with `e_i == 0` (they contribute nothing); the scale stays
        `α/r₀`. Eager only (the result's shapes depend on the values)."""
        keep = np.asarray(node.train["e"]) != 0
        axes = {"ipt_a": 1, "unc_a": 1, "ipt_e": 0, "unc_e": 0, "ipt_b": 0, "unc_b": 0, "keep": 0}
        return _keep_components(node, keep, "e", axes)

    # ------------------------------------------------------------------ loss
    def penalty(self, nodes: list[Adapter]) -> jax.Array | None:
        """`γ·(1/L)·Σ (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F)` over the L matrices (`1/(2L)` with
        `orth_reg_per_matrix`, PEFT's `regu_loss / num_param`)."""
        if not nodes or self.orth_reg_weight == 0.0:
            return None
        total = jnp.zeros((), jnp.float32)
        for node in nodes:
            a, b = linalg.upcast(node.train["a"]), linalg.upcast(node.train["b"])
            eye = jnp.eye(a.shape[1], dtype=a.dtype)
            total = total + _safe_fro(a.T @ a - eye) + _safe_fro(b @ b.T - eye)
        return self.orth_reg_weight * total / (2 * len(nodes) if self.orth_reg_per_matrix else len(nodes))


def rank_pattern(params) -> dict[str, list[bool]]:
    """`{path: [e_i != 0 ...]}` for every AdaLoRA / SoRA node (the effective ranks)."""
    from jpeft.paths import leaves_with_paths

    out = {}
    for path, leaf in leaves_with_paths(params, is_leaf=is_adapter):
        if isinstance(leaf, Adapter) and isinstance(leaf.method, (AdaLoRA, SoRA)):
            key = "e" if isinstance(leaf.method, AdaLoRA) else "g"
            out[path] = [bool(v) for v in np.asarray(leaf.train[key]) != 0]
    return out


# ------------------------------------------------------------------------------------ SoRA
LAMBDA_SCHEDULES = (None, "linear", "log_linear", "exp_linear")
THRESHOLDS = ("paper", "reference")


@register
@dataclasses.dataclass(frozen=True)
class SoRA(Ranked):
    """SoRA (Ding et al. 2023): `K' = K + s·a·diag(g)·b`, `s = α/r`; init `a`
    Kaiming-uniform (bound 1/√in), `b = 0`, gate `g ~ N(0, 1)`; all trainable.

    The step hook applies the proximal step of the L1 penalty to the gate after each optimizer
    step, `g ← sign(g)·max(|g| − ξ, 0)`, with `ξ = gate_lr·λ(t)` (paper, `threshold="paper"`) or
    `ξ = λ(t)` (reference code, `threshold="reference"`: not scaled by the learning rate). Moments
    are not touched. `λ(t)` is `sparse_lambda`, or with a `lambda_schedule` ("linear",
    "log_linear", "exp_linear" from `sparse_lambda` to `max_lambda` in `lambda_num` stages, as the
    reference `SparseAdamW._build_lambda_list`) stage `clip((t − lambda_start) // lambda_every,
    0, lambda_num − 1)`. The reference also adds `λ₁·mean|g|` (over the config's gate entries) to the
    loss: `gate_l1_weight` = λ₁ (0, the default, adds nothing) makes it this config's `penalty`
    (`jpeft.penalty(params)`).
    """

    name = "sora"
    paper = "SoRA: Sparse Low-Rank Adaptation, Ding et al., EMNLP 2023"

    rank: int = 8
    alpha: float = 16.0
    sparse_lambda: float = 1e-3
    threshold: str = "paper"
    gate_lr: float = 1e-3
    lambda_schedule: str | None = None
    max_lambda: float | None = None
    lambda_num: int | None = None
    lambda_every: int | None = None
    lambda_start: int = 0
    gate_l1_weight: float = 0.0

    def validate(self) -> None:
        n = self.name
        super().validate()
        require(self.sparse_lambda >= 0.0, f"{n}: sparse_lambda must be >= 0, got {self.sparse_lambda}")
        require(self.gate_l1_weight >= 0.0, f"{n}: gate_l1_weight must be >= 0, got {self.gate_l1_weight}")
        require(self.threshold in THRESHOLDS, f"{n}: threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        require(self.gate_lr > 0.0, f"{n}: gate_lr must be > 0, got {self.gate_lr}")
        require(self.lambda_schedule in LAMBDA_SCHEDULES,
                f"{n}: lambda_schedule must be one of {LAMBDA_SCHEDULES}, got {self.lambda_schedule!r}")
        if self.lambda_schedule is not None:
            require(self.max_lambda is not None and self.lambda_num is not None and self.lambda_num >= 1
                    and self.lambda_every is not None and self.lambda_every >= 1,
                    f"{n}: lambda_schedule={self.lambda_schedule!r} needs max_lambda, lambda_num >= 1 and "
                    f"lambda_every >= 1")
            max_lambda = cast(float, self.max_lambda)  # required just above
            require(self.lambda_schedule != "exp_linear" or (self.sparse_lambda > 0 and max_lambda > 0),
                    f"{n}: the exp_linear schedule needs sparse_lambda > 0 and max_lambda > 0")

    def create(self, key, w, calib=None):
        n, m = w.shape
        ka, kg = jax.random.split(key)
        a = kaiming_uniform(ka, (n, self.rank), n, jnp.float32).astype(w.dtype)
        g = jax.random.normal(kg, (self.rank,), jnp.float32).astype(w.dtype)
        return self.node(w, train={"a": a, "g": g, "b": jnp.zeros((self.rank, m), w.dtype)})

    def delta(self, node, rng=None):
        return gated_delta(node.train["a"], node.train["g"], node.train["b"], self.scale)

    def matmul(self, node, x, rng=None):
        return gated_matmul(x, node.base, node.train["a"], node.train["g"], node.train["b"], self.scale)

    # ------------------------------------------------------------------ proximal step
    def lambdas(self) -> tuple[float, ...]:
        """The λ stages (one entry without a schedule)."""
        lam, top, num = self.sparse_lambda, self.max_lambda, self.lambda_num
        if self.lambda_schedule is None:
            return (float(lam),)
        top, num = cast(float, top), cast(int, num)  # `validate` requires both with a lambda_schedule
        if self.lambda_schedule == "linear":
            values = np.linspace(lam, top, num)
        elif self.lambda_schedule == "log_linear":
            values = np.log(np.linspace(np.exp(lam), np.exp(top), num))
        else:
            values = np.exp(np.linspace(np.log(lam), np.log(top), num))
        return tuple(float(v) for v in values)

    def sparse_lambda_at(self, step) -> jax.Array:
        values = jnp.asarray(self.lambdas(), jnp.float32)
        if self.lambda_schedule is None:
            return values[0]
        every = cast(int, self.lambda_every)  # `validate` requires it with a lambda_schedule
        stage = jnp.clip((jnp.asarray(step) - self.lambda_start) // every, 0, len(values) - 1)
        return values[stage]

    def threshold_at(self, step) -> jax.Array:
        lam = self.sparse_lambda_at(step)
        return lam * self.gate_lr if self.threshold == "paper" else lam

    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        xi = self.threshold_at(step)
        new_nodes = []
        for node in nodes:
            g = node.train["g"]
            shrunk = jnp.sign(g) * jnp.maximum(jnp.abs(g) - xi.astype(g.dtype), 0)
            new_nodes.append(node.replace(train={**node.train, "g": shrunk.astype(g.dtype)}))
        return HookResult(new_nodes, moments)

    def compact(self, node: Adapter) -> Adapter:
        """Drop the components with `g_i == 0` (rank = nnz(g)). Eager only."""
        return _keep_components(node, np.asarray(node.train["g"]) != 0, "g", {})

    def penalty(self, nodes: list[Adapter]) -> jax.Array | None:
        """The reference's `λ₁·mean|g|` over every gate entry of the config's nodes
        (`gate_l1_weight` = λ₁), or None when λ₁ = 0."""
        if not nodes or self.gate_l1_weight == 0.0:
            return None
        gates = jnp.concatenate([jnp.ravel(linalg.upcast(n.train["g"])) for n in nodes])
        return self.gate_l1_weight * jnp.mean(jnp.abs(gates))


