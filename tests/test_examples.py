"""The Linen and NNX examples run end to end and the loss falls."""

import jax
import numpy as np

from experiments import example_linen, example_nnx, toy_task


def test_linen_example_lora_loss_falls_and_merge_matches():
    out = example_linen.run(steps=150, log=None)
    losses = out["losses"]
    assert np.mean(losses[-10:]) < 0.35 * losses[0]
    assert out["count"].trainable == 8 * (128 + 128) + 8 * (128 + 16)
    assert out["after"] < 0.35 * out["before"]


def test_nnx_example_dora_loss_falls_and_merged_state_builds_a_module():
    out = example_nnx.run(steps=150, log=None)
    losses = out["losses"]
    assert np.mean(losses[-10:]) < 0.35 * losses[0]
    assert out["count"].trainable == 8 * (128 + 128) + 128 + 8 * (128 + 16) + 16
    x = toy_task.batch(jax.random.PRNGKey(12345))  # the evaluation batch of pretrain_and_adapt
    _, teacher_b = toy_task.teachers()
    np.testing.assert_allclose(float(toy_task.mse(out["model"](x), teacher_b(x))), out["after"], rtol=1e-5)
    assert out["after"] < 0.35 * out["before"]
