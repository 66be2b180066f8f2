"""Untrusted image decoding in a small pool of worker processes, each under limits the operating system enforces.

Decoders run C code over attacker-chosen bytes and cannot be interrupted from Python: a progressive JPEG with
thousands of scans, or a run-length BMP that Pillow decodes in Python, runs for minutes in whichever thread started
it, holding the GIL, a core and memory. So decoding (with EXIF orientation and the conversion to RGB) runs in a
worker process:

- each worker has an address-space limit (``RLIMIT_AS``: what it had after start-up plus ``memory_bytes``) and, per
  image, a CPU-time limit (``RLIMIT_CPU``) at the call's deadline plus a margin, and runs at a lower CPU priority
  than the server, so model steps and protocol work go first;
- the parent waits at most until the call's deadline, then kills the worker (``SIGKILL``) and starts a fresh one
  for the next image; a worker that dies on its own is replaced the same way;
- the caller gets one sentence (:data:`TOO_LONG`), and only the RGB pixels come back (as raw bytes, no pickle).

Workers come from the ``forkserver`` context: forking the threaded server itself could copy a lock held by another
thread into the child. Waits run in threads of the pool's own limiter, never in the shared thread pool, so a burst
of decodes cannot delay a ``status`` call or a resource read. No lock on the decode path: each worker decodes one
image at a time, so the warning filters :func:`~mcp_server.image_io.decode_image` swaps are its own.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import anyio
import anyio.to_thread
import numpy as np

from mcp_server.image_io import DecodedImage, ImageInputError, ImagePolicy, decode_image


TOO_LONG = "the image took too long to decode; send a smaller or baseline image"
TOO_BIG = "the image needs more memory to decode than this server allows; send a smaller image"
CRASHED = "the image decoder stopped on this image; send a different (re-encoded) image"
SHUTTING_DOWN = "the server is shutting down and takes no new requests; retry shortly"
WORKER_NICENESS = 5  # decodes yield the CPU to the model and the protocol
CPU_MARGIN_S = 1.0  # the CPU limit is the time left before the deadline plus this (the parent's kill comes first)


class DecodeRefused(ImageInputError):
    """The decode did not finish: too long, too much memory, a crashed decoder or a server shutting down."""


def _worker_main(connection: Connection, memory_bytes: int) -> None:
    """A worker's life: set its limits, then decode requests until the parent closes the pipe."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + memory_bytes, resource.RLIM_INFINITY))
    while True:
        try:
            data, policy, source, cpu_seconds = connection.recv()
        except (EOFError, OSError):
            return
        _limit_cpu(cpu_seconds)
        try:
            image = decode_image(data, policy, source)
        except ImageInputError as error:
            connection.send(("error", str(error)))
            continue
        except MemoryError:
            connection.send(("error", TOO_BIG))
            continue
        pixels = np.ascontiguousarray(image.pixels)
        connection.send(("ok", pixels.shape, image.sha256, image.format))
        connection.send_bytes(pixels.data.cast("B"))


def _address_space() -> int:
    """This process's mapped bytes (``VmSize``), or 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_cpu(seconds: float) -> None:
    """Let this process use ``seconds`` more CPU time; past that the kernel sends SIGXCPU, which ends it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CPU, (int(used + seconds) + 1, resource.RLIM_INFINITY))


@dataclass(eq=False)  # compared and hashed by identity: the pool keeps its busy workers in a set
class _Worker:
    process: BaseProcess
    connection: Connection

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        """End the process (from any thread); the thread talking to it then reads end of file. The pipe stays open
        until :meth:`discard`: closing it under that thread would fail its read with an unrelated error."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()

    def discard(self) -> None:
        """Kill the process and close the pipe: only once no thread uses the pipe any more."""
        self.kill()
        with contextlib.suppress(OSError):
            self.connection.close()
        self.process.join(1.0)

    def why_dead(self) -> str:
        """The caller's sentence for a worker that died on its own."""
        self.process.join(1.0)
        return TOO_LONG if self.process.exitcode == -signal.SIGXCPU else CRASHED


@dataclass
class _Call:
    """One decode in progress; ``abandon`` (from the event loop) kills the worker it runs in, if any."""

    data: bytes
    policy: ImagePolicy
    source: str
    deadline: float
    worker: _Worker | None = None
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, worker: _Worker) -> bool:
        with self.lock:
            self.worker = worker
            return not self.abandoned

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            if self.worker is not None:
                self.worker.kill()


