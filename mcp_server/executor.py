"""The executor: one worker thread owns the model; the asyncio side submits jobs and awaits their outcomes.

Invariants (Ray Serve's batching contract): every submitted job gets exactly one outcome or one error; an error
raised by a batched step reaches every job in that step; outcomes are routed by job id, never by position.
Admission is bounded: past ``max_queue`` waiting jobs a submit fails at once with :class:`Overloaded`.

The worker batches continuously: jobs that arrive within ``max_wait_ms`` of each other start together, up to
``max_active`` run at once, and new ones join (finished ones leave) between decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio

from mcp_server.messages import Job, Outcome


log = logging.getLogger(__name__)

State = Literal["starting", "loading", "ready", "failed", "stopped"]


class Overloaded(RuntimeError):
    """Too many jobs are waiting; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the server is busy; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class ModelNotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class JobCancelled(RuntimeError):
    """The job was cancelled or passed its deadline before it finished."""


class Runner(Protocol):
    """The synchronous model side, called only from the worker thread."""

    def submit(self, job: Job) -> None:
        """Accept a job; its outcome comes from a later :meth:`step`. May raise for a job it cannot run."""

    def step(self) -> list[tuple[int, Outcome | BaseException]]:
        """Advance the running jobs by one step; return ``(job id, outcome or error)`` for those that finished."""
        ...

    def cancel(self, job_id: int) -> None:
        """Stop a running job; it is reported (as cancelled) by the next :meth:`step`."""

    def has_work(self) -> bool:
        """Whether :meth:`step` has anything to do."""
        ...


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future[Outcome]
    loop: asyncio.AbstractEventLoop


class Executor:
    """Owns the runner in one worker thread and schedules jobs onto it.

    Args:
        runner_factory: builds the runner (loads the model); called once, inside the worker thread.
        max_queue: jobs allowed to wait; one more is refused with :class:`Overloaded`.
        max_active: jobs running at once (the batch size the runner sees).
        max_wait_ms: how long an idle worker waits for more jobs to start together.
    """

    def __init__(
        self,
        runner_factory: Callable[[], Runner],
        *,
        max_queue: int = 64,
        max_active: int = 16,
        max_wait_ms: float = 5.0,
    ) -> None:
        self._factory = runner_factory
        self.max_queue, self.max_active, self.max_wait_s = max_queue, max_active, max_wait_ms / 1000
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._waiting = 0
        self._active: dict[int, Job] = {}
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

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the model to be ready; True when it is."""
        with anyio.move_on_after(timeout_s):
            while not self._ready.is_set() and self.state not in ("failed", "stopped"):
                await anyio.to_thread.run_sync(self._ready.wait, 0.25, abandon_on_cancel=True)
        return self.state == "ready"

    async def submit(self, job: Job) -> Outcome:
        """Run a job and return its outcome; raises the job's error, :class:`Overloaded` or :class:`ModelNotReady`.

        Cancelling the awaiting task cancels the job: it never runs if still queued, and stops at the runner's next
        step if running.
        """
        if self.state != "ready":
            raise ModelNotReady(self.error or f"the model is {self.state}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        with self._lock:
            if self._waiting >= self.max_queue:
                raise Overloaded(retry_after_s=max(1.0, self._waiting * self.step_seconds))
            self._waiting += 1
            self._pending[job.id] = _Pending(job, future, loop)
        self._inbox.put(job)
        try:
            return await future
        except BaseException:
            job.cancelled.set()
            self._inbox.put(None)  # wake the worker so the cancellation is seen at its next step
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker; jobs still pending get :class:`JobCancelled`."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.state = "stopped"
        with self._lock:
            pending = list(self._pending.values())
        for item in pending:
            self._resolve(item.job.id, JobCancelled("the server is shutting down"))

    # ------------------------------------------------------------------------------------------------------------
    # Worker thread

    def _resolve(self, job_id: int, outcome: Outcome | BaseException) -> None:
        with self._lock:
            item = self._pending.pop(job_id, None)
            self._active.pop(job_id, None)
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
        self.runner_info = {k: getattr(runner, k, None) for k in ("device", "dtype", "model_name")}
        self.state = "ready"
        self._ready.set()
        log.info("model ready after %.1f s", time.monotonic() - self.started_at)
        while not self._stop.is_set():
            self._admit(runner, block=not runner.has_work())
            for job_id, job in list(self._active.items()):
                if job.cancelled.is_set():
                    runner.cancel(job_id)
            if not runner.has_work():
                continue
            started = time.perf_counter()
            try:
                finished = runner.step()
            except BaseException as error:
                log.exception("model step failed")
                finished = [(job_id, error) for job_id in list(self._active)]
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - started)
            for job_id, outcome in finished:
                if isinstance(outcome, BaseException) or not self._active[job_id].cancelled.is_set():
                    self._resolve(job_id, outcome)
                else:
                    self._resolve(job_id, JobCancelled("the request was cancelled"))

    def _admit(self, runner: Runner, block: bool) -> None:
        """Move waiting jobs to the runner; when idle, wait for one and then ``max_wait_ms`` for company."""
        taken: list[Job] = []
        deadline = None
        while len(self._active) + len(taken) < self.max_active:
            try:
                if block and not taken:
                    item = self._inbox.get(timeout=0.5)
                elif deadline is not None:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.perf_counter()))
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                if self._stop.is_set():
                    break
                continue
            taken.append(item)
            if block and deadline is None:
                deadline = time.perf_counter() + self.max_wait_s
        for job in taken:
            with self._lock:
                self._waiting -= 1
                if job.id not in self._pending:
                    continue
                self._active[job.id] = job
            if job.cancelled.is_set():
                self._resolve(job.id, JobCancelled("the request was cancelled before it ran"))
            elif job.deadline is not None and time.monotonic() > job.deadline:
                self._resolve(job.id, JobCancelled("the request passed its deadline before it ran"))
            else:
                try:
                    runner.submit(job)
                except Exception as error:
                    self._resolve(job.id, error)
