"""experiments/bench_scale.py on a small Llama: the runner's compiled step costs each device 1/N
of the FLOPs over `data`, all-reduces exactly the trainable gradient bytes (against full
fine-tuning's full gradient), HD-PiSSA sends less than data-parallel LoRA at the same total rank,
and FSDP holds 1/N of the frozen weights per device."""

import pytest

from experiments import bench_scale
from jpeft.models.llama import LlamaConfig


@pytest.mark.slow
def test_per_device_costs_scale_with_the_mesh():
    small = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=4)
    rows = bench_scale.table(batch=8, seq=16, rank=8, config=small, sizes=(1, 2, 8))
    by = lambda section: [r for r in rows if r["section"].startswith(section)]  # noqa: E731
    dp = by("data parallel LoRA")
    assert [r["mesh"] for r in dp] == [f"data={n},fsdp=1,tensor=1" for n in (1, 2, 8)]
    for r in dp:
        assert abs(r["flops×N/flops(1)"] - 1) < 0.05, r
    for r in dp[1:]:
        assert abs(r["all_reduce/grad"] - 1) < 0.05, r
    (full,) = by("full fine-tuning")
    assert full["all_reduce_mb"] >= full["grad_mb"] > 10 * dp[-1]["grad_mb"]
    (hd,) = by("HD-PiSSA")
    assert 0 < hd["all_gather_mb"] < dp[-1]["all_reduce_mb"] and hd["all_reduce_mb"] < 1e-3
    fsdp = by("FSDP LoRA")
    assert [r["mesh"] for r in fsdp][-1] == "data=1,fsdp=8,tensor=1"
    for r in fsdp:
        assert abs(r["frozen/(frozen(1)/N)"] - 1) < 0.05, r
