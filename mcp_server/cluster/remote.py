"""The ingress side of the model deployment: an :class:`~mcp_server.executor.Executor` whose jobs run on model
replicas through a Ray Serve handle, so the tools run unchanged in the ingress.

Each call carries its ``route_key`` (the image's sha256; ``None`` with affinity off) for the request router, and the
time left to its deadline. Cancelling the awaiting task (the call's deadline, a cancelled request) cancels the Serve
request, which cancels the job on the replica. A replica that dies with the call in flight fails that call alone,
with :class:`ReplicaLost`: retryable, and a retry goes to a live replica.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import ray.exceptions
from ray.serve.exceptions import DeploymentUnavailableError, RayServeException, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from mcp_server.cluster.wire import RemoteGeneration, RemoteMask, ReplicaAnswer
from mcp_server.executor import Executor, JobCancelled, ModelNotReady, Overloaded, Runner
from mcp_server.messages import GenerationJob, GenerationOutcome, Job, MaskJob, MaskOutcome


OutcomeT = TypeVar("OutcomeT", GenerationOutcome, MaskOutcome)
# Errors a replica raises that the tools already turn into a message for the caller.
CALLER_ERRORS = (Overloaded, JobCancelled, ModelNotReady, ValueError)
REPLICA_GONE = (ray.exceptions.RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class ReplicaLost(ModelNotReady):
    """The model replica running the call stopped before answering; a retry runs on a live replica."""

    def __init__(self) -> None:
        super().__init__(
            "the model replica running this call stopped before it answered (Ray Serve is replacing it); "
            "retry the call: it will run on a healthy replica"
        )


def _no_local_runner() -> Runner:
    raise RuntimeError("a ModelClient runs no model in this process")


class ModelClient(Executor):
    """Submits jobs to the model deployment instead of a local worker thread.

    ``state`` is ``ready`` from the start: Ray Serve routes only to replicas whose model has loaded. ``queue_depth``
    and ``running`` count this ingress replica's calls in flight; ``runner_info`` is the last replica's report.
    """

    def __init__(self, handle: DeploymentHandle[Any], *, affinity: bool = True) -> None:
        super().__init__(_no_local_runner)
        self.handle, self.affinity = handle, affinity
        self.state = "ready"
        self.in_flight = 0

    def start(self) -> None:
        """Nothing to start: the model runs in the model deployment."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Nothing to stop here; the replicas belong to Ray Serve."""

    @property
    def queue_depth(self) -> int:
        return self.in_flight

    @property
    def running(self) -> int:
        return self.in_flight

    async def wait_ready(self, timeout_s: float) -> bool:
        return True

    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        request = RemoteGeneration(job.image, job.prompt, job.max_new_tokens, _time_left(job))
        return await self._call("generate", request, job, GenerationOutcome)

    async def segment(self, job: MaskJob) -> MaskOutcome:
        return await self._call("segment", RemoteMask(job.image, job.prompts, _time_left(job)), job, MaskOutcome)

    async def _call(self, method: str, request: Any, job: Job, outcome_type: type[OutcomeT]) -> OutcomeT:
        route_key = job.image.sha256 if self.affinity else None
        self.in_flight += 1
        try:
            answer: ReplicaAnswer = await getattr(self.handle, method).remote(request, route_key=route_key)
        except REPLICA_GONE:
            raise ReplicaLost() from None
        except ray.exceptions.RayTaskError as error:
            cause: BaseException = error.cause  # pyright: ignore[reportUnknownMemberType]  # untyped in Ray
            if isinstance(cause, REPLICA_GONE):
                raise ReplicaLost() from None
            if isinstance(cause, CALLER_ERRORS):
                raise cause from None
            raise RuntimeError(f"the model replica failed: {type(cause).__name__}") from None
        except RayServeException as error:
            raise ModelNotReady(
                f"the model deployment is unavailable ({type(error).__name__}); retry shortly"
            ) from None
        finally:
            self.in_flight -= 1
        self.runner_info = answer.runner_info
        if not isinstance(answer.outcome, outcome_type):
            raise TypeError(f"the replica answered {type(answer.outcome).__name__} to a {method} call")
        return answer.outcome


def _time_left(job: Job) -> float | None:
    return None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
