"""`experiments/bench_zoo.py`: a row per method with the figures the issue asks for, and the error in
the row (not a crash) for a method the benchmark cannot build."""

import pytest

from experiments import bench_zoo, benchlib


@pytest.mark.slow
def test_rows_have_counts_flops_bytes_and_a_fit():
    model, params, ids = benchlib.reference_setup(batch=2, seq=32)
    lora = bench_zoo.row("lora", model, params, ids, rank=4, fit_steps=30)
    adalora = bench_zoo.row("adalora", model, params, ids, rank=4, fit_steps=30)  # needs total_step
    per_layer = 4 * (512 + 512) + 2 * (512 + 1376) + (1376 + 512)   # r·(in+out) over q, k, v, o, gate, up, down
    assert lora["trainable"] == 4 * 4 * per_layer                       # rank 4, 4 layers
    assert lora["gflops"] > 0 and lora["peak_mb"] > 0 and adalora["gflops"] > 0
    assert 0 < lora["fit_loss_ratio"] < 1 and 0 < adalora["fit_loss_ratio"] < 1   # the planted fit improves
