"""R6, R7, R11: many clients at once lose nothing and mix nothing up; thousands of requests leave memory bounded.

Every request carries its own image: a distinct size and random pixels, so the answer's width, height and sha256
prefix identify the request it belongs to. A response that names another request's image is a mismatch; a request
without an answer before its deadline is lost. Latencies are reported, never asserted.
"""

import gc
import itertools
import statistics
import time

import anyio
import pytest
from mcp import Client
from nonces import MIX, Nonce, Tally, arguments, request
from reliability_support import percentiles, record_figures, rss_mib, sizes

from mcp_server.server import create_server
from mcp_server.settings import Settings


pytestmark = pytest.mark.anyio


async def single_request_seconds(client: Client, numbers: itertools.count) -> float:
    """Median time of one request alone (all four tools, twice each), the baseline the figures are read against."""
    times = []
    for tool in MIX * 2:
        started = time.perf_counter()
        result = await client.call_tool(tool, arguments(tool, Nonce.make(next(numbers))))
        assert not result.is_error, result.content
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seconds", sizes(3.0, 60.0))
async def test_32_concurrent_clients_lose_and_mix_up_nothing(reliability_server, seconds: float) -> None:
    numbers = itertools.count(1_000_000 * int(seconds))
    tally = Tally()
    async with Client(reliability_server) as probe:
        single = await single_request_seconds(probe, numbers)

    async def client_loop(index: int, stop_at: float) -> None:
        async with Client(reliability_server, mode="legacy" if index % 2 else "auto") as client:
            turn = index
            while time.monotonic() < stop_at:
                await request(client, MIX[turn % len(MIX)], Nonce.make(next(numbers)), tally)
                turn += 1

    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for index in range(32):
            group.start_soon(client_loop, index, started + seconds)
    elapsed = time.monotonic() - started
    record_figures(
        f"R6/R7 32 concurrent clients for {seconds:g} s",
        tally.figures()
        | {"single_request_ms": round(single * 1000, 1), "throughput_per_s": round(tally.answered / elapsed, 2)}
        | percentiles(tally.latencies),
    )
    assert not tally.problems, "\n".join(tally.problems[:20])
    assert tally.sent == tally.answered and tally.answered >= 32  # every client got answers


@pytest.fixture(scope="module")
def bounded_server():
    """The demo-model server with small model caches, so a few hundred distinct images already fill every bound."""
    from mcp_server.runner import NextChatRunner

    settings = Settings(model="demo", device="cpu", ready_wait_s=120)
    server = create_server(settings, runner_factory=lambda: NextChatRunner.load("demo", "cpu", cache_bytes=4 << 20))
    yield server
    server.app.executor.stop()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("total", "warm_up"), sizes((300, 100), (3000, 500)))
async def test_memory_stays_bounded_over_thousands_of_requests(bounded_server, total: int, warm_up: int) -> None:
    """30% segment_object, every image distinct: RSS growth after warm-up stays within a bound, the stores within
    their caps. Full run: growth from request 500 to 3,000 under 50 MiB. CI: under a quarter of the warm RSS."""
    numbers = itertools.count(5_000_000 + total)
    tally = Tally()
    samples: list[tuple[int, float]] = []
    state = bounded_server.app
    plan = ["segment_object" if i % 10 < 3 else MIX[i % 3] for i in range(total)]
    done = 0

    async def worker(client: Client, stop: int) -> None:
        nonlocal done
        while done < stop:
            tool = plan[done]
            done += 1
            await request(client, tool, Nonce.make(next(numbers)), tally)

    async with Client(bounded_server) as first, Client(bounded_server, mode="legacy") as second:
        for stop in range(warm_up, total + 1, warm_up):
            async with anyio.create_task_group() as group:
                for client in [first, second] * 4:
                    group.start_soon(worker, client, stop)
            gc.collect()
            samples.append((tally.sent, round(rss_mib(), 1)))
            assert len(state.images) <= 256 and len(state.masks) <= state.masks.max_entries
            assert state.masks.nbytes <= state.masks.max_bytes
    growth = samples[-1][1] - samples[0][1]
    bound = 50.0 if total >= 3000 else samples[0][1] / 4
    record_figures(
        f"R11 memory over {total} requests",
        tally.figures()
        | {"rss_mib_by_requests": samples, "growth_after_warm_up_mib": round(growth, 1), "bound_mib": round(bound)}
        | {"images_stored": len(state.images), "masks_stored": len(state.masks)}
        | percentiles(tally.latencies),
    )
    assert not tally.problems, "\n".join(tally.problems[:20])
    assert growth <= bound, samples