class DecodePool:
    """Decodes images in ``workers`` worker processes (started when first needed).

    Args:
        workers: processes decoding at once; more calls wait for one (within their deadline).
        memory_bytes: address space each worker may map beyond what it had after start-up.
    """

    def __init__(self, workers: int = 2, memory_bytes: int = 2 << 30) -> None:
        self.workers, self.memory_bytes = workers, memory_bytes
        self._context = multiprocessing.get_context("forkserver")
        # The fork server imports the decoder once; each worker is then a cheap fork of it.
        self._context.set_forkserver_preload(["mcp_server.decode_pool"])
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._limiter: anyio.CapacityLimiter | None = None
        self.replaced = 0  # workers killed or dead and replaced (for tests and figures)

    @property
    def closed(self) -> bool:
        return self._closed

    async def decode(self, data: bytes, policy: ImagePolicy, source: str, deadline: float) -> DecodedImage:
        """Decode ``data`` in a worker by ``deadline`` (``time.monotonic()``), waiting for a free worker first.

        Raises:
            ImageInputError: the image is refused (its own sentence), or :class:`DecodeRefused` when the decode did
                not finish (:data:`TOO_LONG`, :data:`TOO_BIG`, :data:`CRASHED`, :data:`SHUTTING_DOWN`).
        """
        if self._closed:
            raise DecodeRefused(SHUTTING_DOWN)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.workers)
        call = _Call(data, policy, source, deadline)
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                return await anyio.to_thread.run_sync(self._run, call, limiter=self._limiter, abandon_on_cancel=True)
        except TimeoutError:
            call.abandon()
            raise DecodeRefused(TOO_LONG) from None
        except BaseException:
            call.abandon()  # the caller was cancelled: its decode stops now, not at the deadline
            raise

    def close(self) -> None:
        """Kill every worker, busy or idle; later decodes are refused with :data:`SHUTTING_DOWN`."""
        with self._lock:
            self._closed = True
            idle, busy = list(self._idle), list(self._busy)
            self._idle.clear()
        for worker in busy:
            worker.kill()  # the thread waiting for it sees end of file and discards it
        for worker in idle:
            worker.discard()

    # ------------------------------------------------------------------------------------------------------------
    # Worker threads (one per decode in progress, at most ``workers``)

    def _run(self, call: _Call) -> DecodedImage:
        worker = self._checkout()
        try:
            if not call.attach(worker):
                raise DecodeRefused(TOO_LONG)
            return self._exchange(worker, call)
        finally:
            self._checkin(worker)

    def _exchange(self, worker: _Worker, call: _Call) -> DecodedImage:
        remaining = call.deadline - time.monotonic()
        try:
            worker.connection.send((call.data, call.policy, call.source, max(0.0, remaining) + CPU_MARGIN_S))
            if not worker.connection.poll(max(0.0, remaining)):
                worker.kill()
                raise DecodeRefused(TOO_LONG)
            reply = worker.connection.recv()
            if reply[0] == "error":
                raise ImageInputError(reply[1])
            shape: tuple[int, ...] = tuple(int(n) for n in reply[1])
            sha256, fmt = str(reply[2]), str(reply[3])
            pixels = bytearray(math.prod(shape))
            worker.connection.recv_bytes_into(pixels)
        except (EOFError, OSError, BrokenPipeError):
            worker.kill()
            raise DecodeRefused(SHUTTING_DOWN if self._closed else worker.why_dead()) from None
        array = np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
        return DecodedImage(pixels=array, sha256=sha256, source=call.source, format=fmt)

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise DecodeRefused(SHUTTING_DOWN)
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = self._spawn()
        with self._lock:
            closed = self._closed
            if not closed:
                self._busy.add(worker)
        if closed:
            worker.discard()
            raise DecodeRefused(SHUTTING_DOWN)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if worker.alive() and not self._closed:
                self._idle.append(worker)
                return
            self.replaced += 1
        worker.discard()

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, self.memory_bytes), name="nextchat-decode", daemon=True
        )
        process.start()
        child_end.close()
        return _Worker(process, parent_end)
