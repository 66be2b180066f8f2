"""What the tools share in their schemas: argument types and the parts every result is made of.

The pydantic models are the single source of truth for every tool's schema: each tool's own result model lives in its
module under ``mcp_server/tools/`` and is built from these parts. ``python -m mcp_server.schema_files --write``
regenerates ``tools_schema/<tool>.json`` from what the server publishes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


# ------------------------------------------------------------------------------------------------------------------
# Arguments (flat tool parameters; each alias carries its description and bounds)

ImageArg = Annotated[
    str,
    Field(
        min_length=1,
        max_length=40_000_000,
        description=(
            "The image: an image id returned by an earlier call (img_...), an absolute path inside an allowed "
            "directory, a file:// URI, an https:// URL, a data:image/...;base64, URI, or raw base64."
        ),
    ),
]


def _not_blank(text: str) -> str:
    """Refuses text with no visible character: the model would answer about nothing."""
    if not text.strip():
        raise ValueError("is blank (only whitespace); give some words")
    return text


# Published as a pattern (JSON Schema's search semantics: at least one non-space character); checked by _not_blank,
# whose message names the fix.
_NOT_BLANK = Field(json_schema_extra={"pattern": r"\S"})

QueryArg = Annotated[
    str,
    Field(min_length=1, max_length=500, description="What to find, as a noun phrase: 'the red mug', 'all the cups'."),
    _NOT_BLANK,
    AfterValidator(_not_blank),
]
BoxArg = Annotated[
    list[float],
    Field(
        min_length=4,
        max_length=4,
        description="A region as [x1, y1, x2, y2] in pixels of the original image, origin top-left.",
    ),
]
ObjectIdArg = Annotated[
    str,
    Field(
        min_length=1,
        max_length=16,
        pattern=r"^o[0-9]+$",
        description="An object id (o1, o2, ...) returned by locate_objects or visual_qa for this image.",
    ),
]
QuestionArg = Annotated[
    str,
    Field(min_length=1, max_length=1000, description="The question to answer."),
    _NOT_BLANK,
    AfterValidator(_not_blank),
]
OverlayArg = Annotated[
    bool,
    Field(description="Also return a picture with the boxes (and mask) drawn and numbered like the object ids."),
]
MaxObjectsArg = Annotated[int, Field(ge=1, le=50, strict=True, description="Most objects to return.")]


# ------------------------------------------------------------------------------------------------------------------
# Results


class ResultModel(BaseModel):
    """A part of a tool result: unknown fields are an error, so what is published is exactly what is sent."""

    model_config = ConfigDict(extra="forbid")


class ImageInfo(ResultModel):
    """The image a result is about."""

    id: str = Field(description="Handle to pass as `image` in later calls instead of the image itself.")
    width: int
    height: int
    sha256_prefix: str = Field(description="First 16 hex digits of the sha256 of the image bytes.")


class CoordinateSpace(ResultModel):
    """How to read every box of a result."""

    units: Literal["px"] = "px"
    origin: Literal["top-left"] = "top-left"
    box_format: Literal["xyxy"] = "xyxy"
    image_width: int
    image_height: int
    normalized: Literal["box_normalized = box / [width, height, width, height]"] = (
        "box_normalized = box / [width, height, width, height]"
    )


class Provenance(ResultModel):
    """Where a result came from."""

    model: str
    scope: str = Field(description="What the model knows; outside it, its boxes, masks and answers mean nothing.")
    elapsed_ms: float
    decoding: Literal["greedy"] = "greedy"


Warnings = Annotated[
    list[str],
    Field(
        description="Sentences to act on before trusting anything else in the result, e.g. that the image lies "
        "outside what the model knows (then `found`, boxes, masks and answers are meaningless). Empty when none."
    ),
]


class DetectedObject(ResultModel):
    """An object the model located."""

    id: str = Field(description="Object id for segment_object / describe_region (scoped to the image id).")
    phrase: str = Field(description="The words of the answer this object belongs to.")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels, clipped to the image.")
    box_normalized: list[float] = Field(description="The box divided by the image size (0–1).")
    center: list[float] = Field(description="[x, y] centre of the box in pixels (a click target).")


class CocoRle(ResultModel):
    """COCO compressed RLE (column-major run lengths), as pycocotools' ``mask.decode`` reads it."""

    size: list[int] = Field(description="[height, width]")
    counts: str
