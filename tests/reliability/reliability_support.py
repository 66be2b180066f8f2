"""Helpers for the reliability suite: run sizes, measured figures, the stub resolver's table, error checks.

Every test here runs at two sizes: the CI size by default and the full count under ``--run-slow`` (``make
test-slow``). Figures (inputs tried, crashes, lost, mismatched, latencies, memory) are collected per test, printed at
the end of the run and written to ``.cache/reliability/figures.json`` (or ``$NEXTCHAT_FIGURES``).
"""

import os
import time
from pathlib import Path

import numpy as np
import pytest


LOOPBACK = ("127.0.0.1", "::1")
# What the stub resolver answers: names used by the tests all point inside, so a fetch that got as far as connecting
# would be an SSRF bypass. Any other name does not resolve.
STUB_DNS = {
    "images.example": ["10.0.0.7"],
    "metadata.google.internal": ["169.254.169.254"],
    "127.0.0.1.nip.io": ["127.0.0.1"],
    "dual.example": ["93.184.216.34", "192.168.0.9"],
}
FIGURES: dict[str, dict] = {}


def figures_path() -> Path:
    default = Path(__file__).resolve().parents[2] / ".cache" / "reliability" / "figures.json"
    return Path(os.environ.get("NEXTCHAT_FIGURES", default))


def record_figures(name: str, values: dict) -> None:
    """Keep a test's measured figures for the end-of-run summary."""
    FIGURES[name] = {"recorded": time.strftime("%Y-%m-%d %H:%M:%S"), **values}


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of latencies in seconds, reported in milliseconds."""
    if not samples:
        return {}
    values = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p95_ms": round(float(np.percentile(values, 95)), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "max_ms": round(float(values.max()), 1),
    }


def rss_mib() -> float:
    """This process's resident set size now, from /proc (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS missing from /proc/self/status")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def one_sentence_problem(text: str) -> str | None:
    """Why ``text`` is not an acceptable error for a calling agent, or None when it is."""
    if not text.strip():
        return "empty"
    if "\n" in text or "\r" in text:
        return "several lines"
    if len(text) > 600:
        return f"{len(text)} characters"
    lowered = text.lower()
    for marker in ("traceback", 'file "', "pydantic.dev", "input_value", "site-packages", "0x7f"):
        if marker in lowered:
            return f"contains {marker!r}"
    for addresses in STUB_DNS.values():
        for address in addresses:
            if address in text:
                return f"echoes a resolved address {address}"
    return None


def sizes(ci: object, full: object) -> list:
    """Parametrize a test at its CI size and (marked slow) at its full size; a tuple fills several parameters."""

    def values(size: object) -> tuple:
        return size if isinstance(size, tuple) else (size,)

    return [pytest.param(*values(ci), id="ci"), pytest.param(*values(full), id="full", marks=pytest.mark.slow)]
