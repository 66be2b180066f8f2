"""What both paths record: per-request wall times, each path's own wall time, and the GPU memory peak."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Timings:
    """Per-request wall times in seconds (whole request, the locate call, the segment call) and the path's wall time.

    ``wall_s`` adds up only the chunks the path ran (:func:`measured`), so each path's throughput is its requests over
    its own time, whatever ran in between.
    """

    request: list[float] = field(default_factory=list)
    locate: list[float] = field(default_factory=list)
    segment: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    segmented_by_id: int = 0
    segmented_by_box: int = 0
    peak_gpu_mib: float | None = None

    def note_peak(self, mib: float | None) -> None:
        """Raise the GPU memory peak to ``mib`` if that is higher (None: not measured)."""
        if mib is not None:
            self.peak_gpu_mib = max(mib, self.peak_gpu_mib or 0.0)

    def add(self, started: float, located: float, finished: float, by_id: bool) -> None:
        """One request's ``perf_counter`` marks: start, locate done, segment done; ``by_id``: locate found one."""
        self.request.append(finished - started)
        self.locate.append(located - started)
        self.segment.append(finished - located)
        self.segmented_by_id += by_id
        self.segmented_by_box += not by_id


@contextlib.contextmanager
def measured(timings: Timings, device: str) -> Iterator[None]:
    """Add the block's wall time to ``timings`` and raise its GPU memory peak to the block's, if higher."""
    peak = track_gpu_memory(device)
    started = time.perf_counter()
    yield
    timings.wall_s += time.perf_counter() - started
    timings.note_peak(peak())


def track_gpu_memory(device: str) -> Callable[[], float | None]:
    """Reset the peak-memory counter; the returned function reads the peak since then (MiB; None off CUDA)."""
    if not device.startswith("cuda"):
        return lambda: None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return lambda: round(torch.cuda.max_memory_allocated() / 2**20, 1)
