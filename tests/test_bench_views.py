"""experiments/bench_views.py on a small batch: factored LoRA on DenseGeneral attention and on an
`nn.scan` stack costs the FLOPs of a hand-written factored LoRA (within 3%), builds no dense delta
(the materialised path does), and needs no more FLOPs or peak bytes than qwix's LoRA; the coverage
table runs every layer kind factored."""

import pytest

from experiments import bench_views


@pytest.mark.slow
def test_factored_lora_matches_the_hand_written_floor_and_qwix():
    rows = {(r["variant"], r["config"]): r for r in bench_views.table(batch=1, seq=16, rank=4, with_qwix=True)}
    for variant in ("dg", "scan"):
        fact, hand = rows[(variant, "lora_factored")], rows[(variant, "lora_hand")]
        assert abs(fact["gflops"] / hand["gflops"] - 1.0) < 0.03
        assert fact["dense_deltas"] == 0
        assert rows[(variant, "lora_materialised")]["dense_deltas"] > 0
        assert fact["gflops"] <= rows[(variant, "qwix_lora")]["gflops"] * 1.001
        assert fact["peak_mb"] < rows[(variant, "full")]["peak_mb"]
        assert fact["peak_mb"] <= rows[(variant, "qwix_lora")]["peak_mb"] * 1.001


def test_coverage_table_factors_every_layer_kind():
    rows = bench_views.coverage()
    assert [r["layer"] for r in rows] == [layer for layer, _ in bench_views.COVERAGE]
    assert all(r["jpeft_lora"] == "factored" for r in rows), rows
