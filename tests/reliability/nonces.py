"""Requests that carry a nonce: each has its own image (distinct size, random pixels), so the answer's width, height
and sha256 prefix say which request it belongs to. Shared by the load tests and the HTTP session tests."""

import base64
import hashlib
import io
import time
from dataclasses import dataclass, field

import anyio
import numpy as np
from mcp import Client
from PIL import Image


DEADLINE_S = 120.0
MIX = ("locate_objects", "visual_qa", "describe_region", "segment_object")


@dataclass(frozen=True)
class Nonce:
    """One request's own image and what its answer must echo."""

    number: int
    png: bytes
    width: int
    height: int

    @classmethod
    def make(cls, number: int) -> "Nonce":
        width, height = 16 + number % 113, 16 + (number // 113) % 97
        pixels = np.random.default_rng([7, number]).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return cls(number, buffer.getvalue(), width, height)

    @property
    def uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()

    @property
    def sha_prefix(self) -> str:
        return hashlib.sha256(self.png).hexdigest()[:16]

    @property
    def box(self) -> list[float]:
        return [1.0, 2.0, float(self.width - 1), float(self.height - 2)]


def arguments(tool: str, nonce: Nonce) -> dict:
    if tool == "locate_objects":
        return {"image": nonce.uri, "query": "the red box", "max_objects": 2}
    if tool == "visual_qa":
        return {"image": nonce.uri, "question": "What is in the picture?", "ground": nonce.number % 2 == 0}
    return {"image": nonce.uri, "box": nonce.box}


def mismatch(tool: str, nonce: Nonce, result: dict) -> str | None:
    """Why ``result`` is not the answer to ``nonce``'s request, or None."""
    image = result["image"]
    if (image["width"], image["height"], image["sha256_prefix"]) != (nonce.width, nonce.height, nonce.sha_prefix):
        return f"request {nonce.number} got image {image}"
    space = result["coordinate_space"]
    if (space["image_width"], space["image_height"]) != (nonce.width, nonce.height):
        return f"request {nonce.number} got coordinate space {space}"
    if tool == "segment_object" and result["rle"]["size"] != [nonce.height, nonce.width]:
        return f"request {nonce.number} got a mask of size {result['rle']['size']}"
    if tool in ("segment_object", "describe_region"):
        echoed = result["prompt_box"] if tool == "segment_object" else result["region"]["box"]
        if echoed != [round(v, 1) for v in nonce.box]:
            return f"request {nonce.number} got box {echoed}"
    return None


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    mismatched: int = 0
    tool_errors: int = 0
    internal_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    handles: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict:
        counts = {k: getattr(self, k) for k in ("sent", "answered", "lost", "mismatched")}
        return counts | {"tool_errors": self.tool_errors, "internal_errors": self.internal_errors}


async def request(client: Client, tool: str, nonce: Nonce, tally: Tally) -> None:
    tally.sent += 1
    started = time.perf_counter()
    try:
        with anyio.fail_after(DEADLINE_S):
            result = await client.call_tool(tool, arguments(tool, nonce))
    except TimeoutError:
        tally.lost += 1
        tally.problems.append(f"request {nonce.number} ({tool}) got no answer within {DEADLINE_S:.0f} s")
        return
    except Exception as error:  # anything but a result is an internal error of the exchange
        tally.internal_errors += 1
        tally.problems.append(f"request {nonce.number} ({tool}): {type(error).__name__}: {error}")
        return
    tally.latencies.append(time.perf_counter() - started)
    tally.answered += 1
    if result.is_error:
        tally.tool_errors += 1
        tally.problems.append(f"request {nonce.number} ({tool}): {result.content}")
        return
    structured = result.structured_content or {}
    problem = mismatch(tool, nonce, structured)
    owner = tally.handles.setdefault(structured["image"]["id"], nonce.number)
    if problem is None and owner != nonce.number:
        problem = f"request {nonce.number} got the image id of request {owner}"
    if problem:
        tally.mismatched += 1
        tally.problems.append(problem)
