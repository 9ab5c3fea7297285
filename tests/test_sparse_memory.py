"""The sparse path keeps a SpIEL training step O(k) (issue "Sparse fine-tuning with O(k) memory").

A full training step (loss, backward, Adam update, `jpeft.after_step` with the drop/regrow hook)
of a stack of Dense layers, all adapted by SpIEL at density 1%, compiled by XLA and measured with
`memory_analysis()` and `cost_analysis()` (deterministic), against
- the plain forward/backward of the frozen model (gradient w.r.t. the input): the floor;
- the dense-scatter path (`path="dense"`: `K' = K + scatter(idx, val)`, then one GEMM).

The sparse path (`jpeft.factored`, gather path chunked over tokens) adds less than a fraction of
ONE `(m, n)` matrix of temporaries over the floor for the whole stack, so no adapted matrix gets an
`(m, n)` float temporary; the dense-scatter path adds about one per matrix (`K'`, kept for the
backward) and the `2·T·m·n` FLOPs per matrix of the dense gradient `∂L/∂K'` that it gathers
`∂L/∂val` from. XLA counts a while-loop body once, so the sparse term's own FLOPs (`6·T·k` per
matrix: forward, input gradient, value gradient) are added analytically.
"""

import jax
import optax

import jpeft
from jpeft.methods import sparse as sp
from tests.stack_model import LAYERS, MODEL, PARAMS, TOKENS, WIDTH, X

MATRIX_BYTES = WIDTH * WIDTH * 4
DENSITY = 0.01
K = int(DENSITY * WIDTH * WIDTH)


def figures(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled.memory_analysis().temp_size_in_bytes, cost["flops"]


def plain():
    return figures(jax.grad(lambda p, x: MODEL.apply({"params": p}, x), argnums=1), PARAMS, X)


def training_step(path):
    spec = jpeft.Spec({r"layer_\d/kernel": sp.SpIEL(density=DENSITY, path=path)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), PARAMS, spec))
    run = jpeft.factored(MODEL.apply, spec)
    tx = optax.adam(1e-3)

    def step(trainable, frozen, opt_state, x):
        grads = jax.grad(lambda t: run({"params": jpeft.combine(t, frozen)}, x))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        params, opt_state = jpeft.after_step(jpeft.combine(optax.apply_updates(trainable, updates), frozen),
                                             opt_state, spec, step=opt_state[0].count, key=jax.random.PRNGKey(0),
                                             grads=grads)
        return jpeft.split(params)[0], opt_state

    return figures(step, trainable, frozen, tx.init(trainable), X)


def test_sparse_path_has_no_mn_temporary_and_dense_scatter_path_has_one_per_matrix():
    base_bytes, base_flops = plain()
    sparse_bytes, sparse_flops = training_step("sparse")
    dense_bytes, dense_flops = training_step("dense")
    sparse_extra = (sparse_bytes - base_bytes) / MATRIX_BYTES
    dense_extra = (dense_bytes - base_bytes) / MATRIX_BYTES
    assert sparse_extra < 0.5, f"sparse path: {sparse_extra:.2f} (m, n) matrices of extra temporaries"
    assert dense_extra > 0.75 * LAYERS, f"dense-scatter path: only {dense_extra:.2f} extra (m, n) matrices"
    dense_grad_flops = 2 * TOKENS * WIDTH * WIDTH * LAYERS
    sparse_term_flops = 6 * TOKENS * K * LAYERS
    assert sparse_flops + sparse_term_flops < base_flops + 0.1 * dense_grad_flops
    assert dense_flops - sparse_flops > 0.9 * dense_grad_flops
