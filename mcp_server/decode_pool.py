"""Untrusted image decoding in a small pool of worker processes, each under limits the operating system enforces.

Decoders run C code over attacker-chosen bytes and cannot be interrupted from Python: a progressive JPEG with
thousands of scans, or a run-length BMP that Pillow decodes in Python, runs for minutes in whichever thread started
it, holding the GIL, a core and memory. So decoding (with EXIF orientation and the conversion to RGB) runs in a
worker process (:mod:`mcp_server.decode_worker`), and so do the image's first resizes for the model once it has loaded
(:mod:`nextchat.resizing`: work that grows with the image, which the model thread would otherwise do while every
caller's batch waits):

- each worker has an address-space limit (``RLIMIT_AS``: what it had after start-up plus ``memory_bytes``) and, per
  image, a CPU-time limit (``RLIMIT_CPU``) at the call's deadline plus a margin, and runs at a lower CPU priority
  than the server, so model steps and protocol work go first;
- the parent waits at most until the call's deadline, then kills the worker (``SIGKILL``) and starts a fresh one
  for the next image; a worker that dies on its own is replaced the same way;
- the caller gets one sentence (:data:`TOO_LONG`), and only the RGB pixels and the resizes come back (as raw bytes,
  no pickle of an array).

Workers are fresh interpreters (``python -m mcp_server.decode_worker``, fork and exec at once, so no lock held by
another thread of the server is copied), not :mod:`multiprocessing` children, which re-run the parent's main module:
under ``python -m benchmarks.bench`` that imported torch in every worker, and the worker started in the middle of a
measured chunk held that chunk open for about 5 s (the concurrency-8 ratio fell from 2.2 to 1.3). The pool starts
all its workers in the background at its first decode, and replaces a killed or dead worker in the background too,
so a call rarely waits for a start. Waits run in threads of the pool's own limiter, never in the shared thread
pool, so a burst of decodes cannot delay a ``status`` call or a resource read. No lock on the decode path: each
worker decodes one image at a time, so the warning filters :func:`~mcp_server.image_io.decode_image` swaps are its
own.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np

from mcp_server.decode_worker import TOO_BIG
from mcp_server.image_io import DecodedImage, ImageInputError, ImagePolicy
from nextchat.resizing import InputSides, ResizedImage


TOO_LONG = "the image took too long to decode; send a smaller or baseline image"
CRASHED = "the image decoder stopped on this image; send a different (re-encoded) image"
SHUTTING_DOWN = "the server is shutting down and takes no new requests; retry shortly"
CPU_MARGIN_S = 1.0  # the CPU limit is the time left before the deadline plus this (the parent's kill comes first)
# The directory holding the ``mcp_server`` package: put first on the worker's path, so the worker runs this very
# code (a checkout run with PYTHONPATH, or an installed copy), whatever the current directory.
_CODE_ROOT = str(Path(__file__).resolve().parents[1])


class DecodeRefused(ImageInputError):
    """The decode did not finish: too long, too much memory, a crashed decoder or a server shutting down."""


@dataclass(eq=False)  # compared and hashed by identity: the pool keeps its busy workers in a set
class _Worker:
    process: subprocess.Popen[bytes]
    connection: Connection

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """End the process (from any thread); the thread talking to it then reads end of file. The socket stays
        open until :meth:`discard`: closing it under that thread would fail its read with an unrelated error."""
        with contextlib.suppress(OSError):
            self.process.kill()  # a no-op once the process has been reaped, so never another process's id

    def discard(self) -> None:
        """Kill the process and close the socket: only once no thread uses the socket any more."""
        self.kill()
        with contextlib.suppress(OSError):
            self.connection.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(1.0)

    def why_dead(self) -> str:
        """The caller's sentence for a worker that died on its own."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(1.0)
        return TOO_LONG if self.process.returncode == -signal.SIGXCPU else CRASHED


@dataclass
class _Call:
    """One decode in progress; ``abandon`` (from the event loop) kills the worker it runs in, if any."""

    data: bytes
    policy: ImagePolicy
    source: str
    deadline: float
    sides: InputSides | None
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


def _receive_array(connection: Connection, shape: tuple[int, ...]) -> np.ndarray:
    """The next uint8 array of ``shape`` the worker sends, as raw bytes."""
    dims = tuple(int(n) for n in shape)
    data = bytearray(math.prod(dims))
    connection.recv_bytes_into(data)
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _end_workers(idle: list[_Worker], busy: set[_Worker]) -> None:
    for worker in [*idle, *busy]:
        worker.discard()


