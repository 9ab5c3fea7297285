"""The conformance table: one row per method configuration, run through the shared properties in
`test_conformance.py` (docs/design.md §3). A new method adds one row here (and its oracle tests)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import jax
import jax.numpy as jnp

import jpeft


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    registry: str                 # the jpeft.methods() name this row covers
    method: jpeft.Method
    tolerance: str = "exact"      # identity at init (where `method.identity_at_init`): "exact" or "close" (fp32)
    calib: bool = False           # init needs a calibration gradient tree
    factored: bool = True         # method.matmul has a factored form

    def __str__(self):
        return self.id


CORE_CASES = [
    Case("lora", "lora", jpeft.LoRA(rank=4, alpha=8)),
    Case("lora_gaussian", "lora", jpeft.LoRA(rank=4, alpha=8, init="gaussian")),
    Case("rslora", "lora", jpeft.LoRA(rank=4, alpha=8, rslora=True)),
    Case("lora_dropout", "lora", jpeft.LoRA(rank=4, alpha=8, dropout=0.25)),
    Case("lora_olora", "lora", jpeft.LoRA(rank=4, alpha=8, init="olora"), tolerance="close"),
    Case("lora_orthogonal", "lora", jpeft.LoRA(rank=4, alpha=8, init="orthogonal"), tolerance="close"),
    Case("lora_loftq", "lora", jpeft.LoRA(rank=4, alpha=8, init="loftq", loftq_iter=2)),   # quantised base
    Case("pissa", "pissa", jpeft.PiSSA(rank=4, alpha=4), tolerance="close"),
    Case("pissa_randomized", "pissa", jpeft.PiSSA(rank=4, alpha=8, svd_niter=4), tolerance="close"),
    Case("lora_ga", "lora_ga", jpeft.LoRAGA(rank=4, alpha=8), tolerance="close", calib=True),
    Case("ffa_lora", "ffa_lora", jpeft.FFALoRA(rank=4, alpha=8)),
    Case("dora", "dora", jpeft.DoRA(rank=4, alpha=8), tolerance="close"),
    Case("dora_pissa", "dora", jpeft.DoRA(rank=4, alpha=4, init="pissa"), tolerance="close"),
    Case("periodic_lora", "periodic_lora", jpeft.PeriodicLoRA(rank=4, alpha=8, period=2)),
    Case("full", "full", jpeft.Full()),
]


def _family_rows() -> list[Case]:
    import tests.conformance_rows as pkg

    rows: list[Case] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        rows.extend(importlib.import_module(f"{pkg.__name__}.{info.name}").ROWS)
    return rows


CASES = CORE_CASES + _family_rows()

# ---------------------------------------------------------------------------------------------
# The shared toy model: two adapted kernels of non-square shapes (48×32, r=4),
# one plain bias and one untargeted kernel.

TARGET = r"blk/(q_proj|v_proj)/kernel"
IN, HID = 32, 48


def base_params(seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"blk": {"q_proj": {"kernel": jax.random.normal(k[0], (IN, HID)) / IN ** 0.5,
                               "bias": jnp.zeros((HID,))},
                    "v_proj": {"kernel": jax.random.normal(k[1], (HID, IN)) / HID ** 0.5},
                    "o_proj": {"kernel": jax.random.normal(k[2], (IN, IN)) / IN ** 0.5}}}


def forward(p, x):
    h = jnp.tanh(x @ p["blk"]["q_proj"]["kernel"] + p["blk"]["q_proj"]["bias"])
    return (h @ p["blk"]["v_proj"]["kernel"]) @ p["blk"]["o_proj"]["kernel"]


def inputs(seed: int = 1, batch: int = 16):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, IN))


def targets(seed: int = 2, batch: int = 16):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, IN))


def loss(p, x, y):
    return jnp.mean(jnp.square(forward(p, x) - y))


def calib_grads(params):
    """The gradient of the toy loss w.r.t. the base weights (LoRA-GA's calibration input)."""
    return jax.grad(loss)(params, inputs(), targets())


def spec_for(case: Case) -> jpeft.Spec:
    return jpeft.Spec({TARGET: case.method})


def adapted(case: Case, seed: int = 0):
    params = base_params()
    spec = spec_for(case)
    calib = calib_grads(params) if case.calib else None
    return params, spec, jpeft.init(jax.random.PRNGKey(seed), params, spec, calib=calib)
