"""The executor with a fake runner gated by events: batching, admission, cancellation, deadlines, error fan-out,
routing, out-of-memory splitting, device failure and draining."""

import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import numpy as np
import pytest

from mcp_server.executor import (
    DeadlineExceeded,
    DeviceFailed,
    Executor,
    JobCancelled,
    ModelNotReady,
    OutOfDeviceMemory,
    Overloaded,
    ShuttingDown,
)
from mcp_server.messages import DecodedImage, DeviceFailure, GenerationJob, GenerationOutcome, Job, StepOutOfMemory
from nextchat.tasks import TaskPrompt


pytestmark = pytest.mark.anyio
IMAGE = DecodedImage(np.zeros((8, 8, 3), dtype=np.uint8), "sha")


def ask(text: str, deadline: float | None = None) -> GenerationJob:
    """A job whose prompt is ``text`` (the fake runner echoes it)."""
    return GenerationJob(image=IMAGE, prompt=TaskPrompt(text), deadline=deadline)


def text_of(job: Job) -> str:
    assert isinstance(job, GenerationJob)
    return job.prompt.message


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeRunner:
    """Jobs finish after ``steps`` steps; each step waits for ``gate`` when one is set. Outcomes echo the job text.

    Failures, as a real runner reports them (it drops every job it holds when a step raises): a step with
    ``fail_on`` running raises a plain error; more than ``capacity`` jobs, or ``oom_on`` among them, run out of
    memory; ``fatal_on`` is a device failure.
    """

    def __init__(
        self,
        steps: int = 2,
        gate: threading.Event | None = None,
        fail_on: str | None = None,
        capacity: int | None = None,
        oom_on: str | None = None,
        fatal_on: str | None = None,
    ) -> None:
        self.steps, self.gate, self.fail_on = steps, gate, fail_on
        self.capacity, self.oom_on, self.fatal_on = capacity, oom_on, fatal_on
        self.running: dict[int, tuple[Job, int]] = {}
        self.batches: list[list[str]] = []
        self.ran: list[str] = []
        self.cancelled: list[int] = []
        self.out_of_memory = 0
        self.step_started = threading.Event()

    def submit(self, job: Job) -> None:
        if text_of(job) == "bad job":
            raise ValueError("this job cannot run")
        self.running[job.id] = (job, 0)
        self.ran.append(text_of(job))

    def cancel(self, job_id: int) -> None:
        self.cancelled.append(job_id)

    def has_work(self) -> bool:
        return bool(self.running)

    def step(self):
        self.step_started.set()
        if self.gate is not None:
            self.gate.wait(5)
        texts = sorted(text_of(job) for job, _ in self.running.values())
        self.batches.append(texts)
        too_big = self.capacity is not None and len(texts) > self.capacity
        for failure, failed in (
            (RuntimeError("step failed"), self.fail_on in texts),
            (StepOutOfMemory("CUDA out of memory"), too_big or self.oom_on in texts),
            (DeviceFailure("CUDA error: an illegal memory access was encountered"), self.fatal_on in texts),
        ):
            if failed:
                self.running.clear()
                self.out_of_memory += isinstance(failure, StepOutOfMemory)
                raise failure
        finished = []
        for job_id, (job, done) in list(self.running.items()):
            if job_id in self.cancelled or done + 1 >= self.steps:
                del self.running[job_id]
                finished.append(
                    (
                        job_id,
                        GenerationOutcome((text_of(job),), (), "cancelled" if job_id in self.cancelled else "stop"),
                    )
                )
            else:
                self.running[job_id] = (job, done + 1)
        return finished


@pytest.fixture
async def start() -> AsyncIterator[Callable[[Executor], Awaitable[Executor]]]:
    """Starts a test's executors (each ready within 5 s) and stops them after it, whatever the test did."""
    executors: list[Executor] = []

    async def start_one(executor: Executor) -> Executor:
        executors.append(executor)
        executor.start()
        assert await executor.wait_ready(5)
        return executor

    yield start_one
    for executor in executors:
        executor.stop()