class DecodePool:
    """Decodes images in ``workers`` worker processes (all started in the background at the first decode).

    Args:
        workers: processes decoding at once; more calls wait for one (within their deadline).
        memory_bytes: address space each worker may map beyond what it had after start-up.
    """

    def __init__(self, workers: int = 2, memory_bytes: int = 2 << 30) -> None:
        self.workers, self.memory_bytes = workers, memory_bytes
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._starting = 0  # workers being started in the background
        self._limiter: anyio.CapacityLimiter | None = None
        self.replaced = 0  # workers killed or dead and replaced (for tests and figures)
        # A pool dropped without close() (a server built in a test) still ends its workers, as does the process
        # when it exits; the callback holds the worker lists, not the pool.
        weakref.finalize(self, _end_workers, self._idle, self._busy)

    @property
    def closed(self) -> bool:
        return self._closed

    async def decode(
        self, data: bytes, policy: ImagePolicy, source: str, deadline: float, sides: InputSides | None = None
    ) -> DecodedImage:
        """Decode ``data`` in a worker by ``deadline`` (``time.monotonic()``), waiting for a free worker first; with
        the model's input ``sides``, the worker makes the image's first resizes for them too (``resized``).

        Raises:
            ImageInputError: the image is refused (its own sentence), or :class:`DecodeRefused` when the decode did
                not finish (:data:`TOO_LONG`, :data:`TOO_BIG`, :data:`CRASHED`, :data:`SHUTTING_DOWN`).
        """
        if self._closed:
            raise DecodeRefused(SHUTTING_DOWN)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.workers)
            self._start_spares()
        call = _Call(data, policy, source, deadline, sides)
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                return await anyio.to_thread.run_sync(self._run, call, limiter=self._limiter, abandon_on_cancel=True)
        except TimeoutError:
            call.abandon()
            raise DecodeRefused(TOO_LONG) from None
        except ImageInputError:
            raise  # the worker answered (or was dealt with): it stays for the next image, alive
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
            worker.connection.send(
                (call.data, call.policy, call.source, max(0.0, remaining) + CPU_MARGIN_S, call.sides)
            )
            if not worker.connection.poll(max(0.0, remaining)):
                worker.kill()
                raise DecodeRefused(TOO_LONG)
            reply = worker.connection.recv()
            if reply[0] == "error":
                raise ImageInputError(reply[1])
            sha256, fmt, (square_shape, sam_shape) = str(reply[2]), str(reply[3]), reply[4]
            pixels = _receive_array(worker.connection, reply[1])
            square = None if square_shape is None else _receive_array(worker.connection, square_shape)
            sam = None if sam_shape is None else _receive_array(worker.connection, sam_shape)
            resized = None if call.sides is None else ResizedImage(call.sides, square, sam)
        except (EOFError, OSError, BrokenPipeError):
            worker.kill()
            raise DecodeRefused(SHUTTING_DOWN if self._closed else worker.why_dead()) from None
        return DecodedImage(pixels=pixels, sha256=sha256, source=call.source, format=fmt, resized=resized)

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
            alive = worker.alive()
            if alive and not self._closed and self._keeps_another():
                self._idle.append(worker)
                return
            self.replaced += not alive
        worker.discard()
        if not alive:
            self._start_spares()  # the next decode finds its replacement started

    def _keeps_another(self) -> bool:
        """Whether the pool is short of ``workers`` processes (a caller may have started one while a spare was
        starting; the surplus is discarded). Call with the lock held."""
        return len(self._idle) + len(self._busy) < self.workers

    def _start_spares(self) -> None:
        """Start, in a background thread, the workers the pool is short of."""
        with self._lock:
            missing = self.workers - len(self._idle) - len(self._busy) - self._starting
            if self._closed or missing <= 0:
                return
            self._starting += missing
        threading.Thread(target=self._add_spares, args=(missing,), name="decode-pool-start", daemon=True).start()

    def _add_spares(self, count: int) -> None:
        for _ in range(count):
            try:
                worker = self._spawn()
            except OSError:
                worker = None  # out of processes or memory: a decode starts its own worker (and reports failure)
            with self._lock:
                self._starting -= 1
                kept = worker is not None and not self._closed and self._keeps_another()
                if kept and worker is not None:
                    self._idle.append(worker)
            if worker is not None and not kept:
                worker.discard()

    def _spawn(self) -> _Worker:
        """A fresh worker process, talking over a socket pair (it imports the decoder while the caller goes on)."""
        parent_end, child_end = socket.socketpair()
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH", "")) if p)
            fd = child_end.fileno()
            process = subprocess.Popen(
                [sys.executable, "-m", "mcp_server.decode_worker", str(fd), str(self.memory_bytes)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(fd,),
                env=env,
            )  # stdout is the stdio transport's channel: never the worker's; its stderr is the server's log
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        return _Worker(process, Connection(parent_end.detach()))


__all__ = ["CRASHED", "SHUTTING_DOWN", "TOO_BIG", "TOO_LONG", "DecodePool", "DecodeRefused"]
