"""The steps every tool shares: resolve the image, run a job, name the objects, finish the result.

A tool handler opens a :class:`ToolCall` on its context and reads as its task: resolve the ``image`` argument to a
handle, run one job on the executor (waiting for the model while it loads, within the call's deadline), give located
objects ids scoped to the image handle, and finish with a typed result mirrored as JSON text (plus an overlay picture
when asked). Errors the caller can fix are :class:`ToolError` s: one sentence naming the fix.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel

from mcp_server import image_io, overlays
from mcp_server.executor import JobCancelled, ModelNotReady, Overloaded
from mcp_server.messages import (
    FoundObject,
    GenerationJob,
    GenerationOutcome,
    MaskJob,
    MaskOutcome,
    MaskPrompt,
)
from mcp_server.schemas import CoordinateSpace, DetectedObject, ImageInfo, Provenance
from mcp_server.state import AppContext, AppState, session_owner
from mcp_server.stores import Owner, StoredImage, StoredObject, StoredPicture, new_handle
from mcp_server.text import clean_text
from nextchat.tasks import Box, TaskPrompt


IMAGE_HANDLE = re.compile(r"^img_[0-9a-f]{32}$")
OutcomeT = TypeVar("OutcomeT", GenerationOutcome, MaskOutcome)


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the server registers it: the handler (its docstring is the description agents read), a title,
    and whether it takes an ``image`` (so it may fetch URLs, when the server allows them)."""

    handler: Callable[..., Any]
    title: str
    takes_image: bool = True


