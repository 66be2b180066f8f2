"""The batched path: the real server (executor, continuous batching, caches) through the in-memory MCP client.

``c`` callers in a closed loop for each concurrency ``c``: each takes the next request as soon as its last one is
answered. A chunk ends with its callers running out of work (the batch drains), which counts against this path.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from benchmarks.timings import Timings, measured
from benchmarks.workload import FALLBACK_BOX, Item


def _checked(result: Any, tool: str) -> dict[str, Any]:
    """A tool call's structured result; a tool error ends the benchmark (its figures would mean nothing)."""
    if result.is_error:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        raise SystemExit(f"{tool} failed during the benchmark: {text}")
    return result.structured_content


async def tool_request(client: Any, item: Item, timings: Timings | None) -> None:
    """``locate_objects`` then ``segment_object`` on the first object it found (by id), else on the fallback box."""
    started = time.perf_counter()
    located = _checked(await client.call_tool("locate_objects", {"image": item.uri, "query": item.query}), "locate")
    after_locate = time.perf_counter()
    image_id, objects = located["image"]["id"], located["objects"]
    target = {"object_id": objects[0]["id"]} if objects else {"box": list(FALLBACK_BOX)}
    _checked(await client.call_tool("segment_object", {"image": image_id, **target}), "segment")
    if timings is not None:
        timings.add(started, after_locate, time.perf_counter(), bool(objects))


async def run_point(client: Any, items: list[Item], concurrency: int, timings: Timings, device: str) -> None:
    """``concurrency`` callers in a closed loop over ``items``; adds to ``timings`` (wall time included)."""
    queue = iter(items)  # shared: each caller takes the next item when it is free

    async def caller() -> None:
        for item in queue:
            await tool_request(client, item, timings)

    with measured(timings, device):
        async with anyio.create_task_group() as task_group:
            for _ in range(concurrency):
                task_group.start_soon(caller)
