"""The running batch's cache: rows join right-aligned, leave compacted, buffers grow; a step equals the library's."""

import pytest
import torch

from nextchat.decode_graphs import step_window
from nextchat.engine import _cache_layers
from nextchat.kv_cache import BatchKVCache


LAYERS, HEADS, HEAD_DIM = 2, 3, 4


def prefilled(
    lengths: list[int], width: int, seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Left-padded rows of the given real lengths in ``width`` columns: per-layer keys/values and their mask."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), HEADS, width, HEAD_DIM)
    layers = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for _ in range(LAYERS)]
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return layers, mask


def real(cache: BatchKVCache, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's keys and values at its real columns ``[heads, n, head_dim]``, in time order."""
    columns = cache.mask[row, : cache.length].nonzero().flatten()
    return cache.keys[layer][row][:, columns], cache.values[layer][row][:, columns]


def expected(layers, mask, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    columns = mask[row].nonzero().flatten()
    return layers[layer][0][row][:, columns], layers[layer][1][row][:, columns]


def new_cache() -> BatchKVCache:
    return BatchKVCache(LAYERS, HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))


def test_rows_of_any_length_join_right_aligned_and_keep_their_real_columns() -> None:
    cache = new_cache()
    first = prefilled([3, 5], 5, seed=0)
    cache.append(*first)
    longer = prefilled([7], 7, seed=1)  # longer than the running rows: they are padded on the left
    cache.append(*longer)
    shorter = prefilled([2, 4], 4, seed=2)
    cache.append(*shorter)
    assert (cache.rows, cache.length) == (5, 7)
    sources = [(first, 0), (first, 1), (longer, 0), (shorter, 0), (shorter, 1)]
    for row, ((layers, mask), source_row) in enumerate(sources):
        assert bool(cache.mask[row, cache.length - 1])  # every row ends at the last column
        for layer in range(LAYERS):
            for got, want in zip(real(cache, row, layer), expected(layers, mask, source_row, layer), strict=True):
                assert torch.equal(got, want)


def test_rows_that_leave_are_compacted_away_and_the_rest_keep_their_order() -> None:
    cache = new_cache()
    layers, mask = prefilled([2, 6, 4, 5], 6, seed=3)
    cache.append(layers, mask)
    cache.keep([3, 1])
    assert cache.rows == 2
    for row, source_row in ((0, 3), (1, 1)):
        for layer in range(LAYERS):
            for got, want in zip(real(cache, row, layer), expected(layers, mask, source_row, layer), strict=True):
                assert torch.equal(got, want)
    assert not bool(cache.mask[2:].any())
    cache.keep([])
    assert (cache.rows, cache.length) == (0, 0)


def test_steps_write_in_place_and_the_buffers_grow_past_their_capacity() -> None:
    cache = new_cache()
    layers, mask = prefilled([1, 3], 3, seed=4)
    cache.append(layers, mask)
    reference = [[k.clone(), v.clone()] for k, v in layers]
    generator = torch.Generator().manual_seed(5)
    for step in range(20):
        step_mask = cache.begin_step()
        assert step_mask.shape == (cache.rows, 1, 1, cache.length + 1)
        for layer in range(LAYERS):
            key, value = torch.randn(2, cache.rows, HEADS, 1, HEAD_DIM, generator=generator)
            keys, values = cache.update(key, value, layer)
            reference[layer] = [torch.cat([reference[layer][0], key], 2), torch.cat([reference[layer][1], value], 2)]
            assert keys.shape[2] == values.shape[2] == cache.length + 1
            assert torch.equal(keys[:, :, -1:], key) and torch.equal(values[:, :, -1:], value)
        cache.end_step()
        if step == 5:
            cache.keep([0])  # the longer row leaves: the first two columns are now padding in every row
            reference = [[k[:1], v[:1]] for k, v in reference]
    full_mask = torch.cat([mask[:1], torch.ones(1, 20, dtype=torch.long)], 1)
    assert cache.length == 21  # 23 columns written, the two dropped when the buffers were next full
    for layer in range(LAYERS):
        for got, want in zip(real(cache, 0, layer), expected([reference[layer]], full_mask, 0, 0), strict=True):
            assert torch.equal(got, want)


def test_a_decode_step_on_it_equals_the_librarys_forward_with_a_dynamic_cache(tiny_parts) -> None:
    model, _ = tiny_parts
    text = model.model.config
    generator = torch.Generator().manual_seed(6)
    prompt = torch.randn(2, 9, text.hidden_size, generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0  # row 0 is five tokens, left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        _, _, dynamic = model.forward_llm(prompt, mask, positions)
        layers = [(k.clone(), v.clone()) for k, v in _cache_layers(dynamic)]
        step = torch.randn(2, 1, text.hidden_size, generator=generator)
        step_positions = torch.tensor([[5], [9]])
        want_hidden, want_logits, _ = model.forward_llm(
            step, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), step_positions, dynamic,
            torch.zeros(2, dtype=torch.long),
        )  # fmt: skip
        cache = BatchKVCache.for_config(text, model.dtype, model.device)
        cache.append(layers, mask)
        hidden, logits = model.decode_step(step, step_positions, cache.begin_step(), cache)
        cache.end_step()
    torch.testing.assert_close(hidden, want_hidden[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


def test_a_padded_window_gives_the_running_rows_the_exact_windows_results(tiny_parts) -> None:
    model, _ = tiny_parts
    text = model.model.config
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randn(4, 6, text.hidden_size, generator=generator)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    step = torch.randn(3, 1, text.hidden_size, generator=generator)
    step_positions = positions[:3, -1:] + 1
    results = []
    with torch.inference_mode():
        _, _, dynamic = model.forward_llm(prompt, mask, positions)
        for window in (None, (4, 16)):  # exact; then 4 rows (one of padding) × 16 columns (9 masked)
            cache = BatchKVCache.for_config(text, model.dtype, model.device)
            cache.append([(k.clone(), v.clone()) for k, v in _cache_layers(dynamic)], mask)
            cache.keep([0, 1, 2])  # row 3 left: its stale keys stay in the buffer, as after any leave
            cache.reserve(16)
            rows = 3 if window is None else window[0]
            inputs = torch.cat([step, torch.zeros(rows - 3, 1, text.hidden_size)])
            where = torch.cat([step_positions, torch.zeros(rows - 3, 1, dtype=torch.long)])
            attention = cache.begin_step() if window is None else cache.begin_step(*window)
            hidden, logits = model.decode_step(inputs, where, attention, cache)
            cache.end_step()
            assert torch.isfinite(hidden).all()  # padding rows stay finite: they attend to their own column
            results.append((hidden[:3], logits[:3], [k[:3, :, :7] for k in cache.keys]))
    (hidden, logits, keys), (padded_hidden, padded_logits, padded_keys) = results
    torch.testing.assert_close(padded_hidden, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=1e-5)
    for exact, padded in zip(keys, padded_keys, strict=True):
        torch.testing.assert_close(padded, exact, atol=1e-6, rtol=1e-6)


def test_a_window_must_cover_the_running_rows_and_the_new_column() -> None:
    cache = new_cache()
    cache.append(*prefilled([2, 3], 3, seed=8))
    cache.reserve(8)
    with pytest.raises(ValueError, match="does not cover"):
        cache.begin_step(1, 8)  # fewer rows than are running
    with pytest.raises(ValueError, match="does not cover"):
        cache.begin_step(2, 3)  # the new column (index 3) is outside


def test_step_windows_round_rows_to_powers_of_two_and_columns_to_buckets_within_capacity() -> None:
    assert step_window(rows=1, length=0, row_capacity=32, capacity=1024, column_bucket=64) == (1, 64)
    assert step_window(rows=3, length=63, row_capacity=32, capacity=1024, column_bucket=64) == (4, 64)
    assert step_window(rows=5, length=64, row_capacity=32, capacity=1024, column_bucket=64) == (8, 128)
    assert step_window(rows=17, length=710, row_capacity=20, capacity=720, column_bucket=64) == (20, 720)


def test_every_allocation_gets_its_own_layout_number() -> None:
    first, second = new_cache(), new_cache()
    assert first.layout != second.layout  # a graph captured on one cache never replays on another
    first.append(*prefilled([2], 2, seed=9))
    grown = first.layout
    assert grown != second.layout
    first.reserve(1)  # room for a step: the buffers double
    assert first.layout != grown
    doubled = first.layout
    first.begin_step()
    first.end_step()
    first.keep([0])
    assert first.layout == doubled  # steps and leaving rows write in place


def test_rows_leaving_a_long_unused_prefix_shift_the_rest_left_in_the_same_buffers() -> None:
    cache = new_cache()
    layers, mask = prefilled([100, 10], 100, seed=10)
    cache.append(layers, mask)
    layout = cache.layout
    cache.keep([1])  # the long row leaves: 90 leading columns are now padding in every row
    assert (cache.length, cache.layout) == (10, layout)  # shifted in place: a captured graph stays valid
    for layer in range(LAYERS):
        for got, want in zip(real(cache, 0, layer), expected(layers, mask, 1, layer), strict=True):
            assert torch.equal(got, want)
    cache.append(*prefilled([35, 30], 40, seed=11))
    cache.keep([1, 2])  # five unused leading columns: too few to be worth a copy
    assert cache.length == 40
