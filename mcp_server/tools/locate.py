"""``locate_objects``: the objects a phrase refers to, as pixel boxes with ids to chain on."""

from __future__ import annotations

from typing import Annotated

from mcp.types import CallToolResult
from pydantic import Field

from mcp_server.schemas import (
    CoordinateSpace,
    DetectedObject,
    ImageArg,
    ImageInfo,
    MaxObjectsArg,
    OverlayArg,
    Provenance,
    QueryArg,
    ResultModel,
    Warnings,
)
from mcp_server.state import AppContext
from mcp_server.tools.steps import ToolCall, ToolSpec, image_fields, with_markers
from nextchat import tasks


class LocateResult(ResultModel):
    """Objects a query refers to."""

    warnings: Warnings
    image: ImageInfo
    coordinate_space: CoordinateSpace
    query: str
    found: bool
    objects: list[DetectedObject]
    explanation: str = Field(description="The model's answer, with [o1], [o2]... where it placed each object.")
    overlay_uri: str | None = None
    provenance: Provenance


async def locate_objects(
    image: ImageArg, query: QueryArg, ctx: AppContext, max_objects: MaxObjectsArg = 10, overlay: OverlayArg = False
) -> Annotated[CallToolResult, LocateResult]:
    """Find the objects a phrase refers to ('the red mug', 'all the cups') and return their pixel boxes.

    Each object gets an id (o1, o2, ...) to pass to segment_object or describe_region with the returned image id.
    `found` is false when the model located nothing. No confidence score is given: the model has none for boxes.
    """
    call = ToolCall(ctx)
    stored = await call.image(image)
    outcome = await call.generate(stored, tasks.locate_all(query), max_new_tokens=8 + 8 * max_objects)
    objects = call.detected(stored, outcome.objects[:max_objects])
    ids = [o.id for o in objects] + ["?"] * (len(outcome.objects) - len(objects))
    image_info, space = image_fields(stored)
    result = LocateResult(
        image=image_info, coordinate_space=space, query=query, found=bool(objects), objects=objects,
        explanation=with_markers(outcome, ids), warnings=call.warnings, provenance=call.provenance(),
    )  # fmt: skip
    return call.finish(result, stored, [(o.id, o.box) for o in objects], overlay=overlay)


TOOL = ToolSpec(locate_objects, title="Locate objects")
