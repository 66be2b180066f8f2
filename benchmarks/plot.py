"""The run's plot: throughput and latency against concurrency, batched path and naive path, as a PNG.

matplotlib is imported when a plot is drawn, not with this module: it is a benchmark-only dependency (the ``bench``
extra), and nothing else in the benchmark needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


BATCHED, NAIVE, NAIVE_P95 = "tab:blue", "tab:orange", "tab:grey"


def draw_plot(report: dict[str, Any], path: Path) -> None:
    """Two panels side by side, written to ``path`` (PNG).

    Left, throughput against the number of concurrent callers; right, latency per request (p50 and p95). The naive
    path runs one request at a time whatever the load, so it is a dashed level line in both.
    """
    # The Agg canvas directly, not pyplot: no display needed, and no global figure state in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    batched = [r for r in report["results"] if r["path"] == "batched"]
    naive = next(r for r in report["results"] if r["path"] == "naive")
    figure = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(
        f"{report['model']} · {report['device_name']} · {report['date'][:10]} · commit {report['commit']}",
        fontsize=11,
    )
    throughput, latency = figure.subplots(1, 2)
    levels = [r["concurrency"] for r in batched]
    _panel(
        throughput,
        "throughput (requests/s)",
        levels,
        [("batched", [r["throughput_rps"] for r in batched], 1.0)],
        [("naive", naive["throughput_rps"], NAIVE)],
    )
    _panel(
        latency,
        "latency per request (ms)",
        levels,
        [
            ("batched p50", [r["latency_ms"]["p50"] for r in batched], 1.0),
            ("batched p95", [r["latency_ms"]["p95"] for r in batched], 0.45),  # the same hue, lighter
        ],
        [("naive p50", naive["latency_ms"]["p50"], NAIVE), ("naive p95", naive["latency_ms"]["p95"], NAIVE_P95)],
    )
    figure.savefig(path, format="png")


def _panel(
    axes: Any,
    title: str,
    levels: list[int],
    series: list[tuple[str, list[float], float]],
    flat: list[tuple[str, float, str]],
) -> None:
    """One panel: batched ``series`` (name, a value per level, opacity) and naive ``flat`` lines (name, value, colour).

    The levels (1, 8, 32) are spaced evenly: they are categories, not a scale.
    """
    x = list(range(len(levels)))
    for name, values, alpha in series:
        axes.plot(x, values, "o-", color=BATCHED, alpha=alpha, linewidth=2.5 if alpha == 1 else 1.8, label=name)
    for name, value, colour in flat:  # the naive path runs one request at a time whatever the load: a level
        axes.axhline(value, color=colour, linestyle="--", linewidth=2, label=f"{name} {value:g}")
    top = max([v for _, values, _ in series for v in values] + [v for _, v, _ in flat])
    axes.set_ylim(0, 1.15 * top)
    axes.set_xticks(x, [str(level) for level in levels])
    axes.set_xlabel("concurrent callers")
    axes.set_title(title, fontsize=11, loc="left")
    axes.grid(axis="y", color="0.9")
    axes.legend(loc="upper left", fontsize=9, frameon=False)
