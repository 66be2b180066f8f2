"""Training batches of the demo recipe (nextchat.demo.data): the dense targets line up with the rendered objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextchat.configuration import build_demo_shapes
from nextchat.demo.data import BatchBuilder
from nextchat.loading import demo_checkpoint_dir
from nextchat.processing import ImageGeometry, boxes_to_square
from nextchat.tokenization import NextChatTokenizer


@pytest.fixture(scope="module")
def builder() -> BatchBuilder:
    tokenizer = NextChatTokenizer.from_pretrained(demo_checkpoint_dir())
    return BatchBuilder(tokenizer, build_demo_shapes(vocab_size=tokenizer.vocab_size), samples_per_scene=4)


def test_patch_targets_follow_the_objects(builder: BatchBuilder) -> None:
    batch = builder.build(np.random.default_rng(3), 6)
    foreground = batch.patch_classes > 0
    assert bool(foreground.any())
    assert bool((batch.patch_boxes[~foreground] == 0).all())
    boxes = batch.patch_boxes[foreground]
    assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.min()) >= 0 and float(boxes.max()) <= 1
    # Rows about objects carry a coverage map that is positive somewhere; a "no" to "Is there…?" carries none.
    about = batch.target_patches[:, 0] >= 0
    assert bool(about.any())
    assert bool((batch.target_patches[about].sum(1) > 0).all())
    assert bool((batch.target_patches[~about] == -1).all())


def test_locate_questions_about_one_scene_ask_for_different_objects(builder: BatchBuilder) -> None:
    from nextchat.demo.world import render_scene

    rng = np.random.default_rng(9)
    scene = render_scene(rng, min_objects=4, max_objects=4)
    locate_only = BatchBuilder(builder.tokenizer, builder.config, samples_per_scene=4)
    locate_only.tasks, locate_only.weights = ["locate"], np.ones(1)
    assert sorted(s.subjects[0] for s in locate_only.samples(scene, rng)) == [0, 1, 2, 3]
    batch = locate_only.build(rng, 1, scenes=[scene])
    every = boxes_to_square(np.asarray([o.box for o in scene.objects]), ImageGeometry(scene.width, scene.height))
    # The four answers' <at> targets are the four objects' boxes, each once.
    assert torch.cdist(batch.at_targets, every).argmin(1).sort().values.tolist() == [0, 1, 2, 3]
