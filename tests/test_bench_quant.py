"""`experiments/bench_quant.py`'s targets on a small batch of the reference workload: QLoRA keeps no
full-precision copy of the model alive (its step temporaries exceed fp32 LoRA's by at most one
layer's fp32 kernels), and the frozen bytes shrink as the formats say."""

from experiments import bench_quant


def test_qlora_step_temporaries_stay_within_one_layer_of_fp32_lora():
    rows = {r["config"]: r for r in bench_quant.table(batch=4, seq=128, rank=16,   # 512 tokens: the one-matmul CPU form
                                                      rows=("lora_fp32", "qlora_nf4"))}
    allowance = bench_quant.layer_kernels_mb()
    assert allowance == (4 * 512 * 512 + 3 * 512 * 1376) * 4 / 2 ** 20   # q, k, v, o, gate, up, down of one layer
    lora, qlora = rows["lora_fp32"], rows["qlora_nf4"]
    assert qlora["temp_mb"] - lora["temp_mb"] <= allowance, rows
    assert qlora["peak_mb"] < lora["peak_mb"] and qlora["opt_mb"] == lora["opt_mb"], rows   # the same trainable tree
    # The projections hold 12.6M of the 14.8M parameters; embeddings and norms stay fp32.
    assert qlora["frozen_mb"] < 0.27 * lora["frozen_mb"], rows
