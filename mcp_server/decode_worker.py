"""The worker side of the decode pool: a small process that decodes one image at a time under OS limits.

Started by :class:`mcp_server.decode_pool.DecodePool` as ``python -m mcp_server.decode_worker FD MEMORY_BYTES``, a
fresh interpreter that imports only the decoder (numpy, Pillow and :mod:`mcp_server.image_io`). It is deliberately
not a :mod:`multiprocessing` child: those re-run the parent's main module in every worker, and when that module is a
program that imports torch (``python -m benchmarks.bench``, a test runner, an embedding application) each worker
start took seconds of CPU and held torch's memory for nothing.

``FD`` is the worker's end of a socket pair, spoken with :class:`multiprocessing.connection.Connection`: the parent
sends ``(data, policy, source, cpu_seconds, sides)``; the worker answers ``("error", sentence)`` or
``("ok", shape, sha256, format, (square_shape, sam_shape))`` followed by the RGB pixels as raw bytes (no pickle of
the array) and, when the parent named the model's input ``sides`` (:class:`nextchat.resizing.InputSides`), the
image's first resizes for them (each shape ``None`` where none was made): the resizes that grow with the image run
here, under the same limits, instead of in the server's model thread.

A worker ends as soon as its parent does, even in the middle of a decode: a server that exits at once (a second
SIGTERM, its exit timer, a crash or SIGKILL) cannot kill its workers first, and an orphan would go on decoding a bomb
until its CPU limit. Only the parent holds the other end of the socket, so the kernel closes that end when the parent
goes, whatever the way; a thread waits for that (``POLLRDHUP``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import sys
import threading
from multiprocessing.connection import Connection

import numpy as np

from mcp_server.image_io import ImageInputError, decode_image
from nextchat.resizing import resize_for_model


WORKER_NICENESS = 5  # decodes yield the CPU to the model and the protocol
TOO_BIG = "the image needs more memory to decode than this server allows; send a smaller image"


def serve(connection: Connection, memory_bytes: int) -> None:
    """A worker's life: set its limits, then decode requests until the parent closes its end (or goes away)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (address_space() + memory_bytes, resource.RLIM_INFINITY))
    threading.Thread(target=end_with_parent, args=(connection.fileno(),), name="parent-watch", daemon=True).start()
    while True:
        try:
            data, policy, source, cpu_seconds, sides = connection.recv()
        except (EOFError, OSError):
            return
        limit_cpu(cpu_seconds)
        try:
            image = decode_image(data, policy, source)
            pixels = np.ascontiguousarray(image.pixels)
            resized = resize_for_model(pixels, sides) if sides is not None else None
        except ImageInputError as error:
            connection.send(("error", str(error)))
            continue
        except MemoryError:
            connection.send(("error", TOO_BIG))
            continue
        firsts = (None, None) if resized is None else (resized.square, resized.sam)
        shapes = tuple(None if array is None else array.shape for array in firsts)
        connection.send(("ok", pixels.shape, image.sha256, image.format, shapes))
        for array in (pixels, *firsts):
            if array is not None:
                connection.send_bytes(np.ascontiguousarray(array).data.cast("B"))


def end_with_parent(fd: int) -> None:
    """Wait (without the GIL) until the parent's end of socket ``fd`` is closed, then end this process at once."""
    hang_up = getattr(select, "POLLRDHUP", 0) | select.POLLHUP
    watch = select.poll()
    watch.register(fd, hang_up)  # not POLLIN: the parent's requests are the main thread's to read
    while True:
        with contextlib.suppress(InterruptedError):
            if any(events & (hang_up | select.POLLERR | select.POLLNVAL) for _, events in watch.poll()):
                os._exit(0)


def address_space() -> int:
    """This process's mapped bytes (``VmSize``), or 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def limit_cpu(seconds: float) -> None:
    """Let this process use ``seconds`` more CPU time; past that the kernel sends SIGXCPU, which ends it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CPU, (int(used + seconds) + 1, resource.RLIM_INFINITY))


def main(argv: list[str]) -> None:
    """``FD MEMORY_BYTES``: serve on the inherited socket ``FD``, mapping at most ``MEMORY_BYTES`` beyond start-up."""
    fd, memory_bytes = int(argv[0]), int(argv[1])
    serve(Connection(fd), memory_bytes)


if __name__ == "__main__":
    main(sys.argv[1:])