async def test_results_are_routed_to_their_own_requests_under_200_concurrent_calls(start) -> None:
    runner = FakeRunner(steps=3)
    executor = await start(Executor(lambda: runner, max_queue=256, max_active=32, max_wait_ms=1))
    results: dict[str, str] = {}

    async def call(i: int) -> None:
        outcome = await executor.generate(ask(f"q{i}"))
        assert isinstance(outcome, GenerationOutcome)
        results[f"q{i}"] = outcome.segments[0]

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(call, i)
    assert results == {f"q{i}": f"q{i}" for i in range(200)}
    assert max(len(b) for b in runner.batches) > 1  # requests really ran together


async def test_jobs_arriving_together_form_one_batch_up_to_max_active(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=3, max_wait_ms=50))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(executor.generate, ask(f"q{i}"))
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            gate.set()
    assert [len(b) for b in runner.batches] == [3, 2]


async def test_a_full_queue_rejects_exactly_the_overflow(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_queue=4, max_active=1, max_wait_ms=0))
    outcomes: list[str] = []

    async def call(i: int) -> None:
        try:
            await executor.generate(ask(f"q{i}"))
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
    assert outcomes.count("overloaded") == 3 and outcomes.count("ok") == 5


async def test_one_owner_fills_only_its_share_of_the_queue(start) -> None:
    """A session that sends more than its share is refused with its own sentence; other sessions and owner-less
    callers still get in, and the session's share comes back as its jobs finish."""
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_queue=16, max_queue_per_owner=3, max_active=1, max_wait_ms=0))
    outcomes: dict[str, str] = {}

    async def call(text: str, owner: str | None) -> None:
        job = ask(text)
        job.owner = owner
        try:
            await executor.generate(job)
            outcomes[text] = "ok"
        except Overloaded as error:
            outcomes[text] = str(error) if error.retry_after_s >= 1 else "no retry hint"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a0", "session-a")
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)  # a0 runs and holds the only slot
            for i in range(1, 6):  # a1, a2 fit in the share (a0 counts: it is unfinished); a3..a5 do not
                tg.start_soon(call, f"a{i}", "session-a")
            while len(outcomes) < 3:
                await anyio.sleep(0)
            for text, owner in (("b0", "session-b"), ("b1", "session-b"), ("stdio", None)):
                tg.start_soon(call, text, owner)
            while executor.queue_depth < 6:  # a0..a2, b0, b1, stdio
                await anyio.sleep(0)
            gate.set()
        await call("a6", "session-a")  # every job of session-a has finished: its share is free again
    refused = [text for text, outcome in outcomes.items() if outcome != "ok"]
    assert sorted(refused) == ["a3", "a4", "a5"]
    assert all("this session already has 3 requests in progress" in outcomes[text] for text in refused)
    assert sorted(runner.ran) == ["a0", "a1", "a2", "a6", "b0", "b1", "stdio"]


async def test_a_job_cancelled_while_queued_never_runs(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=1, max_wait_ms=0))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.generate, ask("first"))
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await executor.generate(ask("cancelled"))
            gate.set()
        await executor.generate(ask("after"))
    assert "cancelled" not in runner.ran and runner.ran == ["first", "after"]


async def test_a_running_job_cancelled_leaves_at_the_next_step(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1000, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=2, max_wait_ms=0))
    job = ask("long")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(JobCancelled):
                    await executor.generate(job)

            tg.start_soon(call)
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)  # running, held inside its first step
            job.cancelled.set()
            gate.set()
        while executor.running:
            await anyio.sleep(0)
    assert runner.cancelled == [job.id] and not runner.running
    assert len(runner.batches) <= 3  # stopped within a step or two, not after its 1000


