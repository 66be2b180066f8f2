"""The model deployment: one replica per GPU (or a share of the CPU), each owning one executor and its engine.

Continuous batching stays inside the replica: concurrent calls routed here join the executor's running batch
between decode steps. Located objects leave as :class:`~mcp_server.messages.PortableObject` states (float32 on the
host), so the ingress and Redis never need torch, and come back as the model's tensors. ``check_health`` is Ray
Serve's health check: a replica whose executor failed (a device failure, a model that did not load) is replaced.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ray import serve

from mcp_server.cluster.options import ClusterOptions
from mcp_server.cluster.wire import RemoteGeneration, RemoteMask, ReplicaAnswer
from mcp_server.executor import Executor, Runner
from mcp_server.messages import GenerationJob, MaskJob
from mcp_server.state import default_runner_factory


SERVED_LOG = 4096  # calls a replica remembers (kind, image hash), for `info`


class ModelReplica:
    """Runs jobs sent by the ingress on this replica's executor.

    Every method takes ``route_key`` (the image's sha256, or ``None``): the request router reads it to pick the
    replica; the replica itself ignores it.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        settings = ClusterOptions.model_validate(options).settings()
        build = default_runner_factory(settings)
        self._runner: Any = None

        def build_and_keep() -> Runner:
            self._runner = build()
            return self._runner

        self.executor = Executor(
            build_and_keep,
            max_queue=settings.max_queue,
            max_active=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
        )
        self.executor.start()
        while self.executor.state in ("starting", "loading"):  # the replica counts as started once its model is ready
            time.sleep(0.05)
        if self.executor.state != "ready":
            raise RuntimeError(f"the model did not load: {self.executor.error}")
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.served: deque[tuple[str, str]] = deque(maxlen=SERVED_LOG)

    async def generate(self, request: RemoteGeneration, route_key: str | None = None) -> ReplicaAnswer:
        job = GenerationJob(
            image=request.image, prompt=request.prompt, max_new_tokens=request.max_new_tokens,
            deadline=_deadline(request.timeout_s),
        )  # fmt: skip
        from mcp_server.runner import portable_objects  # torch, loaded with the model already

        self.served.append(("generate", request.image.sha256))
        outcome = await self.executor.generate(job)
        return ReplicaAnswer(portable_objects(outcome), self.replica, dict(self.executor.runner_info))

    async def segment(self, request: RemoteMask, route_key: str | None = None) -> ReplicaAnswer:
        from mcp_server.runner import grounded_prompts

        job = MaskJob(image=request.image, prompts=request.prompts, deadline=_deadline(request.timeout_s))
        self.served.append(("segment", request.image.sha256))
        outcome = await self.executor.segment(grounded_prompts(job, str(self._runner.dtype)))
        return ReplicaAnswer(outcome, self.replica, dict(self.executor.runner_info))

    def info(self, route_key: str | None = None) -> dict[str, Any]:
        """This replica's id, its executor's load and the calls it served, oldest first."""
        return {
            "replica": self.replica,
            "state": self.executor.state,
            "queue_depth": self.executor.queue_depth,
            "running": self.executor.running,
            "served": list(self.served),
        }

    def check_health(self) -> None:
        """Ray Serve's health check: raising marks the replica unhealthy, and Serve replaces it."""
        if self.executor.state != "ready":
            raise RuntimeError(f"the executor is {self.executor.state}: {self.executor.error}")

    def __del__(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.stop(timeout_s=1.0)


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s
