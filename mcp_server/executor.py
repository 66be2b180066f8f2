"""The executor: one worker thread owns the model; the asyncio side submits jobs and awaits their outcomes.

Invariants (Ray Serve's batching contract): every submitted job gets exactly one outcome or one error; an error
raised by a batched step reaches every job in that step; outcomes are routed by job id, never by position.
Admission is bounded: past ``max_queue`` waiting jobs a submit fails at once with :class:`Overloaded`.

The worker batches continuously: jobs that arrive within ``max_wait_ms`` of each other start together, up to
``max_active`` run at once, and new ones join (finished ones leave) between decode steps. A job that is cancelled or
passes its deadline never starts if it is still queued, and stops at the next step if it is running.

Failures: a step that runs out of device memory is retried with the batch split (the jobs start again from scratch,
at most half as many at a time, until enough steps have passed cleanly); a job that still does not fit fails alone
with a retryable error. A device failure fails every job, marks the executor ``failed`` and calls ``on_fatal`` so the
process can exit and be restarted. :meth:`Executor.begin_shutdown` and :meth:`Executor.drain` stop admitting and let
admitted work finish (SIGTERM).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import anyio

from mcp_server.messages import (
    DeviceFailure,
    GenerationJob,
    GenerationOutcome,
    Job,
    MaskJob,
    MaskOutcome,
    Outcome,
    StepOutOfMemory,
)


log = logging.getLogger(__name__)

State = Literal["starting", "loading", "ready", "failed", "stopped"]
OutcomeT = TypeVar("OutcomeT", GenerationOutcome, MaskOutcome)


class Overloaded(RuntimeError):
    """Too many jobs are waiting; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        super().__init__(message or f"the server is busy; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class OutOfDeviceMemory(Overloaded):
    """The job ran out of device memory even in smaller batches; retrying later may succeed."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            retry_after_s,
            f"the device ran out of memory for this request, even in a smaller batch; retry in {retry_after_s:.0f} s",
        )


class ModelNotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class ShuttingDown(ModelNotReady):
    """The server is draining before it exits and takes no new jobs."""


class DeviceFailed(ModelNotReady):
    """The device failed; the job is lost and the server must be restarted."""


class JobCancelled(RuntimeError):
    """The job was cancelled or passed its deadline before it finished."""


class DeadlineExceeded(JobCancelled):
    """The job passed its deadline (queued: it never ran; running: it was stopped at the next step)."""


class Runner(Protocol):
    """The synchronous model side, called only from the worker thread.

    Its optional attributes ``device``, ``dtype``, ``model_name``, ``scope`` (what the model knows, one sentence) and
    ``input_sides`` (:class:`nextchat.resizing.InputSides`) are reported in :attr:`Executor.runner_info` once it has
    loaded.
    """

    def submit(self, job: Job) -> None:
        """Accept a job; its outcome comes from a later :meth:`step`. May raise for a job it cannot run."""

    def step(self) -> list[tuple[int, Outcome | BaseException]]:
        """Advance the running jobs by one step; return ``(job id, outcome or error)`` for those that finished.

        Raises:
            StepOutOfMemory: the device ran out of memory; the runner dropped every job it held.
            DeviceFailure: the device is unusable; every job is lost.
            Exception: any other failure; the runner dropped every job it held (each gets this error).
        """
        ...

    def cancel(self, job_id: int) -> None:
        """Stop a running job; it is reported (as cancelled) by the next :meth:`step`."""

    def has_work(self) -> bool:
        """Whether :meth:`step` has anything to do."""
        ...


@dataclass
class _Pending(Generic[OutcomeT]):
    job: Job
    future: asyncio.Future[OutcomeT]
    loop: asyncio.AbstractEventLoop


class Executor:
    """Owns the runner in one worker thread and schedules jobs onto it.

    Args:
        runner_factory: builds the runner (loads the model); called once, inside the worker thread.
        max_queue: jobs allowed to wait; one more is refused with :class:`Overloaded`.
        max_queue_per_owner: jobs one owner (an HTTP session) may have submitted and unfinished; one more is refused
            with :class:`Overloaded`, so one session cannot fill the queue for all. Jobs without an owner (stdio,
            in-memory, stateless HTTP) only count against ``max_queue``. ``None``: no per-owner bound.
        max_active: jobs running at once (the batch size the runner sees).
        max_wait_ms: how long an idle worker waits for more jobs to start together.
        on_fatal: called (in the worker thread, with the error text) after a device failure has failed every job.
        max_oom_retries: times one job is started again after out-of-memory steps before it fails.
        oom_cooldown_steps: clean steps after which a batch limit halved by an out-of-memory step doubles again.
        clock: the monotonic clock job deadlines are read against.
    """

    def __init__(
        self,
        runner_factory: Callable[[], Runner],
        *,
        max_queue: int = 64,
        max_queue_per_owner: int | None = None,
        max_active: int = 16,
        max_wait_ms: float = 5.0,
        on_fatal: Callable[[str], None] | None = None,
        max_oom_retries: int = 2,
        oom_cooldown_steps: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = runner_factory
        self.max_queue, self.max_active, self.max_wait_s = max_queue, max_active, max_wait_ms / 1000
        self.max_queue_per_owner = max_queue_per_owner
        self._per_owner: collections.Counter[str] = collections.Counter()  # unfinished jobs of each owner
        self.on_fatal = on_fatal
        self.max_oom_retries, self.oom_cooldown_steps = max_oom_retries, oom_cooldown_steps
        self._clock = clock
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Each job's future holds the outcome type its kind of job has (the runner answers a GenerationJob with a
        # GenerationOutcome, a MaskJob with a MaskOutcome), so the map holds futures of either.
        self._pending: dict[int, _Pending[Any]] = {}
        self._lock = threading.Lock()
        self._waiting = 0
        self._accepting = True
        self._idle = threading.Event()  # set while no job is pending
        self._idle.set()
        # Worker-thread state: running jobs, jobs to start again after an out-of-memory step, and why a job the
        # runner was asked to stop is stopping.
        self._active: dict[int, Job] = {}
        self._retry: collections.deque[Job] = collections.deque()
        self._oom_retries: dict[int, int] = {}
        self._stopping: dict[int, JobCancelled] = {}
        self._clean_steps = 0
        self.batch_limit = max_active  # lowered after an out-of-memory step, raised again after clean steps
        self.peak_active = 0  # the most jobs ever running at once (never above max_active)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.state: State = "starting"
        self.error: str | None = None
        self.started_at = time.monotonic()
        self.step_seconds = 0.05  # running mean of a step, for retry hints
        self.runner_info: dict[str, object] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Asyncio side

    def start(self) -> None:
        """Start the worker thread (it loads the model first)."""
        self._thread = threading.Thread(target=self._run, name="nextchat-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not finished (waiting plus running)."""
        with self._lock:
            return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def draining(self) -> bool:
        """Whether :meth:`begin_shutdown` was called (new jobs are refused)."""
        return not self._accepting

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the model to be ready; True when it is."""
        with anyio.move_on_after(timeout_s):
            while not self._ready.is_set() and self.state not in ("failed", "stopped"):
                await anyio.to_thread.run_sync(self._ready.wait, 0.25, abandon_on_cancel=True)
        return self.state == "ready"

    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        """Run a generation job; its outcome (see :meth:`_run_job` for the errors)."""
        return await self._run_job(job, GenerationOutcome)

    async def segment(self, job: MaskJob) -> MaskOutcome:
        """Run a mask job; its outcome (see :meth:`_run_job` for the errors)."""
        return await self._run_job(job, MaskOutcome)

    async def _run_job(self, job: Job, _outcome: type[OutcomeT]) -> OutcomeT:
        """Run a job and return its outcome.

        Raises the job's error, or :class:`Overloaded`, :class:`ModelNotReady` (:class:`ShuttingDown` while
        draining), :class:`JobCancelled` (:class:`DeadlineExceeded`). Cancelling the awaiting task cancels the job:
        it never runs if still queued, and stops at the runner's next step if running.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[OutcomeT] = loop.create_future()
        # Under the lock, so that a drain that saw no pending job, or a device failure that failed them all, cannot
        # miss one admitted concurrently.
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests; retry shortly")
            if self.state != "ready":
                raise ModelNotReady(self.error or f"the model is {self.state}")
            if self._waiting >= self.max_queue:
                raise Overloaded(retry_after_s=max(1.0, self._waiting * self.step_seconds))
            self._check_owner_share(job)
            self._waiting += 1
            self._pending[job.id] = _Pending(job, future, loop)
            self._idle.clear()
        self._inbox.put(job)
        try:
            return await future
        except BaseException:
            job.cancelled.set()
            self._inbox.put(None)  # wake the worker so the cancellation is seen at its next step
            raise

    def _check_owner_share(self, job: Job) -> None:
        """Count the job against its owner's share (under the lock); refuse it when the share is used up."""
        if job.owner is None or self.max_queue_per_owner is None:
            return
        if self._per_owner[job.owner] >= self.max_queue_per_owner:
            raise Overloaded(
                max(1.0, self.max_queue_per_owner * self.step_seconds),
                f"this session already has {self.max_queue_per_owner} requests in progress; wait for their answers",
            )
        self._per_owner[job.owner] += 1

    def begin_shutdown(self) -> None:
        """Refuse new jobs with :class:`ShuttingDown`; admitted ones (queued or running) still run."""
        with self._lock:
            self._accepting = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every admitted job to finish; True when none is left.

        Call :meth:`begin_shutdown` first, or new jobs may keep the executor busy; then :meth:`stop`, which fails
        whatever is left.
        """
        with anyio.move_on_after(timeout_s):
            while not self._idle.is_set():
                await anyio.to_thread.run_sync(self._idle.wait, 0.25, abandon_on_cancel=True)
        return self._idle.is_set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker; jobs still pending get :class:`JobCancelled`."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.state != "failed":
            self.state = "stopped"
        self._resolve_all(lambda: JobCancelled("the server is shutting down"))

    # ------------------------------------------------------------------------------------------------------------
    # Worker thread

    def _resolve(self, job_id: int, outcome: Outcome | BaseException) -> None:
        with self._lock:
            item = self._pending.pop(job_id, None)
            self._active.pop(job_id, None)
            if item is not None and item.job.owner is not None and self.max_queue_per_owner is not None:
                self._per_owner[item.job.owner] -= 1
                if self._per_owner[item.job.owner] <= 0:
                    del self._per_owner[item.job.owner]
            if not self._pending:
                self._idle.set()
        self._stopping.pop(job_id, None)
        self._oom_retries.pop(job_id, None)
        if item is None:
            return

        def settle() -> None:
            if item.future.done():
                return
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

        # RuntimeError: the caller's event loop is gone, so nobody waits for this outcome.
        with contextlib.suppress(RuntimeError):
            item.loop.call_soon_threadsafe(settle)

    def _resolve_all(self, error: Callable[[], BaseException]) -> None:
        with self._lock:
            job_ids = list(self._pending)
        for job_id in job_ids:
            self._resolve(job_id, error())

    def _run(self) -> None:
        self.state = "loading"
        try:
            runner = self._factory()
        except BaseException as error:
            log.exception("model failed to load")
            self.error = f"the model failed to load ({type(error).__name__}: {str(error)[:200]})"
            self.state = "failed"
            self._ready.set()
            return
        self.runner_info = {
            k: getattr(runner, k, None) for k in ("device", "dtype", "model_name", "scope", "input_sides")
        }
        self.state = "ready"
        self._ready.set()
        log.info("model ready after %.1f s", time.monotonic() - self.started_at)
        while not self._stop.is_set():
            self._admit(runner, block=not runner.has_work() and not self._retry)
            self._stop_cancelled_and_expired(runner)
            if not runner.has_work():
                continue
            started = time.perf_counter()
            try:
                finished = runner.step()
            except StepOutOfMemory as error:
                self._retry_in_smaller_batches(error)
                continue
            except DeviceFailure as error:
                self._fail(error)
                return
            except Exception as error:
                log.exception("model step failed")
                finished = [(job_id, error) for job_id in list(self._active)]
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - started)
            self._clean_steps += 1
            if self.batch_limit < self.max_active and self._clean_steps >= self.oom_cooldown_steps:
                self.batch_limit = min(self.max_active, self.batch_limit * 2)
                self._clean_steps = 0
            for job_id, outcome in finished:
                self._finish(job_id, outcome)

    def _finish(self, job_id: int, outcome: Outcome | BaseException) -> None:
        if job_id not in self._active:
            return  # already resolved (a runner must not report a job twice; if it does, the first report stands)
        stopped = self._stopping.get(job_id)
        self._resolve(job_id, stopped if stopped is not None and not isinstance(outcome, BaseException) else outcome)

    def _stop_cancelled_and_expired(self, runner: Runner) -> None:
        """Ask the runner to stop running jobs that were cancelled or passed their deadline (once each)."""
        now = self._clock()
        for job_id, job in list(self._active.items()):
            if job_id in self._stopping:
                continue
            if job.cancelled.is_set():
                self._stopping[job_id] = JobCancelled("the request was cancelled")
            elif job.deadline is not None and now > job.deadline:
                self._stopping[job_id] = DeadlineExceeded(
                    "the request passed its deadline while running and was stopped; retry, or ask for less"
                )
            else:
                continue
            runner.cancel(job_id)

    def _retry_in_smaller_batches(self, error: StepOutOfMemory) -> None:
        """The runner dropped its jobs after running out of memory: start them again, half as many at a time."""
        affected = list(self._active.values())
        with self._lock:
            self._active.clear()
        self.batch_limit = max(1, len(affected) // 2)
        self._clean_steps = 0
        log.warning("out of device memory with %d jobs running (%s); batch limit now %d", len(affected), error,
                    self.batch_limit)  # fmt: skip
        for job in reversed(affected):  # appendleft: they start again first, in their order
            stopped = self._stopping.get(job.id)
            tries = self._oom_retries.get(job.id, 0) + 1
            if stopped is not None:
                self._resolve(job.id, stopped)
            elif tries > self.max_oom_retries:
                self._resolve(job.id, OutOfDeviceMemory(retry_after_s=max(5.0, 10 * self.step_seconds)))
            else:
                self._oom_retries[job.id] = tries
                self._retry.appendleft(job)

    def _fail(self, error: DeviceFailure) -> None:
        """A device failure: fail every job, refuse new ones, and tell ``on_fatal``."""
        log.critical("device failure, the model is unusable: %s", error)
        message = f"the device failed ({str(error)[:200]}); the server must be restarted"
        with self._lock:
            self.error = message
            self.state = "failed"
        self._retry.clear()
        # on_fatal first: a caller woken by its failed job must find the server already told.
        if self.on_fatal is not None:
            self.on_fatal(message)
        self._resolve_all(lambda: DeviceFailed(message))

    def _admit(self, runner: Runner, block: bool) -> None:
        """Move jobs to the runner (ones to start again first); when idle, wait for one, then ``max_wait_ms`` for
        company."""
        limit = min(self.max_active, self.batch_limit)
        restarted: list[Job] = []
        while self._retry and len(self._active) + len(restarted) < limit:
            restarted.append(self._retry.popleft())
        arrived = self._take_arrivals(limit - len(self._active) - len(restarted), block and not restarted)
        for job in restarted:
            self._start(runner, job)
        for job in arrived:
            with self._lock:
                self._waiting -= 1
            self._start(runner, job)

    def _take_arrivals(self, room: int, block: bool) -> list[Job]:
        """Up to ``room`` jobs from the inbox. Blocking: wait for the first (0.5 s at most, so a stop is seen), then
        up to ``max_wait_ms`` for more to start with it; otherwise only those already there."""
        taken: list[Job] = []
        deadline = None
        while len(taken) < room:
            try:
                if block and not taken:
                    item = self._inbox.get(timeout=0.5)
                elif deadline is not None:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.perf_counter()))
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:  # a wake-up (a cancellation, or a stop)
                if self._stop.is_set():
                    break
                continue
            taken.append(item)
            if block and deadline is None:
                deadline = time.perf_counter() + self.max_wait_s
        return taken

    def _start(self, runner: Runner, job: Job) -> None:
        """Hand one admitted job to the runner, unless it was cancelled or expired meanwhile."""
        with self._lock:
            if job.id not in self._pending:
                return
            self._active[job.id] = job
        self.peak_active = max(self.peak_active, len(self._active))
        if job.cancelled.is_set():
            self._resolve(job.id, JobCancelled("the request was cancelled before it ran"))
        elif job.deadline is not None and self._clock() > job.deadline:
            self._resolve(job.id, DeadlineExceeded("the request passed its deadline before it ran; retry"))
        else:
            try:
                runner.submit(job)
            except Exception as error:
                self._resolve(job.id, error)
