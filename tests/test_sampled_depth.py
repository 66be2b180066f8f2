"""Stage timing on a sample of a block stack, extrapolated to full depth (benchmarks/sampled_depth.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks import sampled_depth
from benchmarks.sampled_depth import sample_indices, time_sampled


class Clock:
    """A stand-in for ``time.perf_counter`` that only the fake blocks advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class CostlyBlock(nn.Module):
    """Costs ``cost`` seconds of the fake clock per call; ``window_size`` 0 marks a global-attention block."""

    def __init__(self, clock: Clock, window_size: int, cost: float) -> None:
        super().__init__()
        self.clock, self.window_size, self.cost, self.calls = clock, window_size, cost, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost
        self.calls += 1
        return x


class Stage(nn.Module):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        # SAM-like: windowed blocks cost 2, global ones 10; the stem outside the blocks costs 1.
        self.blocks = nn.ModuleList(
            CostlyBlock(clock, 0 if i % 3 == 2 else 14, 10 if i % 3 == 2 else 2) for i in range(6)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += 1
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(sampled_depth, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_one_block_of_each_kind_runs_and_the_rest_is_extrapolated_by_kind(clock: Clock) -> None:
    stage = Stage(clock)
    timing = time_sampled(stage, "blocks", lambda: stage(torch.zeros(1)))
    assert [block.calls for block in stage.blocks] == [1, 0, 1, 0, 0, 0]  # the first windowed and first global
    assert timing.measured_s == 1 + 2 + 10
    assert timing.estimate_s == 1 + 4 * 2 + 2 * 10
    assert (timing.blocks_run, timing.blocks_total, timing.extrapolated) == (2, 6, True)


def test_a_sample_as_deep_as_the_stack_is_a_plain_measurement(clock: Clock) -> None:
    stage = Stage(clock)
    timing = time_sampled(stage, "blocks", lambda: stage(torch.zeros(1)), per_kind=99)
    assert timing.measured_s == timing.estimate_s == 1 + 4 * 2 + 2 * 10 and not timing.extrapolated


def test_the_full_stack_and_no_hooks_are_left_after_a_failing_stage(clock: Clock) -> None:
    stage = Stage(clock)
    blocks = stage.blocks

    def failing() -> None:
        stage(torch.zeros(1))
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        time_sampled(stage, "blocks", failing)
    assert stage.blocks is blocks and len(stage.blocks) == 6
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in stage.blocks)


def test_sample_indices_take_the_first_blocks_of_each_kind() -> None:
    assert sample_indices([14, 14, 0, 14, 14, 0], 1) == [0, 2]
    assert sample_indices([None] * 5, 2) == [0, 1]
