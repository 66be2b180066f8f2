"""The resources tools link to: masks (``mask://<id>.png``) and overlay pictures (``overlay://<id>.jpg``).

Over streamable HTTP each belongs to the session that made it; any other session is told it does not exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from mcp_server.state import AppState, session_owner


@dataclass(frozen=True)
class ResourceSpec:
    """A resource template as the server registers it."""

    reader: Callable[..., bytes]
    uri: str
    name: str
    mime_type: str
    description: str


def app_state(ctx: Context) -> AppState:
    """The shared state (resource readers get an untyped context: the SDK cannot inject ``Context[AppState]``)."""
    state = ctx.request_context.lifespan_context
    if not isinstance(state, AppState):
        raise TypeError("the server's lifespan context is not its AppState")
    return state


def read_mask(mask_id: str, ctx: Context) -> bytes:
    item = app_state(ctx).masks.get((session_owner(ctx), mask_id))
    if item is None:
        raise ResourceNotFoundError("mask not found: it expired or was never issued; call segment_object again")
    return item.data


def read_overlay(overlay_id: str, ctx: Context) -> bytes:
    item = app_state(ctx).overlays.get((session_owner(ctx), overlay_id))
    if item is None:
        raise ResourceNotFoundError("overlay not found: it expired or was never issued; call the tool again")
    return item.data


RESOURCES = (
    ResourceSpec(read_mask, "mask://{mask_id}.png", "mask", "image/png",
                 "A mask from segment_object: PNG, 0/255, the image's size."),
    ResourceSpec(read_overlay, "overlay://{overlay_id}.jpg", "overlay", "image/jpeg",
                 "An overlay picture from a tool called with overlay=true."),
)  # fmt: skip
