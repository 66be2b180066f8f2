"""``status``: what the server runs and how busy it is."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from mcp_server.schemas import ResultModel
from mcp_server.state import AppContext
from mcp_server.tools.steps import ToolSpec


class StatusResult(ResultModel):
    """What the server runs and how busy it is."""

    model: str
    note: str = Field(description="What the model knows (its scope, as every result's provenance.scope says).")
    device: str | None
    dtype: str | None
    state: Literal["starting", "loading", "ready", "failed", "stopped"]
    error: str | None
    queue_depth: int
    running: int
    uptime_s: float
    images_cached: int
    handle_lifetime_s: float


def status(ctx: AppContext) -> StatusResult:
    """The model, its device, whether it is ready, and how many requests are waiting."""
    app = ctx.request_context.lifespan_context
    executor = app.executor
    info = executor.runner_info
    return StatusResult(
        model=app.model.name,
        note=app.model_scope(),
        device=str(info["device"]) if info.get("device") else None,
        dtype=str(info["dtype"]) if info.get("dtype") else None,
        state=executor.state,
        error=app.public_error(),
        queue_depth=executor.queue_depth,
        running=executor.running,
        uptime_s=round(time.monotonic() - executor.started_at, 1),
        images_cached=len(app.images),
        handle_lifetime_s=app.settings.handle_ttl_s,
    )


TOOL = ToolSpec(status, title="Server status", takes_image=False)
