"""``visual_qa``: an answer about the image, with the objects it mentions located as evidence."""

from __future__ import annotations

from typing import Annotated

from mcp.types import CallToolResult
from pydantic import Field

from mcp_server.schemas import (
    CoordinateSpace,
    DetectedObject,
    ImageArg,
    ImageInfo,
    OverlayArg,
    Provenance,
    QuestionArg,
    ResultModel,
    Warnings,
)
from mcp_server.state import AppContext
from mcp_server.tools.steps import ToolCall, ToolSpec, image_fields, with_markers
from nextchat import tasks


class VisualQAResult(ResultModel):
    """An answer, with the objects it mentions when grounded."""

    warnings: Warnings
    image: ImageInfo
    coordinate_space: CoordinateSpace
    question: str
    answer: str = Field(description="The answer; with ground, [o1], [o2]... mark where each evidence object is.")
    grounded: bool
    evidence: list[DetectedObject] = Field(description="Objects the answer mentions, located in the image.")
    overlay_uri: str | None = None
    provenance: Provenance


async def visual_qa(
    image: ImageArg, question: QuestionArg, ctx: AppContext, ground: bool = True, overlay: OverlayArg = False
) -> Annotated[CallToolResult, VisualQAResult]:
    """Answer a question about the image. With ground (default) the model also locates the objects its answer
    mentions: `evidence` lists them (id, phrase, box) and the answer marks them [o1], [o2]...
    """
    call = ToolCall(ctx)
    stored = await call.image(image)
    outcome = await call.generate(stored, tasks.answer_question(question, ground))
    objects = call.detected(stored, outcome.objects)
    image_info, space = image_fields(stored)
    result = VisualQAResult(
        image=image_info, coordinate_space=space, question=question,
        answer=with_markers(outcome, [o.id for o in objects]),
        grounded=ground, evidence=objects, warnings=call.warnings, provenance=call.provenance(),
    )  # fmt: skip
    return call.finish(result, stored, [(o.id, o.box) for o in objects], overlay=overlay)


TOOL = ToolSpec(visual_qa, title="Visual question answering")