class ToolCall:
    """One tool call in progress: its shared state, the caller (owner of the handles it makes), its start time and
    its deadline.

    The deadline (``--timeout`` from the call's arrival) covers every step: reading or fetching the image, decoding
    it, waiting in the queue, the model, and the answer. Cancelling the call stops whichever step it is in.
    """

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.app: AppState = ctx.request_context.lifespan_context
        self.owner: Owner = session_owner(ctx)
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + self.app.settings.request_timeout_s
        self.warnings: list[str] = []  # what the model said about the image, from every job of the call

    def remaining_s(self) -> float:
        """Seconds left before the deadline (0 once passed)."""
        return max(0.0, self.deadline - time.monotonic())

    def timed_out(self) -> ToolError:
        return ToolError(f"the request took over {self.app.settings.request_timeout_s:.0f} s and was dropped; retry")

    # ------------------------------------------------------------------------------------------------------------
    # Inputs

    async def image(self, image: str) -> StoredImage:
        """The caller's image: a handle it holds, or the argument loaded, checked and given a handle."""
        if IMAGE_HANDLE.match(image):
            stored = self.app.images.get(image, self.owner)
            if stored is None:
                raise ToolError(
                    f"image id {image} not found: it expired or was never issued; "
                    "call the tool again with the image itself"
                )
            return stored
        if self.app.executor.draining:  # no new decode for a call the model would refuse anyway
            raise ToolError("the server is shutting down and takes no new requests; retry shortly")
        try:
            with anyio.fail_after(self.remaining_s()):
                data, source = await anyio.to_thread.run_sync(
                    image_io.image_bytes, image, self.app.policy, limiter=self.app.reader_limiter(),
                    abandon_on_cancel=True,
                )  # fmt: skip
        except TimeoutError:
            raise self.timed_out() from None
        except image_io.ImageInputError as error:
            raise ToolError(str(error)) from None
        try:
            loaded = await self.app.decoder.decode(data, self.app.policy, source, self.deadline, self.app.input_sides())
        except image_io.ImageInputError as error:
            raise ToolError(str(error)) from None
        return self.app.images.add(loaded, self.owner)

    @staticmethod
    def stored_object(stored: StoredImage, object_id: str) -> StoredObject:
        """An object located earlier in this image, by id."""
        found = stored.objects.get(object_id)
        if found is None:
            raise ToolError(f"object {object_id} not found for image {stored.handle}; call locate_objects again")
        return found

    @staticmethod
    def check_box(stored: StoredImage, box: Sequence[float]) -> Box:
        """A caller's pixel box, clipped to the image; refused when it is not a box or misses the image."""
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
            raise ToolError("box must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2, in pixels")
        width, height = stored.image.width, stored.image.height
        cx1, cy1 = max(0.0, x1), max(0.0, y1)
        cx2, cy2 = min(float(width), x2), min(float(height), y2)
        if cx2 - cx1 < 1 or cy2 - cy1 < 1:
            raise ToolError(f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
        return cx1, cy1, cx2, cy2

    # ------------------------------------------------------------------------------------------------------------
    # Model work

    async def generate(self, stored: StoredImage, prompt: TaskPrompt, max_new_tokens: int = 64) -> GenerationOutcome:
        """The model's answer to a task prompt about the image."""
        job = GenerationJob(image=stored.image, prompt=prompt, max_new_tokens=max_new_tokens, owner=self.owner)
        return await self._run(self.app.executor.generate, job)

    async def segment(self, stored: StoredImage, prompt: MaskPrompt) -> MaskOutcome:
        """A mask on the image for a located object or a given box."""
        job = MaskJob(image=stored.image, prompts=(prompt,), owner=self.owner)
        return await self._run(self.app.executor.segment, job)

    async def _run(self, submit: Callable[[Any], Awaitable[OutcomeT]], job: GenerationJob | MaskJob) -> OutcomeT:
        await self._model_ready()
        job.deadline = self.deadline
        try:
            with anyio.fail_after(self.remaining_s()):
                outcome = await submit(job)
        except TimeoutError:
            raise self.timed_out() from None
        except (Overloaded, JobCancelled, ModelNotReady, ValueError) as error:
            raise ToolError(str(error)) from None
        self.warnings += [warning for warning in outcome.warnings if warning not in self.warnings]
        return outcome

    async def _model_ready(self) -> None:
        """Wait (reporting progress) while the model loads, up to the server's ready wait.

        That wait is bounded by ``--ready-wait``, not ``--timeout``: the call's deadline moves on by the time spent
        here, so a call that arrived during a slow load still gets its full ``--timeout`` for the model's work.
        """
        self.app.start()  # a server that loads its model on first use (``nextchat-mcp call``) starts it now
        executor, wait_s = self.app.executor, self.app.settings.ready_wait_s
        waited, started = 0.0, time.monotonic()
        while waited < wait_s and executor.state in ("starting", "loading"):
            await self.ctx.report_progress(waited, wait_s, "loading the model")
            await executor.wait_ready(1.0)
            waited += 1.0
        self.deadline += time.monotonic() - started
        if executor.state == "failed":
            raise ToolError(f"{self.app.public_error()}; check the server's --model and its log")
        if executor.state != "ready":
            raise ToolError(f"the model is warming up; retry in {max(5, int(wait_s))} s")

    # ------------------------------------------------------------------------------------------------------------
    # Results

    def detected(self, stored: StoredImage, objects: Sequence[FoundObject]) -> list[DetectedObject]:
        """Located objects kept under new ids of the image, as results report them."""
        out: list[DetectedObject] = []
        for obj in objects:
            object_id = stored.add_object(clean_text(obj.phrase), obj.box, obj.state)
            out.append(detected_object(stored, object_id, obj.phrase, obj.box))
        return out

    def provenance(self) -> Provenance:
        return Provenance(
            model=self.app.model_label(), scope=self.app.model_scope(),
            elapsed_ms=round((time.perf_counter() - self.started) * 1000, 1),
        )  # fmt: skip

    def refusal(self, sentence: str) -> ToolError:
        """A :class:`ToolError` saying ``sentence``, followed by what the model said about the image."""
        return ToolError(" ".join([sentence, *self.warnings]))

    def finish(
        self,
        result: BaseModel,
        stored: StoredImage,
        boxes: Sequence[tuple[str, Sequence[float]]],
        masks: Sequence[np.ndarray] = (),
        overlay: bool = False,
    ) -> CallToolResult:
        """The result as structured content and its JSON text, plus the overlay picture (and its link) when asked."""
        content: list[ContentBlock] = []
        if overlay:
            jpeg = overlays.overlay_jpeg(stored.image.pixels, boxes, masks)
            overlay_id = new_handle("")
            self.app.overlays.put((self.owner, overlay_id), StoredPicture(jpeg, "image/jpeg", stored.handle))
            uri = f"overlay://{overlay_id}.jpg"
            result = result.model_copy(update={"overlay_uri": uri})
            content += [
                ImageContent(type="image", data=base64.b64encode(jpeg).decode(), mime_type="image/jpeg"),
                ResourceLink(
                    type="resource_link", uri=uri, name=f"overlay-{overlay_id[:8]}.jpg", mime_type="image/jpeg",
                    size=len(jpeg),
                ),
            ]  # fmt: skip
        return CallToolResult(
            content=[TextContent(type="text", text=result.model_dump_json(indent=1)), *content],
            structured_content=result.model_dump(mode="json"),
        )


def image_fields(stored: StoredImage) -> tuple[ImageInfo, CoordinateSpace]:
    """The ``image`` and ``coordinate_space`` parts of a result about ``stored``."""
    width, height = stored.image.width, stored.image.height
    return (
        ImageInfo(id=stored.handle, width=width, height=height, sha256_prefix=stored.image.sha256[:16]),
        CoordinateSpace(image_width=width, image_height=height),
    )


def with_markers(outcome: GenerationOutcome, ids: Sequence[str]) -> str:
    """The generated text with ``[o1]``-style markers where each object was located."""
    parts = [outcome.segments[0]]
    for object_id, segment in zip(ids, outcome.segments[1:], strict=True):
        parts += [f"[{object_id}]", segment]
    return clean_text(re.sub(r"\s+([.,;:!?])", r"\1", " ".join(p for p in parts if p)).strip())


def detected_object(stored: StoredImage, object_id: str, phrase: str, box: Sequence[float]) -> DetectedObject:
    """A located object as tools report it (pixel box, normalized box, centre)."""
    x1, y1, x2, y2 = (round(float(v), 1) for v in box)
    return DetectedObject(
        id=object_id,
        phrase=clean_text(phrase),
        box=[x1, y1, x2, y2],
        box_normalized=normalized((x1, y1, x2, y2), stored),
        center=[round((x1 + x2) / 2, 1), round((y1 + y2) / 2, 1)],
    )


def normalized(box: Sequence[float], stored: StoredImage) -> list[float]:
    """A pixel box divided by the image's size."""
    w, h = stored.image.width, stored.image.height
    return [round(box[0] / w, 4), round(box[1] / h, 4), round(box[2] / w, 4), round(box[3] / h, 4)]
