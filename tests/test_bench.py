"""The benchmark runs end to end on the tiny checkpoint and reports what it measured: the JSON, the plot, the table."""

import json

import torch

from benchmarks import bench
from mcp_server.runner import NextChatRunner, default_cpu_threads


def test_the_benchmark_alternates_both_paths_and_ends_with_the_ratio_line(tmp_path, capsys, monkeypatch) -> None:
    threads = torch.get_num_threads()
    model_thread_counts: set[int] = set()  # torch's thread count as the server's model thread sees it, each step
    real_step = NextChatRunner.step

    def step(self: NextChatRunner):
        model_thread_counts.add(torch.get_num_threads())
        return real_step(self)

    monkeypatch.setattr(NextChatRunner, "step", step)
    try:
        bench.main(
            ["--preset", "tiny", "--device", "cpu", "--concurrency", "1", "8", "--requests", "4",
             "--naive-requests", "2", "--rounds", "2", "--new-tokens", "4", "--out", str(tmp_path)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    [written] = list(tmp_path.glob("tiny-cpu-*.json"))
    report = json.loads(written.read_text())
    assert set(report) == {
        "preset", "model", "device", "device_name", "dtype", "torch", "transformers", "python", "commit", "date",
        "workload", "server", "rounds", "torch_threads", "results", "throughput_ratio_c8",
    }  # fmt: skip
    assert set(report["workload"]) == {
        "image_side_px", "prompt_text_tokens", "image_tokens", "new_tokens", "tools", "example_query"
    }  # fmt: skip
    point_keys = {
        "path", "concurrency", "requests", "wall_s", "throughput_rps", "latency_ms", "locate_ms", "segment_ms",
        "segmented_by", "peak_gpu_mib",
    }  # fmt: skip
    assert all(set(r) == point_keys and set(r["latency_ms"]) == {"p50", "p95"} for r in report["results"])
    plot = written.with_suffix(".png").read_bytes()
    assert plot.startswith(b"\x89PNG\r\n\x1a\n") and len(plot) > 10_000  # a drawn chart, not an empty file
    by_point = {(r["path"], r["concurrency"]): r for r in report["results"]}
    assert set(by_point) == {("naive", 1), ("batched", 1), ("batched", 8)}
    assert by_point["naive", 1]["requests"] == 2  # one a round
    assert by_point["batched", 1]["requests"] == 8  # 4 × callers a round, at least
    assert by_point["batched", 8]["requests"] == 64
    assert report["rounds"] == 2 and report["server"]["decode"] == "eager"
    assert all(r["throughput_rps"] > 0 for r in report["results"])
    ratio = by_point["batched", 8]["throughput_rps"] / by_point["naive", 1]["throughput_rps"]
    assert report["throughput_ratio_c8"] == round(ratio, 3)
    assert lines[-1] == f"throughput ratio at concurrency 8 (batched/naive): {ratio:.2f}"
    # The batched path runs with the count its header prints (torch keeps one per thread: set in the model thread).
    assert model_thread_counts == {default_cpu_threads()} == {report["torch_threads"]["batched"]}
