"""The method protocol every adapter method implements.

A method is a frozen dataclass of options (hashable, static under `jit`). In Flax kernel layout
(`K ∈ R^{in×out}`, `y = x @ K`; papers write `(out, in)`) it provides:

- `check(path, w)`: raise `AdapterError` naming the path, shape and constraint if `w` cannot be
  adapted;
- `create(key, w, calib)` → `Adapter` (trainable leaves, frozen buffers, state, possibly rewritten
  base);
- `materialise(node, rng)` → the effective kernel `K'`;
- `matmul(node, x, rng)` → `x @ K'` without building `K'` where the method has a cheaper factored
  form (`None` otherwise); `matmul_t` (`x @ K'ᵀ`, a tied embedding's `attend`) and `lookup`
  (`K'[indices]`, an embedding lookup) likewise. `jpeft.factored` calls them per matrix slice
  of a viewed kernel;
- `validate()`: value constraints on the options, at construction. Their types are checked
  before it, from the dataclass annotations, by one mechanism for every method
  (`check_option_types`: bool is bool, int is int and not bool, floats finite, str is str,
  `X | None` also None; numpy scalars are normalised to Python ones);
- `create_shared` (optional): model-level state shared by every leaf of this config;
- `step_hook` (optional): a pure, jit-able rewrite after each optimizer step (see `jpeft.hooks`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter
from jpeft.errors import OptionError, leaf_error
from jpeft.quant import QTensor, QuantConfig


@dataclasses.dataclass(frozen=True)
class Method:
    name: ClassVar[str] = ""
    #: The paper the method implements (title or short name, authors, venue and year), shown in
    #: `docs/methods.md`; every registered method sets it.
    paper: ClassVar[str] = ""
    version: ClassVar[int] = 1
    #: Whether `materialise(init(w)) == w` (the conformance suite checks it).
    identity_at_init: ClassVar[bool] = True
    #: Whether the method adapts a matrix (N-D kernels then need a `jpeft.View`); False for methods
    #: that train the whole leaf, whatever its shape.
    adapts_matrix: ClassVar[bool] = True
    #: Whether nodes keep the frozen base (False: the whole leaf is trainable, as in `full`).
    has_base: ClassVar[bool] = True
    #: Whether the node's arrays carry one slice per device on axis 0 (HD-PiSSA's frames): inside
    #: `shard_map` each device sees its own share of that axis.
    per_device_leading: ClassVar[bool] = False
    #: Accepts a quantised base (`jpeft.quantize`): the effective weight is the (dequantised) base
    #: plus the method's own terms. A config that `rewrites_base` is refused on a quantised leaf
    #: (init on the full-precision tree, then quantise the adapted tree: QPiSSA).
    quantized_base: ClassVar[bool] = False
    #: Its factored `matmul` contracts with a quantised base itself (`jpeft.quant.qmatmul`); when
    #: False a quantised base is materialised (dequantised under remat) instead.
    quantized_matmul: ClassVar[bool] = False
    #: Whether the step hook wants the dense kernel gradient `∂L/∂K'` under `grads[...]["dense"]`
    #: (`jpeft.hooks.value_and_hook_grads`): the engine then adds a zero probe under
    #: `frozen["probe"]` that `materialise` and `matmul` must add to the kernel / output.
    needs_dense_grads: ClassVar[bool] = False
    #: Whether `init` needs a calibration gradient (`jpeft.init(..., calib=grads)`).
    needs_calib: ClassVar[bool] = False
    #: Pure step hook `(nodes, moments, *, step, keys, grads) -> HookResult` over all the nodes
    #: that use this config (see `jpeft.hooks`), or None.
    step_hook: ClassVar[Any] = None

    @property
    def rewrites_base(self) -> bool:
        """Whether `create` returns a new base (a residual `K − s·a@b`: PiSSA, OLoRA, LoRA-GA, ...)
        that `rebuild_base` recreates from the original weights."""
        return False

    @property
    def base_quant(self) -> QuantConfig | None:
        """The quantisation the rewritten base is stored in (LoftQ chooses a quantised base with
        its factors), or None. `jpeft.init` and checkpoint restore quantise the base `create` /
        `rebuild_base` return with it (re-quantising a dequantised code is exact for fp32)."""
        return None

    def __post_init__(self) -> None:
        check_option_types(self)
        self.validate()

    # ----------------------------------------------------------------- to override
    def validate(self) -> None:
        """Value constraints on the options (raise with `require`); types are already checked."""

    def check(self, path: str, w: jax.Array) -> None:
        """Default constraint: a floating-point matrix."""
        require_float_matrix(path, w)

    def create(self, key: jax.Array, w: jax.Array, calib: jax.Array | None = None) -> Adapter:
        raise NotImplementedError

    def materialise(self, node: Adapter, rng: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError

    def matmul(self, node: Adapter, x: jax.Array, rng: jax.Array | None = None) -> jax.Array | None:
        return None

    def matmul_t(self, node: Adapter, x: jax.Array, rng: jax.Array | None = None) -> jax.Array | None:
        """`x @ K'ᵀ` without building `K'` (a tied embedding's `attend`), or None."""
        return None

    def lookup(self, node: Adapter, indices: jax.Array, rng: jax.Array | None = None) -> jax.Array | None:
        """`K'[indices]` (rows: an embedding lookup) without building `K'`, or None."""
        return None

    def conv(self, node: Adapter, x: jax.Array, conv_base, conv_to, rng: jax.Array | None = None):
        """A convolution with `K'` without building `K'`, or None. `node` is the matrix view
        (inputs: spatial and input-feature axes; outputs: output features); `conv_base(x)` is the
        layer's convolution with the base kernel and `conv_to(x, cols)` with the kernel whose
        output features are the columns of `cols` (`(in, c)`); both put features last."""
        return None

    #: Whether checkpoints must store the node's base (a step hook rewrites it); otherwise the base
    #: is rebuilt from the original weight with `rebuild_base`.
    checkpoint_base: ClassVar[bool] = False

    def rebuild_base(self, w: jax.Array, node: Adapter) -> jax.Array:
        """The node's base from the original weight `w` (identity unless `create` rewrote it)."""
        return w

    #: Whether training puts the merged weight on a quantisation grid (L4Q, LR-QAT): then
    #: `merged_quantized(node)` gives it for `jpeft.merge(..., requantize=True)`.
    quantized_merge: ClassVar[bool] = False

    def merged_quantized(self, node: Adapter) -> QTensor:
        """The merged weight as a `QTensor` whose dequantisation is `materialise(node)` exactly."""
        raise NotImplementedError

    def compact(self, node: Adapter) -> Adapter:
        """The node with the components its step hook masked off sliced away (AdaLoRA, SoRA), for
        export (`jpeft.compact`; eager: the shapes depend on the values). The merged weight must
        not change. The default keeps the node as it is."""
        return node

    @property
    def compacts(self) -> bool:
        """Whether `compact` may shrink this method's arrays (it is overridden)."""
        return self.overrides("compact")

    def overrides(self, hook: str) -> bool:
        """Whether this method's class overrides `Method.<hook>` (a protocol hook with a default:
        `compact`, `matmul`, `matmul_t`, `lookup`, `conv`, ...)."""
        return getattr(type(self), hook) is not getattr(Method, hook)

    def sharding_layout(self, node: Adapter) -> dict[str, dict[str, tuple[str | None, ...]]]:
        """`{part: {key: roles}}` for the arrays whose sharding does not follow the default rule
        (`a` follows the base's input axis, `b` its output axis; `jpeft.sharding`), one role per
        dimension: "in", "out", "stack" (a leading data-parallel device axis) or None
        (replicated). Empty by default."""
        return {}

    def penalty(self, nodes: list[Adapter]) -> jax.Array | None:
        """The loss regulariser of this config over all of its nodes (each a 2-D matrix slice),
        or None when it has none (the default). `jpeft.penalty(params)` sums it over every config
        of a tree; the training loss adds that."""
        return None

    def create_shared(self, key: jax.Array, leaves: list[tuple[str, jax.Array]]) -> tuple[dict, dict] | None:
        """Model-level state for all leaves using this config, as `(train, frozen)` dicts, or None.

        It is stored once (see `jpeft.shared`); while a node is evaluated its `train["shared"]` /
        `frozen["shared"]` hold it. A method may return `(train, frozen, per_leaf)` instead, where
        `per_leaf[i]` is a dict of frozen arrays merged into the node of `leaves[i]` (e.g. that
        leaf's index into stacked shared factors)."""
        return None

    # ----------------------------------------------------------------- shared
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def node(self, base, train=None, frozen=None, state=None) -> Adapter:
        return Adapter(base=base, train=dict(train or {}), frozen=dict(frozen or {}),
                       state=dict(state or {}), method=self)


@dataclasses.dataclass(frozen=True)
class Ranked(Method):
    """The shared part of the methods with rank options (the LoRA family, the SVD-core, bank and
    adaptive-rank methods, HD-PiSSA, GraLoRA, the QAT pair, SLTrain): the options named in
    `rank_options` are positive ints (`validate`) that fit every leaf, `1 <= r <= min(in, out)`
    (`check`, which also asks for a floating-point matrix); `scale` is `α/r`; the effective kernel
    is `K_base + ΔK` with `ΔK = delta(node)` computed in at least float32 (`materialise`).

    A subclass declares its own option fields (their defaults differ), lists its ranks in
    `rank_options`, and extends `validate` / `check` through `super()`; one whose scale or
    effective weight follows another rule overrides `scale` / `materialise`. `kaiming_uniform` is
    the standard init of a down-projection."""

    #: The option fields that are ranks.
    rank_options: ClassVar[tuple[str, ...]] = ("rank",)

    if TYPE_CHECKING:  # fields every subclass declares with its own default
        @property
        def rank(self) -> int: ...

        @property
        def alpha(self) -> float: ...

    def validate(self) -> None:
        for option in self.rank_options:
            value = getattr(self, option)
            require(value >= 1, f"{self.name}: {option} must be a positive int, got {value!r}")

    def check(self, path: str, w: jax.Array) -> None:
        require_float_matrix(path, w)
        for option in self.rank_options:
            require_rank(path, w, getattr(self, option))

    @property
    def scale(self) -> float:
        """`α/r`."""
        return self.alpha / self.rank

    def delta(self, node: Adapter, rng: jax.Array | None = None) -> jax.Array:
        """`ΔK = K' − K_base`, in at least float32."""
        raise NotImplementedError

    def materialise(self, node: Adapter, rng: jax.Array | None = None) -> jax.Array:
        return (node.base + self.delta(node, rng)).astype(node.base.dtype)


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """PyTorch's `kaiming_uniform_(a=√5)` (the nn.Linear / PEFT LoRA-A default): `U(±1/√fan_in)`."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def require_float_matrix(path: str, w: jax.Array) -> None:
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise leaf_error(path, w.shape, w.dtype, "expected a floating-point array")
    if w.ndim != 2:
        raise leaf_error(path, w.shape, w.dtype,
                         "expected a 2-D kernel (in, out); this method adapts matrices only")


def require_rank(path: str, w: jax.Array, rank: int) -> None:
    if not 1 <= rank <= min(w.shape):
        raise leaf_error(path, w.shape, w.dtype,
                         f"rank {rank} must satisfy 1 <= rank <= min(in, out) = {min(w.shape)}")


def require(cond: bool, message: str) -> None:
    """Validate a method option at construction time."""
    if not cond:
        raise OptionError(message)


def exclusive_options(config, names: tuple[str, ...], default: dict[str, Any]) -> dict[str, Any]:
    """`{option: value}` of the one option among `names` that is set (not None), or `default` when
    none is. Setting two is an `OptionError`: one never silently overrides the other."""
    given = {k: getattr(config, k) for k in names if getattr(config, k) is not None}
    if len(given) > 1:
        raise OptionError(f"{config.name}: set only one of {', '.join(names)} (they are alternative budgets); "
                          f"got {given}")
    return given or dict(default)


@functools.cache
def option_types(cls: type) -> dict[str, tuple[type, bool]]:
    """`{option: (scalar type, None allowed)}` from a method class's field annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
        scalars = [a for a in args if a is not type(None)]
        if len(scalars) != 1 or scalars[0] not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: option annotations must be bool, int, float or str "
                            f"(optionally | None), got {t!r}")
        out[f.name] = (scalars[0], len(scalars) != len(args))
    return out


_TYPE_WORDS = {bool: "a bool", int: "an int", float: "a finite float", str: "a string"}


def check_option_types(config) -> None:
    """Check (and normalise numpy scalars in) every option of a method config against its
    annotation; raise `OptionError` naming the method, option, value and the allowed type."""
    for name, (kind, nullable) in option_types(type(config)).items():  # type: ignore[arg-type]  # classes are hashable
        value = getattr(config, name)
        if value is None and nullable:
            continue
        ok, norm = _coerce(kind, value)
        if not ok:
            allowed = _TYPE_WORDS[kind] + (" or None" if nullable else "")
            raise OptionError(f"{config.name}: option {name!r} must be {allowed}, got {value!r} "
                              f"({type(value).__name__})")
        if norm is not value:
            object.__setattr__(config, name, norm)


def _coerce(kind: type, value) -> tuple[bool, Any]:
    is_bool = isinstance(value, (bool, np.bool_))
    if kind is bool:
        return is_bool, bool(value) if is_bool else value
    if kind is int:
        ok = isinstance(value, (int, np.integer)) and not is_bool
        return ok, int(value) if ok else value
    if kind is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not is_bool and math.isfinite(value)
        return ok, float(value) if ok and type(value) is not float else value
    return isinstance(value, str), value
