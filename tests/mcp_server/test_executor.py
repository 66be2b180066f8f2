"""The executor with a fake runner gated by events: batching, admission, cancellation, error fan-out, routing."""

import threading

import anyio
import numpy as np
import pytest

from mcp_server.executor import Executor, JobCancelled, ModelNotReady, Overloaded
from mcp_server.messages import GenerationOutcome, ImageRef, Job


pytestmark = pytest.mark.anyio
IMAGE = ImageRef("sha", np.zeros((8, 8, 3), dtype=np.uint8))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeRunner:
    """Jobs finish after ``steps`` steps; each step waits for ``gate`` when one is set. Outcomes echo the job text."""

    def __init__(self, steps: int = 2, gate: threading.Event | None = None, fail_on: str | None = None) -> None:
        self.steps, self.gate, self.fail_on = steps, gate, fail_on
        self.running: dict[int, tuple[Job, int]] = {}
        self.batches: list[list[str]] = []
        self.ran: list[str] = []
        self.cancelled: list[int] = []
        self.step_started = threading.Event()

    def submit(self, job: Job) -> None:
        if job.text == "bad job":
            raise ValueError("this job cannot run")
        self.running[job.id] = (job, 0)
        self.ran.append(job.text)

    def cancel(self, job_id: int) -> None:
        self.cancelled.append(job_id)

    def has_work(self) -> bool:
        return bool(self.running)

    def step(self):
        self.step_started.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(sorted(job.text for job, _ in self.running.values()))
        if self.fail_on and any(job.text == self.fail_on for job, _ in self.running.values()):
            raise RuntimeError("CUDA error: device-side assert")
        finished = []
        for job_id, (job, done) in list(self.running.items()):
            if job_id in self.cancelled or done + 1 >= self.steps:
                del self.running[job_id]
                finished.append(
                    (job_id, GenerationOutcome((job.text,), (), "cancelled" if job_id in self.cancelled else "stop"))
                )
            else:
                self.running[job_id] = (job, done + 1)
        return finished


async def started(executor: Executor) -> Executor:
    executor.start()
    assert await executor.wait_ready(5)
    return executor


async def test_results_are_routed_to_their_own_requests_under_200_concurrent_calls() -> None:
    runner = FakeRunner(steps=3)
    executor = await started(Executor(lambda: runner, max_queue=256, max_active=32, max_wait_ms=1))
    results: dict[str, str] = {}

    async def call(i: int) -> None:
        outcome = await executor.submit(Job("answer", IMAGE, text=f"q{i}"))
        assert isinstance(outcome, GenerationOutcome)
        results[f"q{i}"] = outcome.segments[0]

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(call, i)
    executor.stop()
    assert results == {f"q{i}": f"q{i}" for i in range(200)}
    assert max(len(b) for b in runner.batches) > 1  # requests really ran together


async def test_jobs_arriving_together_form_one_batch_up_to_max_active() -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await started(Executor(lambda: runner, max_active=3, max_wait_ms=50))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(executor.submit, Job("answer", IMAGE, text=f"q{i}"))
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            gate.set()
    executor.stop()
    assert [len(b) for b in runner.batches] == [3, 2]


async def test_a_full_queue_rejects_exactly_the_overflow() -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await started(Executor(lambda: runner, max_queue=4, max_active=1, max_wait_ms=0))
    outcomes: list[str] = []

    async def call(i: int) -> None:
        try:
            await executor.submit(Job("answer", IMAGE, text=f"q{i}"))
            outcomes.append("ok")
        except Overloaded as error:
            outcomes.append("overloaded" if error.retry_after_s >= 1 else "overloaded without a retry hint")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)  # q0 runs and holds the only slot
            for i in range(1, 8):  # 4 may wait, 3 are over the limit
                tg.start_soon(call, i)
            while executor.queue_depth < 5:
                await anyio.sleep(0)
            while outcomes.count("overloaded") < 3:
                await anyio.sleep(0)
            gate.set()
    executor.stop()
    assert outcomes.count("overloaded") == 3 and outcomes.count("ok") == 5


async def test_a_job_cancelled_while_queued_never_runs() -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await started(Executor(lambda: runner, max_active=1, max_wait_ms=0))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.submit, Job("answer", IMAGE, text="first"))
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await executor.submit(Job("answer", IMAGE, text="cancelled"))
            gate.set()
        await executor.submit(Job("answer", IMAGE, text="after"))
    executor.stop()
    assert "cancelled" not in runner.ran and runner.ran == ["first", "after"]


async def test_a_running_job_cancelled_leaves_at_the_next_step() -> None:
    runner = FakeRunner(steps=1000)
    executor = await started(Executor(lambda: runner, max_active=2, max_wait_ms=0))
    job = Job("answer", IMAGE, text="long")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(JobCancelled):
                    await executor.submit(job)

            tg.start_soon(call)
            while not runner.running:
                await anyio.sleep(0)
            job.cancelled.set()
        while executor.running:
            await anyio.sleep(0)
    executor.stop()
    assert runner.cancelled == [job.id] and not runner.running


async def test_a_failed_step_fails_every_job_in_it_and_the_executor_keeps_serving() -> None:
    runner = FakeRunner(steps=2, fail_on="poison")
    executor = await started(Executor(lambda: runner, max_active=8, max_wait_ms=20))
    errors: list[str] = []

    async def call(text: str) -> None:
        try:
            await executor.submit(Job("answer", IMAGE, text=text))
        except RuntimeError as error:
            errors.append(f"{text}: {error}")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for text in ("a", "poison", "b"):
                tg.start_soon(call, text)
        runner.running.clear()
        assert (await executor.submit(Job("answer", IMAGE, text="later"))).segments == ("later",)  # type: ignore[union-attr]
    executor.stop()
    assert sorted(errors) == [f"{t}: CUDA error: device-side assert" for t in ("a", "b", "poison")]


async def test_a_job_the_runner_rejects_fails_alone() -> None:
    executor = await started(Executor(lambda: FakeRunner(steps=1), max_wait_ms=0))
    with anyio.fail_after(10):
        with pytest.raises(ValueError, match="cannot run"):
            await executor.submit(Job("answer", IMAGE, text="bad job"))
        assert await executor.submit(Job("answer", IMAGE, text="fine"))
    executor.stop()


async def test_a_model_that_fails_to_load_reports_why() -> None:
    def broken() -> FakeRunner:
        raise FileNotFoundError("no such checkpoint")

    executor = Executor(broken)
    executor.start()
    assert not await executor.wait_ready(5)
    assert executor.state == "failed" and "no such checkpoint" in (executor.error or "")
    with pytest.raises(ModelNotReady, match="failed to load"):
        await executor.submit(Job("answer", IMAGE, text="x"))
