"""The full-size benchmark, run end to end on the mid-size preset (the 7B's input shapes, ~30 M parameters)."""

import json
from pathlib import Path

import pytest

from benchmarks.full_size import run
from nextchat import cpu_kernels


@pytest.mark.slow
def test_full_size_benchmark_runs_each_mode_in_a_fresh_process(tmp_path: Path) -> None:
    summary = run("bench-mid", tmp_path / "ckpt", ["bfloat16", "int8"], prompt=16, steps=2, results=tmp_path)
    assert len(list((tmp_path / "ckpt").glob("pytorch_model-0000?-of-00004.bin"))) == 4
    assert json.loads(Path(summary["results_file"]).read_text())["modes"] == summary["modes"]
    bf16, int8 = summary["modes"]
    for mode in (bf16, int8):
        assert mode["missing_keys"] == 0 and mode["unexpected_keys"] == 0
        assert mode["load_s"] > 0 and mode["plain_read_s"] > 0
        assert mode["peak_rss_anon_gib"] * 2**30 > mode["weight_bytes"] > 0
        assert len(mode["decode_step_ms"]) == 2 and mode["decode_floor_ms_per_token"] > 0
        # The floor: the median of the reads of the step's own tensors taken between the steps.
        assert len(mode["read_floor_step_ms"]) == 3
        assert mode["decode_floor_ms_per_token"] == pytest.approx(sorted(mode["read_floor_step_ms"])[1])
        assert mode["decode_over_floor"] == pytest.approx(
            mode["decode_median_ms_per_token"] / mode["decode_floor_ms_per_token"]
        )
        assert mode["attention"] == "nextchat_sdpa"
        assert mode["prefill"]["blocks_run"] == 1 and mode["prefill"]["estimate_s"] > mode["prefill"]["measured_s"]
    # The vision stages are the same in every mode: timed in the first one only.
    assert bf16["sam_encoder"]["blocks_run"] == 2 and bf16["sam_encoder"]["blocks_total"] == 4  # windowed + global
    assert bf16["segment_estimate_s"] > bf16["sam_encoder"]["estimate_s"]
    assert "sam_encoder" not in int8
    assert bf16["dtypes"]["llm"] == "torch.bfloat16" and int8["quantize"] == "int8"
    assert int8["step_read_bytes"] < 0.7 * bf16["step_read_bytes"]  # int8 layer linears: about half
    assert int8["int8_kernel"] == (cpu_kernels.unavailable_reason() or "nextchat.cpu_kernels")
    # A second run finds the complete checkpoint and does not rewrite it.
    again = run("bench-mid", tmp_path / "ckpt", [], prompt=4, steps=1, results=tmp_path)
    assert "write_s" not in again and again["modes"] == []
