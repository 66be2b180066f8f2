"""The running batch's key/value cache: preallocated buffers that a decode step writes in place.

transformers' ``DynamicCache`` concatenates every layer's keys and values at every step and has to be rebuilt when a
request joins or leaves. :class:`BatchKVCache` holds, per layer, ``[row_capacity, kv_heads, capacity, head_dim]``
buffers with shared time columns: column ``t`` is the same step for every row, rows are left-padded, and ``mask``
says which columns of a row are real. A decode step writes column ``length`` of every row in place; a request that
joins is copied into the next free rows, right-aligned to ``length``; rows that leave are compacted away. Buffers grow
by doubling (after dropping columns that are padding in every row), so their shapes change rarely.

It implements the one method of transformers' cache protocol that an attention layer calls, ``update``, so the
library's own decoder layers run on it unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


_LAYOUTS = itertools.count(1)  # numbers every allocation of every cache: a layout number is never reused
TRIM_COLUMNS = 64  # leading columns no row uses, at which rows leaving shift the rest left (attention reads them)


class BatchKVCache:
    """Keys and values of the running rows, in preallocated per-layer buffers.

    Args:
        num_layers, kv_heads, head_dim: the language model's attention shape.
        dtype, device: those of the model.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.rows = 0  # rows in use (the running batch)
        self.length = 0  # time columns in use
        self.keys: list[torch.Tensor] = []  # per layer [row_capacity, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=device)  # [row_capacity, capacity], True = real
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)  # the step's column, on the device
        self.layout = 0  # the current buffers' number: a CUDA graph captured on them is valid while it is unchanged
        self._window = (0, 0)  # rows × columns that the current step reads
        self._allocate(0, 0)

    @classmethod
    def for_config(cls, text_config: object, dtype: torch.dtype, device: torch.device) -> BatchKVCache:
        """An empty cache for a transformers LLaMA config (``model.model.config``)."""
        heads = text_config.num_attention_heads  # type: ignore[attr-defined]
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads  # type: ignore[attr-defined]
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        return cls(text_config.num_hidden_layers, kv_heads, head_dim, dtype, device)  # type: ignore[attr-defined]

    @property
    def capacity(self) -> int:
        """Time columns the buffers hold."""
        return self.mask.shape[1]

    @property
    def row_capacity(self) -> int:
        """Rows the buffers hold."""
        return self.mask.shape[0]

    def _allocate(self, rows: int, columns: int) -> None:
        shape = (rows, self.kv_heads, columns, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.mask = torch.zeros((rows, columns), dtype=torch.bool, device=self.device)
        self.layout = next(_LAYOUTS)

    def _relayout(self, rows: int, columns: int, shift: int) -> None:
        """New buffers of ``rows`` × ``columns``; the used region moves ``shift`` columns right (left when < 0)."""
        old_keys, old_values, old_mask = self.keys, self.values, self.mask
        self._allocate(rows, columns)
        source = slice(max(0, -shift), self.length)
        target = slice(max(0, shift), self.length + shift)
        for layer in range(self.num_layers):
            self.keys[layer][: self.rows, :, target] = old_keys[layer][: self.rows, :, source]
            self.values[layer][: self.rows, :, target] = old_values[layer][: self.rows, :, source]
        self.mask[: self.rows, target] = old_mask[: self.rows, source]
        self.length += shift

    # ------------------------------------------------------------------------------------------------------------
    # Rows joining and leaving (between steps)

    def append(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Add freshly prefilled rows after the running ones.

        Args:
            layers: per layer ``(keys, values)`` ``[n, kv_heads, T, head_dim]`` of the new rows (left-padded).
            mask: ``[n, T]`` 1 where the new rows' columns are real.

        The new rows end at the current last column; when they are longer than the running rows, every running row
        is padded on the left instead.
        """
        count, new_length = mask.shape
        shift = max(0, new_length - self.length)
        rows_needed = self.rows + count
        if shift or rows_needed > self.row_capacity or self.length + shift > self.capacity:
            rows = self.row_capacity if rows_needed <= self.row_capacity else max(rows_needed, 2 * self.row_capacity)
            needed = self.length + shift
            columns = self.capacity if needed <= self.capacity else max(needed, 2 * self.capacity)
            self._relayout(rows, columns, shift)
        columns = slice(self.length - new_length, self.length)
        rows = slice(self.rows, rows_needed)
        for layer, (keys, values) in enumerate(layers):
            self.keys[layer][rows, :, columns] = keys
            self.values[layer][rows, :, columns] = values
        self.mask[rows] = False
        self.mask[rows, columns] = mask.bool()
        self.rows = rows_needed

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given running rows, in that order (the others leave)."""
        count = len(rows)
        if list(rows) != list(range(count)):  # the first rows staying as they are need no copy
            index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
            used = slice(0, self.length)
            for buffer in (*self.keys, *self.values):
                buffer[:count, :, used] = buffer[index, :, used]
            self.mask[:count] = self.mask[index]
        self.mask[count:] = False
        self.rows = count
        if count == 0:
            self.length = 0
        elif self._unused_prefix() >= TRIM_COLUMNS:
            self._shift_left(self._unused_prefix())

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more time columns: drop leading columns no row uses, then grow (doubling)."""
        if self.length + columns <= self.capacity:
            return
        self._shift_left(self._unused_prefix())
        needed = self.length + columns
        if needed > self.capacity:
            self._relayout(self.row_capacity, max(needed, 2 * self.capacity), 0)

    def _unused_prefix(self) -> int:
        """Leading columns that no running row uses."""
        used = self.mask[: self.rows, : self.length].any(0).nonzero()
        return int(used[0]) if used.numel() else self.length

    def _shift_left(self, start: int) -> None:
        """Move the used columns ``[start, length)`` to the front, in the same buffers (a CUDA graph stays valid)."""
        if start <= 0:
            return
        kept = slice(start, self.length)
        for buffer in (*self.keys, *self.values):
            buffer[: self.rows, :, : self.length - start] = buffer[: self.rows, :, kept].clone()
        self.mask[: self.rows, : self.length - start] = self.mask[: self.rows, kept].clone()
        self.mask[: self.rows, self.length - start : self.length] = False
        self.length -= start

    # ------------------------------------------------------------------------------------------------------------
    # A step

    def begin_step(self, rows: int | None = None, columns: int | None = None) -> torch.Tensor:
        """Open column ``length`` for a decode step; the step's attention mask ``[rows, 1, 1, columns]`` (bool).

        Every query may attend to every real column so far and to its own (one new column per step, so no causal
        pattern is needed). By default the step covers exactly the running rows and ``length + 1`` columns. A CUDA
        graph needs fixed shapes, so it asks for more: ``rows`` up to ``row_capacity`` (the rows past the running
        ones are padding and attend only to their own new column, which keeps them finite) and ``columns`` up to
        ``capacity`` (columns past the new one are masked). The new keys go in through a device-side index, so one
        captured step serves every ``length`` inside its window.
        """
        self.reserve(1)
        rows = self.rows if rows is None else rows
        columns = self.length + 1 if columns is None else columns
        if not self.rows <= rows <= self.row_capacity or not self.length < columns <= self.capacity:
            raise ValueError(
                f"a step window of {rows} rows × {columns} columns does not cover {self.rows} rows × "
                f"{self.length + 1} columns inside {self.row_capacity} × {self.capacity}"
            )
        self._window = (rows, columns)
        self.write_index.fill_(self.length)
        self.mask[:rows, self.length] = True
        return self.mask[:rows, None, None, :columns]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache protocol: store this layer's new ``[rows, kv_heads, 1, head_dim]`` at the step's
        column; return the layer's keys and values in the step's window ``[rows, kv_heads, columns, head_dim]``."""
        rows, columns = self._window
        keys = self.keys[layer_idx][:rows, :, :columns]
        values = self.values[layer_idx][:rows, :, :columns]
        keys.index_copy_(2, self.write_index, key_states)
        values.index_copy_(2, self.write_index, value_states)
        return keys, values

    def end_step(self) -> None:
        """The step's column is written in every layer: it now counts as used."""
        self.length += 1
        self._window = (0, 0)
