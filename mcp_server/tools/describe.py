"""``describe_region``: a description of one region (a box or a located object), or an answer about it."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field

from mcp_server.schemas import (
    BoxArg,
    CoordinateSpace,
    DetectedObject,
    ImageArg,
    ImageInfo,
    ObjectIdArg,
    OverlayArg,
    Provenance,
    QuestionArg,
    ResultModel,
    Warnings,
)
from mcp_server.state import AppContext
from mcp_server.tools.steps import ToolCall, ToolSpec, image_fields, normalized, with_markers
from nextchat import tasks


class Region(ResultModel):
    """The region a description is about, echoed back."""

    box: list[float]
    box_normalized: list[float]
    object_id: str | None = None
    clipped: bool = Field(
        default=False, description="True when the caller's box reached past the image and was clipped."
    )


class DescribeResult(ResultModel):
    """A description of (or an answer about) one region."""

    warnings: Warnings
    image: ImageInfo
    coordinate_space: CoordinateSpace
    region: Region
    question: str | None
    description: str
    objects: list[DetectedObject] = Field(description="Objects the description located, if any.")
    overlay_uri: str | None = None
    provenance: Provenance


async def describe_region(
    image: ImageArg,
    ctx: AppContext,
    box: BoxArg | None = None,
    object_id: ObjectIdArg | None = None,
    question: QuestionArg | None = None,
    overlay: OverlayArg = False,
) -> Annotated[CallToolResult, DescribeResult]:
    """Describe the region given by box ([x1, y1, x2, y2] pixels) or object_id, or answer `question` about it
    (write [region] in the question where the region belongs). The region goes to the model as a box, not a crop.
    """
    if (box is None) == (object_id is None):
        raise ToolError("give exactly one of box or object_id")
    call = ToolCall(ctx)
    stored = await call.image(image)
    region = call.stored_object(stored, object_id).box if object_id is not None else call.check_box(stored, box or [])
    outcome = await call.generate(stored, tasks.describe_region(region, question or None))
    objects = call.detected(stored, outcome.objects)
    image_info, space = image_fields(stored)
    result = DescribeResult(
        image=image_info, coordinate_space=space,
        region=Region(
            box=[round(v, 1) for v in region], box_normalized=normalized(region, stored), object_id=object_id,
            clipped=box is not None and list(region) != [float(v) for v in box],
        ),
        question=question, description=with_markers(outcome, [o.id for o in objects]), objects=objects,
        warnings=call.warnings, provenance=call.provenance(),
    )  # fmt: skip
    boxes = [(object_id or "region", region), *[(o.id, o.box) for o in objects]]
    return call.finish(result, stored, boxes, overlay=overlay)


TOOL = ToolSpec(describe_region, title="Describe a region")
