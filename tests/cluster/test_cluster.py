"""The server on a local Ray Serve with two model replicas of the demo model, handles in a real redis-server.

One application serves the whole module (starting Ray and Serve costs most of the time): affinity off, so calls
take turns between the replicas and a chain's steps land on different ones. Every answer is a fixed number of tokens
(``fixed_new_tokens``), so a call stays on its replica long enough to be caught there by the replica-kill test; the
one-process reference runs with the same setting, so the answers compare.
"""

from __future__ import annotations

import hashlib
import os
import time
from base64 import b64decode
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import numpy as np
import pytest
from cluster_support import RedisProcess, free_port
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from support import png_data_uri

from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat.demo.world import render_scene


pytest.importorskip("redis", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
serve = pytest.importorskip("ray.serve", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
ray = pytest.importorskip("ray")

from mcp_server.cluster.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, build_app  # noqa: E402


APP = "nextchat"
FIXED_TOKENS = 40
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOLATILE = ("provenance", "image", "mask_uri", "overlay_uri")  # timings and per-store ids differ; the rest must not


@dataclass
class Cluster:
    url: str
    redis: RedisProcess

    @asynccontextmanager
    async def client(self, principal: str = "alice") -> AsyncIterator[Client]:
        headers = {"Authorization": f"Bearer {TOKENS[principal]}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,
            Client(streamable_http_client(self.url, http_client=http)) as client,
        ):
            yield client


def replica_states() -> dict[str, Any]:
    return serve.status().applications[APP].deployments


def replica_actors(deployment: str) -> set[str]:
    """The names of the live replica actors of ``deployment`` (a killed one's name is gone once it is dead)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]}


def wait_until_running(deployment: str, replicas: int, gone: str, timeout_s: float = 120) -> None:
    """Wait (polling Serve's status) until ``deployment`` has ``replicas`` running replicas again, ``gone`` not one."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = replica_states()[deployment]
        actors = replica_actors(deployment)
        running = state.replica_states.get("RUNNING", 0) == replicas and str(state.status).endswith("HEALTHY")
        if running and gone not in actors and len(actors) == replicas:
            return
        assert time.monotonic() < deadline, f"{deployment} did not come back: {state}"
        time.sleep(0.2)


async def model_replicas() -> dict[str, dict[str, Any]]:
    """Each model replica's report (its id, load and the calls it served), by replica id."""
    return await anyio.to_thread.run_sync(_model_replicas)


def _model_replicas() -> dict[str, dict[str, Any]]:
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP)
    found: dict[str, dict[str, Any]] = {}
    for _ in range(20):  # without a route key the router takes turns: a few calls reach every replica
        info = handle.info.remote().result(timeout_s=30)
        found[info["replica"]] = info
        if len(found) == 2:
            break
    return found


@pytest.fixture(scope="module")
def cluster(redis_process: RedisProcess) -> Iterator[Cluster]:
    port = free_port()
    tokens = ",".join(f"{p}={t}" for p, t in TOKENS.items())
    env = {"PYTHONPATH": REPO, "NEXTCHAT_TEST_TOKENS": tokens}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {
            "model": "demo", "device": "cpu", "model_replicas": 2, "affinity": False, "redis_url": redis_process.url,
            "tokens_env": "NEXTCHAT_TEST_TOKENS", "fixed_new_tokens": FIXED_TOKENS, "request_timeout_s": 60,
        }  # fmt: skip
        serve.run(build_app(options), name=APP, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}/mcp", redis_process)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def one_process():
    server = create_server(Settings(model="demo", device="cpu", fixed_new_tokens=FIXED_TOKENS))
    yield server
    server.app.executor.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def scene_uri(seed: int) -> tuple[str, str]:
    """A shapes scene as a data URI, and the prefix of its sha256 that results report."""
    uri = png_data_uri(render_scene(np.random.default_rng([19, seed]), min_objects=2, max_objects=3).image)
    return uri, hashlib.sha256(b64decode(uri.split(",", 1)[1])).hexdigest()


def text(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in VOLATILE}


async def chain(client: Client, uri: str) -> list[dict[str, Any]]:
    """locate_objects, then segment_object and describe_region on its first object, by id."""
    located = await client.call_tool("locate_objects", {"image": uri, "query": "all the shapes"})
    assert not located.is_error, text(located)
    image_id = located.structured_content["image"]["id"]
    segmented = await client.call_tool("segment_object", {"image": image_id, "object_id": "o1"})
    assert not segmented.is_error, text(segmented)
    described = await client.call_tool("describe_region", {"image": image_id, "object_id": "o1"})
    assert not described.is_error, text(described)
    return [located.structured_content, segmented.structured_content, described.structured_content]


@pytest.mark.anyio
async def test_a_chain_across_two_replicas_gives_the_one_process_results(cluster: Cluster, one_process) -> None:
    uri, sha = scene_uri(1)
    with anyio.fail_after(120):
        async with cluster.client() as client:
            distributed = await chain(client, uri)
        async with Client(one_process) as local:
            reference = await chain(local, uri)
    assert [comparable(r) for r in distributed] == [comparable(r) for r in reference]
    assert distributed[0]["found"] and distributed[0]["image"]["sha256_prefix"] == sha[:16]
    served = {replica: info["served"] for replica, info in (await model_replicas()).items()}
    assert len(served) == 2
    located_on = next(r for r, calls in served.items() if ("generate", sha) in calls)
    segmented_on = next(r for r, calls in served.items() if ("segment", sha) in calls)
    assert located_on != segmented_on  # the object's <at> state came from Redis, not from the replica's memory


def test_the_request_router_keeps_an_image_on_one_replica_and_spreads_images(cluster: Cluster) -> None:
    """Calls carrying a route key (what the ingress sends with affinity on: the image's sha256) through Serve's real
    router: every call about one image reaches the same replica, and different images reach both."""
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP)
    chosen: dict[str, set[str]] = {}
    for n in range(12):
        key = f"{n:064x}"
        chosen[key] = {handle.info.remote(route_key=key).result(timeout_s=30)["replica"] for _ in range(4)}
    assert all(len(replicas) == 1 for replicas in chosen.values()), chosen
    assert len(set().union(*chosen.values())) == 2


@pytest.mark.anyio
async def test_two_owners_cannot_read_each_others_handles(cluster: Cluster) -> None:
    uri, _ = scene_uri(2)
    with anyio.fail_after(120):
        async with cluster.client("alice") as alice, cluster.client("bob") as bob:
            made = await alice.call_tool("segment_object", {"image": uri, "box": [10, 10, 200, 200]})
            assert not made.is_error, text(made)
            image_id, mask_uri = made.structured_content["image"]["id"], made.structured_content["mask_uri"]
            refused = await bob.call_tool("describe_region", {"image": image_id, "box": [10, 10, 200, 200]})
            assert refused.is_error and "not found" in text(refused)
            with pytest.raises(MCPError, match="not found"):
                await bob.read_resource(mask_uri)
            assert (await alice.read_resource(mask_uri)).contents  # the owner still reads it
        async with httpx2.AsyncClient(timeout=30) as anonymous:
            response = await anonymous.post(cluster.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert response.status_code == 401


@pytest.mark.anyio
async def test_redis_down_is_a_clear_error_within_the_deadline_and_service_resumes(cluster: Cluster) -> None:
    uri, _ = scene_uri(3)
    async with cluster.client() as client:
        cluster.redis.stop()
        try:
            started = time.monotonic()
            with anyio.fail_after(30):
                failed = await client.call_tool("locate_objects", {"image": uri, "query": "the red circle"})
            assert failed.is_error and "handle store (Redis) is unreachable; retry" in text(failed)
            assert time.monotonic() - started < 15
        finally:
            cluster.redis.start()
        with anyio.fail_after(60):
            resumed = await client.call_tool("locate_objects", {"image": uri, "query": "the red circle"})
        assert not resumed.is_error, text(resumed)


@pytest.mark.anyio
async def test_a_replica_killed_mid_call_fails_only_its_calls_and_is_replaced(cluster: Cluster) -> None:
    uri, _ = scene_uri(4)
    async with cluster.client() as client:
        with anyio.fail_after(60):
            before = await chain(client, uri)  # handles made before the kill
        image_id = before[0]["image"]["id"]
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(await client.call_tool("visual_qa", {"image": scene_uri(10 + i)[0], "question": "What?"}))

        victim = None
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for i in range(6):
                    group.start_soon(one, i)
                while victim is None:  # catch a replica with calls running, then kill it
                    busy = [r for r, info in (await model_replicas()).items() if info["running"] > 0]
                    if busy:
                        victim = busy[0]
                        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                    else:
                        await anyio.sleep(0.01)
        lost = [r for r in results if r.is_error]
        assert lost, "no call was in flight on the killed replica"
        assert all("model replica running this call stopped" in text(r) and "retry" in text(r) for r in lost)
        assert len(lost) < len(results)  # the other replica's calls were answered
        await anyio.to_thread.run_sync(wait_until_running, MODEL_DEPLOYMENT, 2, victim)
        with anyio.fail_after(60):
            again = await client.call_tool("segment_object", {"image": image_id, "object_id": "o1"})
        assert not again.is_error, text(again)  # a handle made before the restart
        assert comparable(again.structured_content) == comparable(before[1])
        assert victim not in await model_replicas()


@pytest.mark.anyio
async def test_an_ingress_restart_loses_nothing_answered(cluster: Cluster) -> None:
    uri, _ = scene_uri(5)
    async with cluster.client() as client:
        with anyio.fail_after(60):
            before = await chain(client, uri)
    (ingress,) = replica_actors(INGRESS_DEPLOYMENT)
    ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)
    await anyio.to_thread.run_sync(wait_until_running, INGRESS_DEPLOYMENT, 1, ingress)
    with anyio.fail_after(60):
        async with cluster.client() as client:
            image_id = before[0]["image"]["id"]
            again = await client.call_tool("describe_region", {"image": image_id, "object_id": "o1"})
    assert not again.is_error, text(again)
    assert comparable(again.structured_content) == comparable(before[2])


@pytest.mark.slow
@pytest.mark.anyio
async def test_sixteen_clients_for_thirty_seconds_lose_and_mismatch_nothing(cluster: Cluster) -> None:
    lost: list[str] = []
    mismatched: list[str] = []
    done = [0]
    stop_at = time.monotonic() + 30

    async def agent(n: int) -> None:
        principal = "alice" if n % 2 else "bob"
        async with cluster.client(principal) as client:
            k = 0
            while time.monotonic() < stop_at:
                uri, sha = scene_uri(1000 + n * 1000 + k % 7)
                k += 1
                try:
                    results = await chain(client, uri)
                except AssertionError as error:
                    lost.append(str(error)[:200])
                    continue
                if any(r["image"]["sha256_prefix"] != sha[:16] for r in results) or results[1]["object_id"] != "o1":
                    mismatched.append(f"agent {n}: {[r['image'] for r in results]}")
                done[0] += 1

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for n in range(16):
                group.start_soon(agent, n)
    assert (lost, mismatched) == ([], [])
    assert done[0] >= 16
