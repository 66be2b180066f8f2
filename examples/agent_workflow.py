"""A scripted agent: start nextchat-mcp over stdio, then locate → segment (by object id) → describe → ask.

    python examples/agent_workflow.py                   # a rendered shapes scene, the embedded demo model
    python examples/agent_workflow.py --image photo.jpg --query "the dog" --model AoZhang/nextchat-7b-336

Writes into --out the mask (PNG from the mask:// resource), the server's overlay (JPEG from the overlay:// resource),
an overlay drawn here from the structured results (PNG) and, for a rendered scene, the scene itself (scene.png; an
image given with --image is read where it is, not copied); prints what each call returned and the files it wrote.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import numpy as np
from mcp import Client, StdioServerParameters
from mcp.types import BlobResourceContents
from PIL import Image

from mcp_server.overlays import draw_overlay


if TYPE_CHECKING:
    from nextchat.demo.world import Scene


async def call(client: Client, tool: str, arguments: dict) -> dict:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool} failed: {' '.join(getattr(b, 'text', '') for b in result.content)}")
    shown = {k: v for k, v in result.structured_content.items() if k not in ("rle", "coordinate_space")}
    print(f"\n{tool}({json.dumps(arguments)[:160]})\n  -> {json.dumps(shown)[:900]}")
    return result.structured_content


async def read_blob(client: Client, uri: str) -> bytes:
    """The bytes of a binary resource (a mask PNG, an overlay JPEG)."""
    contents = (await client.read_resource(uri)).contents[0]
    if not isinstance(contents, BlobResourceContents):
        raise SystemExit(f"{uri} is not a binary resource")
    return base64.b64decode(contents.blob)


def scene_image(out: Path, seed: int) -> tuple[Path, str, Scene]:
    from nextchat.demo.world import render_scene

    scene = render_scene(np.random.default_rng(seed), min_objects=3, max_objects=4)
    path = out / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path, f"the {scene.objects[0].name}", scene


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="an image file (default: render a shapes scene)")
    parser.add_argument("--query", help="what to locate (default: the first object of the rendered scene)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scene: Scene | None = None
    if args.image is None:
        image_path, query, scene = scene_image(args.out, args.seed)
        query = args.query or query
    else:
        image_path, query = args.image.resolve(), args.query or "the main object"
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_server", "--model", args.model, "--allow-dir", str(image_path.parent.resolve())],
    )
    async with Client(server) as client:
        tools = (await client.list_tools()).tools
        print("tools: " + ", ".join(f"{t.name} ({'with' if t.output_schema else 'no'} outputSchema)" for t in tools))
        await call(client, "status", {})
        located = await call(client, "locate_objects", {"image": str(image_path.resolve()), "query": query})
        if not located["found"]:
            raise SystemExit(f"nothing found for {query!r}")
        image_id, obj = located["image"]["id"], located["objects"][0]
        segment = await call(client, "segment_object", {"image": image_id, "object_id": obj["id"], "overlay": True})
        region = await call(client, "describe_region", {"image": image_id, "object_id": obj["id"]})
        answer = await call(
            client, "visual_qa", {"image": image_id, "question": "How many shapes are there?", "ground": False}
        )
        grounded = await call(client, "visual_qa", {"image": image_id, "question": "What shapes are in the image?"})

        (args.out / "mask.png").write_bytes(await read_blob(client, segment["mask_uri"]))
        (args.out / "server_overlay.jpg").write_bytes(await read_blob(client, segment["overlay_uri"]))
    pixels = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(args.out / "mask.png")) > 127
    # The located object first, so that it and its mask share a colour; then the grounded answer's evidence.
    boxes = [(obj["id"], obj["box"])] + [(o["id"], o["box"]) for o in grounded["evidence"] if o["id"] != obj["id"]]
    draw_overlay(pixels, boxes, [mask]).picture.save(args.out / "overlay.png")
    written = ["mask.png", "server_overlay.jpg (the server's)", "overlay.png (drawn here from the results)"]

    print(f"\n{query!r} is {obj['id']} at {obj['box']}; mask {segment['area_px']} px "
          f"(SAM IoU prediction {segment['iou_prediction']}); described as {region['description']!r}; "
          f"count answer {answer['answer']!r}; grounded answer {grounded['answer']!r}")  # fmt: skip
    if scene is not None:
        from nextchat.demo.evaluate import box_iou

        target = scene.objects[0]
        inter = np.logical_and(mask, target.mask).sum() / max(1, np.logical_or(mask, target.mask).sum())
        box_overlap = box_iou(obj["box"], target.box)
        print(f"against the renderer's ground truth: box IoU {box_overlap:.2f}, mask IoU {inter:.2f}, "
              f"{len(scene.objects)} shapes")  # fmt: skip
        written.insert(0, "scene.png (the rendered scene)")
    print(f"wrote into {args.out}/: " + ", ".join(written))


if __name__ == "__main__":
    anyio.run(main)
