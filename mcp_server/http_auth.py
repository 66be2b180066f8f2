"""Bearer tokens over HTTP: the guard ``nextchat-mcp --token`` puts in front of the MCP app, and the 401 every guard
answers with.

A refused request gets what RFC 6750 (section 3) asks of a bearer-token resource: status 401 with
``WWW-Authenticate: Bearer realm="nextchat-mcp"``, plus ``error="invalid_token"`` when a token was sent but is not
accepted (none when the request carried no credentials). The body is a JSON-RPC error saying what to send: the MCP
SDK's client shows a JSON-RPC error from a non-2xx response as the call's error, where it would otherwise show only
"Server returned an error response".
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REALM = "nextchat-mcp"
UNAUTHORIZED_CODE = -32001  # JSON-RPC's server-defined range; no MCP code exists for "not authorized"


def authorization(scope: Scope) -> bytes | None:
    """The request's ``Authorization`` header, or ``None`` when it has none."""
    value: object = dict(scope.get("headers") or []).get(b"authorization")
    return value if isinstance(value, bytes) else None


def challenge(presented: bool) -> bytes:
    """The ``WWW-Authenticate`` value for a refused request (RFC 6750 §3: no error code when no token was sent)."""
    if not presented:
        return f'Bearer realm="{REALM}"'.encode()
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="the token is not accepted"'.encode()


async def refuse(send: Send, presented: bool) -> None:
    """Answer 401 with the bearer challenge and a JSON-RPC error that tells the client what to send."""
    problem = "the bearer token is not accepted" if presented else "this server needs a bearer token"
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": UNAUTHORIZED_CODE,
                "message": f"{problem}: send the header 'Authorization: Bearer <token>' with the server's token",
            },
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge(presented)),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bearer_guard(app: ASGIApp, token: str) -> ASGIApp:
    """Refuse HTTP requests without ``Authorization: Bearer <token>`` (401) before they reach the MCP app; the
    token is compared in constant time."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            presented = authorization(scope)
            if presented is None or not hmac.compare_digest(presented, expected):
                await refuse(send, presented is not None)
                return
        await app(scope, receive, send)

    return guarded
