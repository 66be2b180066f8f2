"""Tool arguments and results: the pydantic models are the single source of truth for every tool's schema.

``python -m mcp_server.schemas --write`` regenerates ``tools_schema/<tool>.json`` (input and output schema of each
tool, as the server publishes them); ``--check`` fails when the committed files drift.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


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
QueryArg = Annotated[
    str,
    Field(min_length=1, max_length=500, description="What to find, as a noun phrase: 'the red mug', 'all the cups'."),
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
QuestionArg = Annotated[str, Field(min_length=1, max_length=1000, description="The question to answer.")]
OverlayArg = Annotated[
    bool,
    Field(description="Also return a picture with the boxes (and mask) drawn and numbered like the object ids."),
]
MaxObjectsArg = Annotated[int, Field(ge=1, le=50, strict=True, description="Most objects to return.")]


# ------------------------------------------------------------------------------------------------------------------
# Results


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageInfo(_Model):
    """The image a result is about."""

    id: str = Field(description="Handle to pass as `image` in later calls instead of the image itself.")
    width: int
    height: int
    sha256_prefix: str = Field(description="First 16 hex digits of the sha256 of the image bytes.")


class CoordinateSpace(_Model):
    """How to read every box of a result."""

    units: Literal["px"] = "px"
    origin: Literal["top-left"] = "top-left"
    box_format: Literal["xyxy"] = "xyxy"
    image_width: int
    image_height: int
    normalized: Literal["box_normalized = box / [width, height, width, height]"] = (
        "box_normalized = box / [width, height, width, height]"
    )


class Provenance(_Model):
    """Where a result came from."""

    model: str
    elapsed_ms: float
    decoding: Literal["greedy"] = "greedy"


class DetectedObject(_Model):
    """An object the model located."""

    id: str = Field(description="Object id for segment_object / describe_region (scoped to the image id).")
    phrase: str = Field(description="The words of the answer this object belongs to.")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels, clipped to the image.")
    box_normalized: list[float] = Field(description="The box divided by the image size (0–1).")
    center: list[float] = Field(description="[x, y] centre of the box in pixels (a click target).")


class LocateResult(_Model):
    """Objects a query refers to."""

    image: ImageInfo
    coordinate_space: CoordinateSpace
    query: str
    found: bool
    objects: list[DetectedObject]
    explanation: str = Field(description="The model's answer, with [o1], [o2]... where it placed each object.")
    overlay_uri: str | None = None
    provenance: Provenance


class CocoRle(_Model):
    """COCO compressed RLE (column-major run lengths), as pycocotools' ``mask.decode`` reads it."""

    size: list[int] = Field(description="[height, width]")
    counts: str


class SegmentResult(_Model):
    """A mask for one object."""

    image: ImageInfo
    coordinate_space: CoordinateSpace
    object_id: str | None = Field(description="The object the mask belongs to (None for a caller's box).")
    phrase: str | None
    mask_uri: str = Field(description="mask://<id>.png: PNG, 0/255, the image's size. Read it as a resource.")
    empty: bool = Field(description="True when SAM's IoU prediction was under the threshold; the mask is all 0.")
    box: list[float] | None = Field(description="Tight pixel box of the mask (None when empty).")
    box_normalized: list[float] | None
    prompt_box: list[float] = Field(description="The box the mask was prompted with, in pixels.")
    area_px: int
    area_fraction: float
    iou_prediction: float = Field(description="SAM's predicted IoU for this mask (its own score, 0–1).")
    rle: CocoRle
    overlay_uri: str | None = None
    provenance: Provenance


class Region(_Model):
    """The region a description is about, echoed back."""

    box: list[float]
    box_normalized: list[float]
    object_id: str | None = None


class DescribeResult(_Model):
    """A description of (or an answer about) one region."""

    image: ImageInfo
    coordinate_space: CoordinateSpace
    region: Region
    question: str | None
    description: str
    objects: list[DetectedObject] = Field(description="Objects the description located, if any.")
    overlay_uri: str | None = None
    provenance: Provenance


class VisualQAResult(_Model):
    """An answer, with the objects it mentions when grounded."""

    image: ImageInfo
    coordinate_space: CoordinateSpace
    question: str
    answer: str = Field(description="The answer; with ground, [o1], [o2]... mark where each evidence object is.")
    grounded: bool
    evidence: list[DetectedObject] = Field(description="Objects the answer mentions, located in the image.")
    overlay_uri: str | None = None
    provenance: Provenance


class StatusResult(_Model):
    """What the server runs and how busy it is."""

    model: str
    note: str
    device: str | None
    dtype: str | None
    state: Literal["starting", "loading", "ready", "failed", "stopped"]
    error: str | None
    queue_depth: int
    running: int
    uptime_s: float
    images_cached: int
    handle_lifetime_s: float


TOOL_RESULTS: dict[str, type[BaseModel]] = {
    "locate_objects": LocateResult,
    "segment_object": SegmentResult,
    "describe_region": DescribeResult,
    "visual_qa": VisualQAResult,
    "status": StatusResult,
}


# ------------------------------------------------------------------------------------------------------------------
# tools_schema/: what the server publishes, one file per tool


def published_tools() -> dict[str, dict]:
    """Each tool's name, title, description, annotations, input and output schema, as ``tools/list`` gives them."""
    import anyio

    from mcp_server.server import create_server
    from mcp_server.settings import Settings

    async def listing() -> list:
        return await create_server(Settings()).list_tools()

    tools = anyio.run(listing)
    return {t.name: t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools}


def main(argv: list[str] | None = None) -> None:
    """``python -m mcp_server.schemas --write | --check`` (tools_schema/ next to the package)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Write or check tools_schema/<tool>.json")
    parser.add_argument("--write", action="store_true", help="regenerate the files")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from the server")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent / "tools_schema")
    args = parser.parse_args(argv)
    expected = {
        f"{name}.json": json.dumps(tool, indent=2, sort_keys=True) + "\n" for name, tool in published_tools().items()
    }
    if args.write:
        args.dir.mkdir(exist_ok=True)
        for stale in {p.name for p in args.dir.glob("*.json")} - set(expected):
            (args.dir / stale).unlink()
        for name, text in expected.items():
            (args.dir / name).write_text(text)
        print(f"wrote {len(expected)} schemas to {args.dir}")
        return
    actual = {p.name: p.read_text() for p in args.dir.glob("*.json")} if args.dir.is_dir() else {}
    drifted = sorted(n for n in set(expected) | set(actual) if expected.get(n) != actual.get(n))
    if drifted:
        print(f"tools_schema/ is out of date ({', '.join(drifted)}); run: python -m mcp_server.schemas --write")
        sys.exit(1)
    print("tools_schema/ matches the server")


if __name__ == "__main__":
    main()