async def test_a_failed_step_fails_every_job_in_it_and_the_executor_keeps_serving(start) -> None:
    runner = FakeRunner(steps=2, fail_on="poison")
    executor = await start(Executor(lambda: runner, max_active=8, max_wait_ms=20))
    errors: list[str] = []

    async def call(text: str) -> None:
        try:
            await executor.generate(ask(text))
        except RuntimeError as error:
            errors.append(f"{text}: {error}")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for text in ("a", "poison", "b"):
                tg.start_soon(call, text)
        assert (await executor.generate(ask("later"))).segments == ("later",)  # type: ignore[union-attr]
    assert sorted(errors) == [f"{t}: step failed" for t in ("a", "b", "poison")]


async def test_a_job_the_runner_rejects_fails_alone(start) -> None:
    executor = await start(Executor(lambda: FakeRunner(steps=1), max_wait_ms=0))
    with anyio.fail_after(10):
        with pytest.raises(ValueError, match="cannot run"):
            await executor.generate(ask("bad job"))
        assert (await executor.generate(ask("fine"))).segments == ("fine",)


async def test_a_model_that_fails_to_load_reports_why() -> None:
    def broken() -> FakeRunner:
        raise FileNotFoundError("no such checkpoint")

    executor = Executor(broken)
    executor.start()
    assert not await executor.wait_ready(5)
    assert executor.state == "failed" and "no such checkpoint" in (executor.error or "")
    with pytest.raises(ModelNotReady, match="failed to load"):
        await executor.generate(ask("x"))


async def test_a_queued_job_past_its_deadline_never_runs(start) -> None:
    now = [0.0]
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=1, max_wait_ms=0, clock=lambda: now[0]))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.generate, ask("first"))
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            late = ask("late", deadline=10.0)

            async def call_late() -> None:
                with pytest.raises(DeadlineExceeded, match="before it ran"):
                    await executor.generate(late)

            tg.start_soon(call_late)
            while executor.queue_depth < 2:
                await anyio.sleep(0)
            now[0] = 11.0
            gate.set()
    assert runner.ran == ["first"]


async def test_a_running_job_past_its_deadline_stops_at_the_next_step_and_frees_its_slot(start) -> None:
    now = [0.0]
    gate = threading.Event()
    runner = FakeRunner(steps=1000, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=2, max_wait_ms=0, clock=lambda: now[0]))
    expiring = ask("expiring", deadline=10.0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(DeadlineExceeded, match="deadline while running"):
                    await executor.generate(expiring)

            tg.start_soon(call)
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)  # running, held inside its first step
            now[0] = 11.0
            gate.set()
        assert runner.cancelled == [expiring.id] and not runner.running and executor.running == 0
        runner.steps = 1  # the slot is free again: a new job runs and finishes
        assert (await executor.generate(ask("next"))).segments == ("next",)  # type: ignore[union-attr]
    assert len([b for b in runner.batches if "expiring" in b]) <= 2  # stopped at once, not after 1000 steps


async def test_out_of_memory_splits_the_batch_and_every_request_still_gets_its_own_result(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=2, gate=gate, capacity=3)
    executor = await start(Executor(lambda: runner, max_queue=256, max_active=8, max_wait_ms=0))
    results: dict[str, object] = {}

    async def call(text: str) -> None:
        outcome = await executor.generate(ask(text))
        assert isinstance(outcome, GenerationOutcome)
        results[text] = outcome.segments[0]

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "blocker")
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)  # the worker is busy: the next 8 queue up
            for i in range(8):
                tg.start_soon(call, f"q{i}")
            while executor.queue_depth < 9:
                await anyio.sleep(0)
            gate.set()
        assert runner.out_of_memory >= 1 and executor.state == "ready"
        assert max(len(b) for b in runner.batches) == 8  # the batch that did not fit ran (and failed) whole
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(call, f"after{i}")
    expected = ["blocker", *(f"q{i}" for i in range(8)), *(f"after{i}" for i in range(100))]
    assert results == {text: text for text in expected}
    assert executor.peak_active <= 8


