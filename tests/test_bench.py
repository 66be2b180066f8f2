"""The benchmark runs end to end on the tiny checkpoint and reports what it measured."""

import json

import torch

from benchmarks import bench


def test_the_benchmark_alternates_both_paths_and_ends_with_the_ratio_line(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
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
    assert written.with_suffix(".png").is_file()
    by_point = {(r["path"], r["concurrency"]): r for r in report["results"]}
    assert set(by_point) == {("naive", 1), ("batched", 1), ("batched", 8)}
    assert by_point["naive", 1]["requests"] == 2  # one a round
    assert by_point["batched", 1]["requests"] == 8  # 4 × callers a round, at least
    assert by_point["batched", 8]["requests"] == 64
    assert report["rounds"] == 2 and report["server"]["decode"] == "eager"
    assert all(r["throughput_rps"] > 0 for r in report["results"])
    ratio = by_point["batched", 8]["throughput_rps"] / by_point["naive", 1]["throughput_rps"]
    assert lines[-1] == f"throughput ratio at concurrency 8 (batched/naive): {ratio:.2f}"
