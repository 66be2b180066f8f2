"""The engine's decode step, run eagerly or replayed from CUDA graphs.

On a GPU a decode step of a 7B model is a few hundred small kernels; launching them one by one from Python costs more
than they take to run at small batches. A CUDA graph records the step once and replays it with one launch. A graph
fixes every shape and address, so a step is padded to a *window*: rows up to the next power of two (within the
cache's row capacity), columns up to the next multiple of ``column_bucket`` (within its capacity). One graph serves
every step inside its window: the inputs are copied into static buffers, the new keys go in at a device-side index,
and the mask hides the columns past the new one (see :meth:`BatchKVCache.begin_step`). Graphs belong to one cache
layout; when the cache reallocates its buffers (it grows by doubling) they are dropped and captured again.

Modes: ``eager`` (the CPU, and wherever graphs are off), ``graphs`` (CUDA), and ``padded``, which runs the graphs'
padded windows eagerly: it checks on any machine that padding never changes a running row's result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from nextchat.kv_cache import BatchKVCache
from nextchat.modeling_nextchat import NextChatModel


log = logging.getLogger(__name__)
DecodeMode = Literal["eager", "padded", "graphs"]
COLUMN_BUCKET = 64  # columns a window grows by: a graph serves 64 consecutive steps of the same rows


def step_window(rows: int, length: int, row_capacity: int, capacity: int, column_bucket: int) -> tuple[int, int]:
    """The padded window ``(rows, columns)`` of a step over ``rows`` running rows and ``length`` used columns.

    Rows round up to a power of two and columns (the new one included) to a multiple of ``column_bucket``, each
    within the buffers' capacity.
    """
    padded_rows = min(1 << max(0, rows - 1).bit_length(), row_capacity)
    padded_columns = min(-(-(length + 1) // column_bucket) * column_bucket, capacity)
    return padded_rows, padded_columns


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [rows, hidden], overwritten by every replay
    logits: torch.Tensor  # [rows, vocab]


@dataclass
class _Layout:
    """Static input buffers and graphs for one layout of one cache."""

    key: int  # the cache layout it was made for (numbers are unique across caches)
    embeds: torch.Tensor  # [row_capacity, 1, hidden]
    positions: torch.Tensor  # [row_capacity, 1]
    graphs: dict[tuple[int, int], _Captured] = field(default_factory=dict)


class DecodeStep:
    """Runs one decode step of the running batch on its :class:`BatchKVCache`.

    Args:
        model: the network.
        mode: ``eager``, ``padded`` or ``graphs`` (CUDA only; see the module docstring).
        column_bucket: columns a padded window grows by.
    """

    def __init__(self, model: NextChatModel, mode: DecodeMode = "eager", column_bucket: int = COLUMN_BUCKET) -> None:
        if mode == "graphs" and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        self.model, self.column_bucket = model, column_bucket
        self.mode: DecodeMode = mode
        self._layout: _Layout | None = None
        self._pool = None

    def __call__(
        self, cache: BatchKVCache, embeds: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[R, 1, hidden]`` inputs and ``[R, 1]`` positions of the R running rows → their final-norm states
        ``[R, hidden]`` and logits ``[R, vocab]`` (float32); the cache gains one column."""
        rows = cache.rows
        if self.mode == "eager":
            hidden, logits = self.model.decode_step(embeds, positions, cache.begin_step(), cache)
        else:
            cache.reserve(1)  # may reallocate: the window is read off the buffers as they will be
            window = step_window(rows, cache.length, cache.row_capacity, cache.capacity, self.column_bucket)
            layout = self._layout_for(cache)
            layout.embeds[:rows] = embeds
            layout.positions[:rows] = positions
            inputs = (layout.embeds[: window[0]], layout.positions[: window[0]], cache.begin_step(*window), cache)
            captured = None
            if self.mode == "graphs":
                captured = layout.graphs.get(window) or self._capture(layout, window, inputs)
            if captured is None:  # padded mode, or a capture that failed (later steps then run eagerly)
                hidden, logits = self.model.decode_step(*inputs)
            else:
                captured.graph.replay()
                hidden, logits = captured.hidden, captured.logits
            hidden, logits = hidden[:rows].clone(), logits[:rows].clone()
        cache.end_step()
        return hidden, logits

    def _layout_for(self, cache: BatchKVCache) -> _Layout:
        key = cache.layout
        if self._layout is None or self._layout.key != key:
            hidden = self.model.config.hidden_size
            device = self.model.device
            self._layout = _Layout(  # the old layout's graphs go with it
                key,
                torch.zeros((cache.row_capacity, 1, hidden), dtype=self.model.dtype, device=device),
                torch.zeros((cache.row_capacity, 1), dtype=torch.long, device=device),
            )
        return self._layout

    def _capture(
        self,
        layout: _Layout,
        window: tuple[int, int],
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, BatchKVCache],
    ) -> _Captured | None:
        """Record the step for ``window``; None (and eager steps from now on) if this model cannot be captured.

        The graph is checked once against the eager warm-up run of the same step (same chosen tokens, states within
        bf16 rounding) before it is used: a graph that computes something else is never replayed for a result. The
        warm-up, the captured run and the check's replay all write the same column with the same inputs as the step
        itself, so capturing leaves the cache as one step would.
        """
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            side = torch.cuda.Stream(self.model.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the first run allocates what the graph will reuse
                want_hidden, want_logits = self.model.decode_step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden, logits = self.model.decode_step(*inputs)
            graph.replay()
            real = inputs[3].rows  # the padding rows' outputs are never read
            same = bool((logits[:real].argmax(-1) == want_logits[:real].argmax(-1)).all()) and torch.allclose(
                hidden[:real].float(), want_hidden[:real].float(), rtol=2e-2, atol=2e-2
            )
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            log.warning("decode steps run eagerly: capturing a CUDA graph failed (%s)", str(error).splitlines()[0])
            self.mode = "eager"
            return None
        if not same:
            log.warning("decode steps run eagerly: a captured CUDA graph disagreed with the eager step it recorded")
            self.mode = "eager"
            return None
        captured = _Captured(graph, hidden, logits)
        layout.graphs[window] = captured
        return captured
