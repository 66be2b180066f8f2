"""``segment_object``: a pixel mask for one object, given by object id, query or box."""

from __future__ import annotations

from typing import Annotated

import anyio
import numpy as np
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ResourceLink
from pydantic import Field

from mcp_server import box_masks, rendering
from mcp_server.messages import MaskPrompt
from mcp_server.schemas import (
    BoxArg,
    CocoRle,
    CoordinateSpace,
    ImageArg,
    ImageInfo,
    ObjectIdArg,
    OverlayArg,
    Provenance,
    QueryArg,
    ResultModel,
    Warnings,
)
from mcp_server.state import AppContext
from mcp_server.stores import StoredImage, StoredPicture, new_handle
from mcp_server.tools.steps import ToolCall, ToolSpec, image_fields, normalized
from nextchat import tasks
from nextchat.tasks import Box


class SegmentResult(ResultModel):
    """A mask for one object."""

    warnings: Warnings
    image: ImageInfo
    coordinate_space: CoordinateSpace
    object_id: str | None = Field(description="The object the mask belongs to (None for a caller's box).")
    phrase: str | None
    mask_uri: str = Field(description="mask://<id>.png: PNG, 0/255, the image's size. Read it as a resource.")
    empty: bool = Field(description="True exactly when the mask has no pixel (then box is null).")
    filtered_low_iou: bool = Field(
        description="True when the official filter emptied the mask: SAM's IoU prediction was under the model's "
        "threshold (0.3 for NExT-Chat)."
    )
    box: list[float] | None = Field(description="Tight pixel box of the mask (None when empty).")
    box_normalized: list[float] | None
    prompt_box: list[float] = Field(description="The box the mask was prompted with, in pixels (clipped).")
    prompt_box_clipped: bool = Field(description="True when the caller's box reached past the image and was clipped.")
    box_margin_px: int | None = Field(
        description=f"For a caller's box: how far past it the mask may reach ({box_masks.MARGIN_RULE}); only parts "
        "of the mask that overlap the box are kept. None for an object id or query."
    )
    area_px: int
    area_fraction: float
    iou_prediction: float = Field(description="SAM's predicted IoU for this mask (its own score, 0–1).")
    rle: CocoRle
    overlay_uri: str | None = None
    provenance: Provenance


async def segment_object(
    image: ImageArg,
    ctx: AppContext,
    query: QueryArg | None = None,
    box: BoxArg | None = None,
    object_id: ObjectIdArg | None = None,
    overlay: OverlayArg = False,
) -> Annotated[CallToolResult, SegmentResult]:
    """A pixel mask for one object, given by exactly one of: object_id (from locate_objects on this image id;
    reuses its state, the fastest), query (located first, then segmented), or box ([x1, y1, x2, y2] pixels).

    The mask is the resource mask_uri (PNG, 0/255, the image's size) and COCO RLE; iou_prediction is SAM's own
    estimate of the mask's quality. `empty` is true exactly when the mask has no pixel; `filtered_low_iou` says the
    official IoU filter emptied it. For a box, the box is clipped to the image (`prompt_box_clipped`) and the mask
    keeps only the parts that overlap it, at most `box_margin_px` past its edges.
    """
    if sum(v is not None for v in (query, box, object_id)) != 1:
        raise ToolError("give exactly one of object_id, query or box")
    call = ToolCall(ctx)
    stored = await call.image(image)
    object_id, phrase, prompt_box, prompt = await _mask_target(call, stored, query, box, object_id)
    outcome = await call.segment(stored, prompt)
    mask, score, filtered = outcome.masks[0], outcome.scores[0], outcome.empty[0]
    if box is not None:
        mask = await anyio.to_thread.run_sync(box_masks.keep_in_box, mask, prompt_box)
    mask_id = new_handle("")
    call.app.masks.put((call.owner, mask_id), StoredPicture(rendering.mask_png(mask), "image/png", stored.handle))
    tight = mask_box(mask)
    image_info, space = image_fields(stored)
    area = int(mask.sum())
    result = SegmentResult(
        image=image_info, coordinate_space=space, object_id=object_id, phrase=phrase, mask_uri=f"mask://{mask_id}.png",
        empty=tight is None, filtered_low_iou=filtered, box=tight,
        box_normalized=normalized(tight, stored) if tight else None, prompt_box=[round(v, 1) for v in prompt_box],
        prompt_box_clipped=box is not None and list(prompt_box) != [float(v) for v in box],
        box_margin_px=box_masks.margin_px(prompt_box) if box is not None else None,
        area_px=area, area_fraction=round(area / mask.size, 6),
        iou_prediction=round(score, 4), rle=CocoRle.model_validate(rendering.coco_rle(mask)),
        warnings=call.warnings, provenance=call.provenance(),
    )  # fmt: skip
    finished = call.finish(result, stored, [(object_id or "box", prompt_box)], [mask], overlay)
    link = ResourceLink(
        type="resource_link", uri=result.mask_uri, name=f"mask-{mask_id[:8]}.png", mime_type="image/png"
    )
    finished.content.append(link)
    return finished


async def _mask_target(
    call: ToolCall, stored: StoredImage, query: str | None, box: list[float] | None, object_id: str | None
) -> tuple[str | None, str | None, Box, MaskPrompt]:
    """What to segment: ``(object id, phrase, prompt box, prompt)`` for an object id, a query (located first, and
    kept as a new object) or a caller's box."""
    if object_id is not None:
        found = call.stored_object(stored, object_id)
        return object_id, found.phrase, found.box, MaskPrompt(state=found.state)
    if query is not None:
        located = await call.generate(stored, tasks.locate_one(query))
        if not located.objects:
            raise call.refusal(f"the model did not locate {query!r}; try another wording or pass a box.")
        (obj,) = call.detected(stored, located.objects[:1])
        found = stored.objects[obj.id]
        return obj.id, found.phrase, found.box, MaskPrompt(state=found.state)
    prompt_box = call.check_box(stored, box or [])
    return None, None, prompt_box, MaskPrompt(box=prompt_box)


def mask_box(mask: np.ndarray) -> list[float] | None:
    """Tight pixel box (exclusive max) of a bool ``[H, W]`` mask, or ``None`` when it has no pixel."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


TOOL = ToolSpec(segment_object, title="Segment an object")
