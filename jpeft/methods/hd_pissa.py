"""HD-PiSSA, high-rank distributed PiSSA (Wang et al., EMNLP 2025; sharding: docs/scale.md).

Each of `K` data-parallel devices owns a different slice `J_d = [d·r, (d+1)·r)` of the principal
subspace of `K`: its adapter is the PiSSA factor pair of those singular triplets. Every step each
device takes a local optimizer step on its own micro-batch and the devices' summed updates are
folded into the (replicated) weight, so one step's update has rank up to `2·K·r` instead of `2·r`.
The distributed step itself is `jpeft.distributed.hd_pissa_step`; on one device the same fold runs
as a step hook (`jpeft.after_step`).

Node layout (kernel layout, `K ∈ R^{in×out}`): the `K` device frames are stacked on a leading
device axis — `train["a"] ∈ R^{K×in×r}`, `train["b"] ∈ R^{K×r×out}` (sharded over the data axis:
device `d` holds slice `d`) and the reference point of the same frames `frozen["a0"]`,
`frozen["b0"]` (replicated: every device needs all frames for the fold). `base` is the weight
itself — no residual is subtracted, it *is* the merged model — and

    K' = base + s·Σ_d [(a_d − a0_d)·b_d + a0_d·(b_d − b0_d)]  =  base + s·Σ_d (a_d·b_d − a0_d·b0_d),

which is exactly `base` while the adapters sit at their reference point (the zero-valued adapter
of the reference code, whose gradients are `∂L/∂a_d = s·G·b_dᵀ`, `∂L/∂b_d = s·a_dᵀ·G`). On one
device a node is therefore PiSSA on the slices it holds: with its `K` slices stacked, PiSSA of rank
`K·r` with the residual `base − s·Σ a0_d b0_d`; inside the distributed step, where each device sees
only its own slice, PiSSA on `J_d`.

Factors follow the PEFT PiSSA convention (`s·a0_d·b0_d = U_{J_d} Σ_{J_d} V_{J_d}ᵀ`) and the fold is
scaled by `s`, so the fold is the exact change of the per-leaf model; with the reference default
`s = 1` (α = r) this is the reference code exactly (its fold is unscaled and its factors are not
divided by `s`, which only differ when `s ≠ 1`).

`frames` chooses what happens to the adapters after a step:
- `"fixed"` (reference code, default): the adapters never move; every step is a fresh PiSSA step
  from the SVD frames, folded into the weight;
- `"trained"` (our reading of the paper's "aggregates their delta updates collectively on W"):
  each device's adapter keeps its own updates (`a_d ← a_d + δa_d`, like ordinary PiSSA training)
  while the weight receives everyone's; the reference point moves with the adapters.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jpeft import linalg
from jpeft.errors import leaf_error
from jpeft.hooks import HookResult
from jpeft.methods.base import Ranked, require
from jpeft.methods.lowrank import pissa_factors
from jpeft.registry import register

FRAMES = ("fixed", "trained")


@register
@dataclasses.dataclass(frozen=True)
class HDPiSSA(Ranked):
    """HD-PiSSA adapter config.

    rank:       per-device rank `r` (reference default 16).
    alpha:      scale `s = α/r` (reference: `α // r`, 1 by default).
    devices:    `K`, the size of the data-parallel mesh axis the frames are spread over;
                `K·r <= min(in, out)`.
    frames:     "fixed" (reference code) or "trained" (paper reading); see the module docstring.
    svd_niter:  None for an exact SVD (reference), k for a randomised SVD with k power iterations.
    """

    name = "hd_pissa"
    paper = "HD-PiSSA: High-Rank Distributed PiSSA, Wang et al., EMNLP 2025"
    checkpoint_base = True  # the distributed step folds every update into the base
    per_device_leading = True  # `a`, `b` (and frames) are `(devices, ...)`, sharded over the mesh axis

    rank: int = 16
    alpha: float = 16.0
    devices: int = 8
    frames: str = "fixed"
    svd_niter: int | None = None

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.devices, int) and self.devices >= 1,
                f"{self.name}: devices must be a positive int, got {self.devices!r}")
        require(self.frames in FRAMES, f"{self.name}: frames must be one of {FRAMES}, got {self.frames!r}")
        require(self.svd_niter is None or self.svd_niter >= 0, f"{self.name}: svd_niter must be None or >= 0")

    def check(self, path, w):
        super().check(path, w)
        total = self.devices * self.rank
        if total > min(w.shape):
            raise leaf_error(path, w.shape, w.dtype, f"rank {self.rank} on each of {self.devices} devices needs "
                                                     f"devices*rank = {total} <= min(in, out) = {min(w.shape)}")

    def create(self, key, w, calib=None):
        k, r = self.devices, self.rank
        a, b = pissa_factors(key, w, k * r, self.scale, self.svd_niter)  # (in, K·r), (K·r, out)
        a = a.reshape(w.shape[0], k, r).transpose(1, 0, 2).astype(w.dtype)
        b = b.reshape(k, r, w.shape[1]).astype(w.dtype)
        return self.node(w, train={"a": a, "b": b}, frozen={"a0": a, "b0": b})

    def delta(self, node, rng=None):
        a, b = linalg.upcast(node.train["a"]), linalg.upcast(node.train["b"])
        a0, b0 = linalg.upcast(node.frozen["a0"]), linalg.upcast(node.frozen["b0"])
        return self.scale * (jnp.einsum("kir,kro->io", a - a0, b) + jnp.einsum("kir,kro->io", a0, b - b0))

    def matmul(self, node, x, rng=None):
        a, b, a0, b0 = node.train["a"], node.train["b"], node.frozen["a0"], node.frozen["b0"]
        moved = jnp.einsum("...kr,kro->...o", jnp.einsum("...i,kir->...kr", x, a - a0), b)
        held = jnp.einsum("...kr,kro->...o", jnp.einsum("...i,kir->...kr", x, a0), b - b0)
        return x @ node.base + self.scale * (moved + held)

    # ----------------------------------------------------------------- single-device fold
    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        """The fold without a mesh (`jpeft.after_step`): `base ← base + s·Σ_d(a_d b_d − a0_d b0_d)`,
        then `frames="fixed"` puts the adapters back on their frames and `"trained"` moves the
        reference point to the adapters. The model is unchanged; the optimizer state is kept.
        A single-device loop with this hook is HD-PiSSA with every device seeing the same batch
        (`jpeft.distributed.hd_pissa_step` gives each device its own micro-batch)."""
        return HookResult([self.fold(n) for n in nodes], moments, restarted=None)

    def fold(self, node):
        base = (linalg.upcast(node.base) + self.delta(node)).astype(node.base.dtype)
        if self.frames == "fixed":
            return node.replace(base=base, train={**node.train, "a": node.frozen["a0"], "b": node.frozen["b0"]})
        return node.replace(base=base, frozen={**node.frozen, "a0": node.train["a"], "b0": node.train["b"]})

    # ----------------------------------------------------------------- layout (jpeft.sharding)
    def sharding_layout(self, node):
        """Roles of each array's dimensions: "stack" is the data-parallel device axis."""
        return {"train": {"a": ("stack", "in", None), "b": ("stack", None, "out")},
                "frozen": {"a0": (None, "in", None), "b0": (None, None, "out")}}