async def test_a_job_that_does_not_fit_even_alone_fails_with_a_retry_hint_and_the_rest_succeed(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate, oom_on="huge")
    executor = await start(Executor(lambda: runner, max_active=4, max_wait_ms=0))
    outcomes: dict[str, str] = {}
    errors: list[OutOfDeviceMemory] = []

    async def call(text: str) -> None:
        try:
            outcome = await executor.generate(ask(text))
            outcomes[text] = outcome.segments[0]  # type: ignore[union-attr]
        except OutOfDeviceMemory as error:
            errors.append(error)
            outcomes[text] = str(error)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "blocker")
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            for text in ("a", "huge", "b"):
                tg.start_soon(call, text)
            while executor.queue_depth < 4:
                await anyio.sleep(0)
            gate.set()
        assert (await executor.generate(ask("later"))).segments == ("later",)  # type: ignore[union-attr]
    assert outcomes["a"] == "a" and outcomes["b"] == "b" and outcomes["blocker"] == "blocker"
    assert "ran out of memory" in outcomes["huge"] and "retry" in outcomes["huge"]
    assert len(errors) == 1 and isinstance(errors[0], Overloaded) and errors[0].retry_after_s >= 1
    assert runner.ran.count("huge") == executor.max_oom_retries + 1


async def test_a_device_failure_fails_all_work_marks_the_executor_failed_and_calls_on_fatal(start) -> None:
    gate = threading.Event()
    fatal: list[str] = []
    runner = FakeRunner(steps=1, gate=gate, fatal_on="boom")
    executor = await start(Executor(lambda: runner, max_active=1, max_wait_ms=0, on_fatal=fatal.append))
    errors: dict[str, BaseException] = {}

    async def call(text: str) -> None:
        try:
            await executor.generate(ask(text))
        except DeviceFailed as error:
            errors[text] = error

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "boom")
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            tg.start_soon(call, "queued")
            while executor.queue_depth < 2:
                await anyio.sleep(0)
            gate.set()
        with pytest.raises(ModelNotReady, match="device failed"):
            await executor.generate(ask("after"))
    assert set(errors) == {"boom", "queued"} and all("illegal memory access" in str(e) for e in errors.values())
    assert executor.state == "failed" and len(fatal) == 1 and "illegal memory access" in fatal[0]
    assert runner.ran == ["boom"]


async def test_draining_refuses_new_jobs_and_lets_admitted_ones_finish(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=1, max_wait_ms=0))
    results: list[str] = []

    async def call(text: str) -> None:
        outcome = await executor.generate(ask(text))
        results.append(outcome.segments[0])  # type: ignore[union-attr]

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "running")
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            tg.start_soon(call, "queued")
            while executor.queue_depth < 2:
                await anyio.sleep(0)
            executor.begin_shutdown()
            with pytest.raises(ShuttingDown, match="shutting down"):
                await executor.generate(ask("too late"))
            assert not await executor.drain(0)  # still busy
            gate.set()
            assert await executor.drain(10)
    assert sorted(results) == ["queued", "running"] and "too late" not in runner.ran


async def test_stopping_after_a_drain_that_timed_out_fails_what_is_left(start) -> None:
    gate = threading.Event()
    runner = FakeRunner(steps=1, gate=gate)
    executor = await start(Executor(lambda: runner, max_active=1, max_wait_ms=0))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(JobCancelled, match="shutting down"):
                    await executor.generate(ask("stuck"))

            tg.start_soon(call)
            await anyio.to_thread.run_sync(runner.step_started.wait, 5)
            executor.begin_shutdown()
            assert not await executor.drain(0)
            executor.stop(timeout_s=0)  # the worker is still inside the step: its job is failed, not waited for
            gate.set()
