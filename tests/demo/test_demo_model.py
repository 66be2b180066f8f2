"""The embedded demo model, end to end: pixels in, pixel boxes, masks, descriptions and answers out.

A fixed held-out set (its own seed, a stream training never draws from) is held to thresholds a little below the
targets the full evaluation (``python -m nextchat.demo.evaluate``, 500 scenes) meets.
"""

from __future__ import annotations

import numpy as np
import pytest

from nextchat.demo.evaluate import box_iou, evaluate, held_out_scenes, names_object


HELD_OUT_SEED = 2  # the README's figures use seed 1
THRESHOLDS = {"locate_acc50": 0.85, "mask_iou": 0.70, "description_acc": 0.85, "question_acc": 0.80}


def test_the_shipped_checkpoint_is_small_official_and_loads_strictly_by_name() -> None:
    from nextchat.loading import demo_checkpoint_dir, load_model

    directory = demo_checkpoint_dir()
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= files
    assert sum(p.stat().st_size for p in directory.iterdir()) <= 25 * 2**20
    model, tokenizer, report = load_model("demo", device="cpu")
    assert report.ok, (report.missing, report.unexpected)
    assert report.sources["checkpoint"] == str(directory)
    assert model.config.vocab_size == tokenizer.vocab_size
    assert not model.training


@pytest.fixture(scope="module", params=["none", "int8"])
def pipeline(request: pytest.FixtureRequest):
    """The demo model as shipped, and with its LLM's layer linears in int8 (the same thresholds hold for both)."""
    from nextchat.pipeline import NextChatPipeline
    from nextchat.quantization import Int8Linear

    pipeline = NextChatPipeline.from_pretrained("demo", device="cpu", quantize=request.param)
    quantized = sum(isinstance(m, Int8Linear) for m in pipeline.model.modules())
    assert quantized == (7 * pipeline.model.config.text["num_hidden_layers"] if request.param == "int8" else 0)
    return pipeline


def test_held_out_figures_reach_the_thresholds(pipeline) -> None:
    report = evaluate(pipeline, held_out_scenes(40, HELD_OUT_SEED), HELD_OUT_SEED)
    reached = {name: getattr(report, name) for name in THRESHOLDS}
    assert report.locate_cases >= 80
    assert all(reached[name] >= bound for name, bound in THRESHOLDS.items()), reached


def test_locate_segment_and_describe_one_scene_in_original_pixels(pipeline) -> None:
    from nextchat.demo.world import render_scene

    scene = render_scene(np.random.default_rng([HELD_OUT_SEED, 17]), min_objects=3, max_objects=3)
    target = scene.objects[1]
    located = pipeline.locate(scene.image, f"the {target.name}")
    x1, y1, x2, y2 = located.box
    assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
    assert box_iou(located.box, target.box) >= 0.5
    (mask,) = pipeline.segment(scene.image, [located])
    assert mask.mask.shape == (scene.height, scene.width)
    overlap = np.logical_and(mask.mask, target.mask).sum() / np.logical_or(mask.mask, target.mask).sum()
    assert overlap >= 0.6
    assert names_object(pipeline.describe(scene.image, target.box).text, target.colour, target.shape)
