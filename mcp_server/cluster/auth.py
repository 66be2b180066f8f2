"""Bearer tokens for the stateless ingress, each naming the principal that owns the handles its calls make.

Stateless serving has no MCP session to bind handles to, so the principal stands in for it: two callers with
different tokens never see each other's images, objects, masks or overlays. Tokens come from an environment variable
(a Kubernetes secret in deploy/rayservice.yaml), never from the Serve config itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from mcp_server.http_auth import ASGIApp, Receive, Scope, Send, authorization, refuse
from mcp_server.state import PRINCIPAL_SCOPE_KEY


def parse_tokens(spec: str) -> dict[str, str]:
    """``'alice=TOKEN_A,bob=TOKEN_B'`` → ``{TOKEN_A: 'alice', TOKEN_B: 'bob'}``; a malformed entry is an error that
    says what to write (never echoing a token)."""
    tokens: dict[str, str] = {}
    for number, entry in enumerate(filter(None, (e.strip() for e in spec.split(","))), start=1):
        principal, _, token = entry.partition("=")
        if not principal.strip() or len(token.strip()) < 16:
            raise ValueError(f"token entry {number} must be principal=token with a token of 16 characters or more")
        if token.strip() in tokens:
            raise ValueError(f"token entry {number} repeats another entry's token")
        tokens[token.strip()] = principal.strip()
    return tokens


def principal_for(tokens: Mapping[str, str], authorization: bytes | None) -> str | None:
    """The principal whose token the ``Authorization`` header carries, comparing in constant time, or ``None``."""
    if authorization is None or not authorization.startswith(b"Bearer "):
        return None
    presented = authorization.removeprefix(b"Bearer ").strip()
    found = None
    for token, principal in tokens.items():
        if hmac.compare_digest(presented, token.encode()):
            found = principal
    return found


def principal_guard(app: ASGIApp, tokens: Mapping[str, str]) -> ASGIApp:
    """Refuse HTTP requests without a known bearer token (401, with the challenge of
    :func:`mcp_server.http_auth.refuse`); pass the others on with their principal in the
    scope's ``state`` (:data:`~mcp_server.state.PRINCIPAL_SCOPE_KEY`), where the tools read their owner."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        presented = authorization(scope)
        principal = principal_for(tokens, presented)
        if principal is None:
            await refuse(send, presented is not None)
            return
        scope["state"] = {**(scope.get("state") or {}), PRINCIPAL_SCOPE_KEY: principal}
        await app(scope, receive, send)

    return guarded
