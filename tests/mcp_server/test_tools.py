"""Real behaviour through the in-memory MCP client, in both protocol modes, on the embedded demo model.

Boxes and masks are compared with what the renderer drew; status's request counts are read while a runner holds a
request in flight. (The protocol's mechanics are in test_protocol.py.)
"""

import base64
import io
import threading

import anyio
import numpy as np
import pytest
from mcp import Client
from PIL import Image
from support import call, png_data_uri

from mcp_server.messages import GenerationOutcome, Job
from mcp_server.rendering import decode_coco_rle
from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat.demo.evaluate import box_iou, names_object


pytestmark = pytest.mark.anyio


@pytest.fixture(params=["auto", "legacy"])
async def client(request: pytest.FixtureRequest, demo_server):
    async with Client(demo_server, mode=request.param) as connected:
        yield connected


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


async def test_locate_finds_the_rendered_objects_and_ids_chain_into_segment_and_describe(
    client: Client, scenes, image_dir
) -> None:
    hits = masks_ok = described = total = 0
    for index, scene in enumerate(scenes[:4]):
        target = scene.objects[0]
        located = await call(
            client, "locate_objects", {"image": str(image_dir / f"scene{index}.png"), "query": f"the {target.name}"}
        )
        image = located["image"]
        assert (image["width"], image["height"]) == (scene.width, scene.height)
        total += 1
        if not located["found"]:
            continue
        obj = located["objects"][0]
        x1, y1, x2, y2 = obj["box"]
        assert 0 <= x1 <= x2 <= scene.width and 0 <= y1 <= y2 <= scene.height
        assert obj["box_normalized"] == pytest.approx(
            [x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height], abs=1e-4
        )
        assert f"[{obj['id']}]" in located["explanation"]
        hits += box_iou(obj["box"], target.box) >= 0.5

        segment = await call(client, "segment_object", {"image": image["id"], "object_id": obj["id"]})
        assert segment["object_id"] == obj["id"] and segment["mask_uri"].startswith("mask://")
        resource = await client.read_resource(segment["mask_uri"])
        png = base64.b64decode(resource.contents[0].blob)
        mask = np.asarray(Image.open(io.BytesIO(png))) > 127
        assert mask.shape == (scene.height, scene.width)
        assert np.array_equal(decode_coco_rle(segment["rle"]), mask)
        assert segment["area_px"] == int(mask.sum())
        masks_ok += mask_iou(mask, target.mask) >= 0.6

        region = await call(client, "describe_region", {"image": image["id"], "object_id": obj["id"]})
        assert region["region"]["object_id"] == obj["id"] and region["region"]["box"] == obj["box"]
        described += names_object(region["description"], target.colour, target.shape)
    assert total == 4 and hits >= 3 and masks_ok >= 3 and described >= 3


async def test_segment_by_box_and_by_query(client: Client, scenes) -> None:
    scene = scenes[4]
    target = scene.objects[-1]
    data_uri = png_data_uri(scene.image)
    by_box = await call(client, "segment_object", {"image": data_uri, "box": list(target.box)})
    assert by_box["object_id"] is None and by_box["prompt_box"] == pytest.approx(list(target.box), abs=0.1)
    by_query = await call(client, "segment_object", {"image": by_box["image"]["id"], "query": f"the {target.name}"})
    assert by_query["object_id"].startswith("o") and by_query["phrase"]
    for result in (by_box, by_query):
        resource = await client.read_resource(result["mask_uri"])
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(resource.contents[0].blob)))) > 127
        assert mask_iou(mask, target.mask) >= 0.5


async def test_visual_qa_answers_and_grounds_its_evidence(client: Client, scenes) -> None:
    scene = scenes[5]
    counted = await call(
        client,
        "visual_qa",
        {"image": png_data_uri(scene.image), "question": "How many shapes are there?", "ground": False},
    )
    assert counted["answer"] == f"The answer is {len(scene.objects)}." and counted["evidence"] == []
    grounded = await call(
        client, "visual_qa", {"image": counted["image"]["id"], "question": "What shapes are in the image?"}
    )
    assert grounded["grounded"] and grounded["evidence"]
    for obj in grounded["evidence"]:
        assert f"[{obj['id']}]" in grounded["answer"]
        assert max(box_iou(obj["box"], o.box) for o in scene.objects) >= 0.5


async def test_status_says_the_demo_model_only_knows_the_shapes_world(client: Client) -> None:
    status = await call(client, "status", {})
    assert status["model"] == "demo" and "shapes" in status["note"]
    assert status["state"] in {"ready", "loading"}
    assert (status["queue_depth"], status["running"]) == (0, 0)  # every earlier call has answered


class HeldRunner:
    """A runner that keeps its jobs in flight until ``release`` is set; ``stepping`` is set once a step holds them."""

    def __init__(self) -> None:
        self.stepping, self.release = threading.Event(), threading.Event()
        self.jobs: list[int] = []
        self.device, self.dtype, self.model_name = "cpu", "float32", "held"

    def submit(self, job: Job) -> None:
        self.jobs.append(job.id)

    def step(self):
        self.stepping.set()
        self.release.wait(30)
        finished, self.jobs = self.jobs, []
        return [(job_id, GenerationOutcome(("The answer is 2.",), (), "stop")) for job_id in finished]

    def cancel(self, job_id: int) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self.jobs)


async def test_status_counts_a_request_in_flight_and_none_once_it_has_answered(scenes) -> None:
    runner = HeldRunner()
    server = create_server(Settings(model="demo", device="cpu"), runner_factory=lambda: runner)
    answers: list[dict] = []

    async def ask(client: Client) -> None:
        question = {"image": png_data_uri(scenes[0].image), "question": "How many?", "ground": False}
        answers.append(await call(client, "visual_qa", question))

    try:
        async with Client(server) as client:
            with anyio.fail_after(60):
                idle = await call(client, "status", {})
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ask, client)
                    await anyio.to_thread.run_sync(runner.stepping.wait, 30)
                    busy = await call(client, "status", {})
                    runner.release.set()
                done = await call(client, "status", {})
    finally:
        runner.release.set()
        server.app.executor.stop()
    assert (idle["queue_depth"], idle["running"]) == (0, 0)
    assert (busy["queue_depth"], busy["running"]) == (1, 1)
    assert (done["queue_depth"], done["running"]) == (0, 0)
    assert answers[0]["answer"] == "The answer is 2."
