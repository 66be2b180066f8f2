"""The stdio transport's line screen answers malformed requests as JSON-RPC 2.0 says, and the protocol writer never
tears a line."""

from __future__ import annotations

import io
import json
import os
import threading

import pytest

from mcp_server.stdio_lines import ProtocolOut, StdoutStandIn, screen


VALID = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"status","arguments":{}}}'


def answer(line: bytes) -> dict:
    forward, reply = screen(line)
    assert forward is None and reply is not None and reply.endswith(b"\n")
    return json.loads(reply)


@pytest.mark.parametrize(
    "line",
    [
        VALID,
        b'{"jsonrpc":"2.0","id":"a","method":"ping"}',
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
        b'{"jsonrpc":"2.0","method":"notifications/x","params":[1]}',  # a notification: nothing may answer it
        b'{"jsonrpc":"2.0","id":4,"result":{}}',  # the client's answer to a server request
    ],
)
def test_valid_lines_and_notifications_go_to_the_sdk_unchanged(line: bytes) -> None:
    assert screen(line) == (line, None)


def test_a_byte_order_mark_is_ignored() -> None:
    assert screen(b"\xef\xbb\xbf" + VALID) == (VALID, None)


def test_blank_lines_are_dropped() -> None:
    assert screen(b"") == (None, None)
    assert screen(b"  \r") == (None, None)


@pytest.mark.parametrize(
    ("line", "code", "request_id", "says"),
    [
        (b'{"jsonrpc":"2.0","id":10,', -32700, None, "parse error"),
        (b"\xff\xfe not utf-8", -32700, None, "parse error"),
        (b'[{"jsonrpc":"2.0","id":8,"method":"ping"}]', -32600, None, "batches are not supported"),
        (b"[]", -32600, None, "batches are not supported"),
        (b'"ping"', -32600, None, "a message is a JSON object"),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', -32600, None, "not 1.5"),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', -32600, None, "not true"),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', -32600, None, "not null"),
        (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":["status",{}]}', -32600, 7, "params must be"),
        (b'{"jsonrpc":"1.0","id":"x","method":"ping"}', -32600, "x", '"jsonrpc" member'),
        (b'{"jsonrpc":"2.0","id":5,"method":17}', -32600, 5, "method must be a string"),
    ],
)
def test_malformed_requests_get_the_error_json_rpc_names(line: bytes, code: int, request_id, says: str) -> None:
    reply = answer(line)
    assert reply["jsonrpc"] == "2.0" and reply["id"] == request_id
    assert reply["error"]["code"] == code
    assert says in reply["error"]["message"] and "\n" not in reply["error"]["message"]


def test_the_protocol_writer_never_tears_a_line() -> None:
    """A long line written in small pieces by one thread and whole lines by another come out as whole lines."""
    read_fd, write_fd = os.pipe()
    out = ProtocolOut(write_fd)
    sdk_side = io.TextIOWrapper(io.BufferedWriter(out, buffer_size=64), encoding="utf-8")
    long_line = json.dumps({"id": 1, "result": {"text": "x" * 200_000}}) + "\n"
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(iter_read(read_fd)))
    reader.start()

    def ours() -> None:
        for number in range(200):
            out.write_line(json.dumps({"id": None, "error": {"code": -32600, "n": number}}).encode() + b"\n")

    writer = threading.Thread(target=ours)
    writer.start()
    for start in range(0, len(long_line), 997):  # the SDK's writer flushes as it goes
        sdk_side.write(long_line[start : start + 997])
        sdk_side.flush()
    writer.join()
    os.close(write_fd)
    reader.join()
    lines = bytes(received).decode().splitlines()
    assert len(lines) == 201
    assert [json.loads(line) for line in lines].count(json.loads(long_line)) == 1


def iter_read(fd: int):
    while chunk := os.read(fd, 1 << 16):
        yield from chunk
    os.close(fd)


def test_text_printed_while_serving_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    stand_in = StdoutStandIn(io.BufferedWriter(io.BytesIO()))
    print("stray", file=stand_in)
    assert capsys.readouterr().err == "stray\n"
    assert stand_in.fileno() == 2
