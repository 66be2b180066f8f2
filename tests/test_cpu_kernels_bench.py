"""The CPU-kernel benchmark runs end to end on a small sample and records every figure it names."""

import json
from pathlib import Path

import pytest

from benchmarks import cpu_kernels as bench
from nextchat import cpu_kernels


@pytest.mark.slow
def test_the_cpu_kernel_benchmark_records_its_figures(tmp_path: Path) -> None:
    if reason := cpu_kernels.unavailable_reason():
        pytest.skip(f"the CPU kernels cannot run here: {reason}")
    bench.main(["--layers", "1", "--repeats", "1", "--results", str(tmp_path)])
    (result,) = tmp_path.glob("cpu_kernels-*.json")
    summary = json.loads(result.read_text())
    assert set(summary["int8_layers"]["gb_s"]) == {"read", "nextchat", "torch_int8pack", "fbgemm"}
    errors = summary["int8_relative_error"]
    assert errors["nextchat_f32_activations"] < 0.01 < errors["fbgemm_7bit_activations"]  # the outliers' cost
    assert set(summary["attention_ms"]) == {"nextchat", "batched_products", "sdpa"}
    assert set(summary["head_ms"]) == {"read", "nextchat", "torch"}
