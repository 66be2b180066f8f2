"""The stdio transport's lines, screened before the SDK reads them, and the one writer of the protocol stream.

The SDK (mcp 2.x) drops, without an answer, a request line it cannot validate: a client that sent one waits until its
own timeout (docs/reliability.md, "Malformed JSON-RPC"). :func:`screen` looks at each line first and answers what
JSON-RPC 2.0 says to answer: a parse error (-32700) or an invalid request (-32600), echoing the request's id where it
is a valid one and ``null`` where it is not. A UTF-8 byte order mark before a message is dropped (RFC 8259 lets a
parser ignore it) and the message goes on. Every other line goes to the SDK unchanged, notifications and responses
included: a malformed notification has no id to answer, so it is left to the SDK.

Those answers and the SDK's own messages share stdout, so :class:`ProtocolOut` owns it: it writes whole lines only,
one at a time, however the writers' buffers split them. Like the SDK, it keeps the protocol stream on a private
duplicate of fd 1 and points fd 1 at stderr, so that stray output (a library's print, a child process) cannot
corrupt the stream.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from typing import Any, cast

from pydantic_core import from_json


BOM = b"\xef\xbb\xbf"
PARSE_ERROR = -32700
INVALID_REQUEST = -32600


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (a pipe takes a long message in several writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def error_line(request_id: int | str | None, code: int, message: str) -> bytes:
    """One JSON-RPC error response, newline-terminated."""
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return json.dumps(body).encode() + b"\n"


def screen(line: bytes) -> tuple[bytes | None, bytes | None]:
    """``(line for the SDK, answer for the client)``: at most one of them is set; both ``None`` drops the line.

    ``line`` is one message without its newline.
    """
    line = line.removeprefix(BOM)
    if not line.strip():
        return None, None
    try:
        message = from_json(line)
    except ValueError as error:
        reason = str(error).split("\n")[0][:120]
        return None, error_line(None, PARSE_ERROR, f"parse error: {reason}; send one JSON object per line")
    problem = request_problem(message)
    if problem is None:
        return line, None
    request_id, text = problem
    return None, error_line(request_id, INVALID_REQUEST, f"invalid request: {text}")


def request_problem(message: Any) -> tuple[int | str | None, str] | None:
    """What makes ``message`` an invalid request that must be answered, as ``(id to echo, why)``; else ``None``."""
    if isinstance(message, list):
        return None, "batches are not supported (MCP removed JSON-RPC batching); send one request per line"
    if not isinstance(message, dict):
        return None, "a message is a JSON object"
    fields = cast("dict[str, Any]", message)
    if "method" not in fields or "id" not in fields:
        return None  # a response, or a notification: nothing to answer
    request_id = fields["id"]
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None, f"the id must be a string or an integer, not {json.dumps(request_id)[:40]}"
    if fields.get("jsonrpc") != "2.0":
        return request_id, 'the "jsonrpc" member must be "2.0"'
    if not isinstance(fields["method"], str):
        return request_id, "the method must be a string"
    if "params" in fields and not isinstance(fields["params"], dict):
        return request_id, "params must be an object (named arguments), not an array or a value"
    return None


class ProtocolOut(io.RawIOBase):
    """stdout for the protocol: complete lines, each written whole under one lock (see the module docstring).

    :meth:`divert` takes over fd 1; :attr:`stand_in` is what ``sys.stdout`` should be while serving.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._lock = threading.Lock()
        self._partial = bytearray()  # the start of a line the writer has not finished
        self.stand_in = StdoutStandIn(io.BufferedWriter(self))

    @classmethod
    def divert(cls) -> ProtocolOut:
        """Keep the wire on a private duplicate of fd 1 and point fd 1 at stderr; :meth:`restore` undoes it."""
        import fcntl

        wire = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
        os.dup2(2, 1)
        return cls(wire)

    def restore(self) -> None:
        """Point fd 1 back at the wire."""
        os.dup2(self._fd, 1)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Buffered bytes from the SDK's writer: complete lines go out, the rest waits for its end."""
        chunk = bytes(data)
        with self._lock:
            self._partial += chunk
            end = self._partial.rfind(b"\n") + 1
            if end:
                write_all(self._fd, bytes(self._partial[:end]))
                del self._partial[:end]
        return len(chunk)

    def write_line(self, line: bytes) -> None:
        """One whole line of our own (newline-terminated), between the SDK's lines, never inside one."""
        with self._lock:
            write_all(self._fd, line)


class StdoutStandIn:
    """``sys.stdout`` while serving: the SDK's stdio transport takes its ``buffer`` (the protocol stream, written
    through :class:`ProtocolOut`); text printed to it, and its file descriptor, are stderr's, as the SDK does for
    stray output."""

    encoding = "utf-8"

    def __init__(self, protocol: io.BufferedWriter) -> None:
        self.buffer = protocol

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def fileno(self) -> int:
        return 2

    def isatty(self) -> bool:
        return False
