"""The generation engine: batching equals one-by-one, steps with joining and leaving, the <at> feedback path."""

import contextlib
import copy

import numpy as np
import pytest
import torch
from support import make_image

from nextchat.engine import GenerationRequest, NextChatEngine
from nextchat.processing import boxes_to_square
from nextchat.prompting import chat_prompt
from nextchat.resizing import InputSides, resize_for_model
from nextchat.tasks import LOCATE_ANSWER_PREFIX, locate_question, region_question, vqa_question


@pytest.fixture(scope="module", params=["eager", "padded"])
def engine(tiny_parts, request) -> NextChatEngine:
    """Exact decode steps, and the padded windows CUDA graphs replay (run eagerly): every test holds for both."""
    model, tokenizer = tiny_parts
    return NextChatEngine(model, tokenizer, decode_mode=request.param)


def prompt(engine: NextChatEngine, message: str, prefix: str = "") -> list[int]:
    config = engine.model.config
    text = chat_prompt(message, config.image_token_len, config.image_first)
    return engine.tokenizer.encode(f"{text} {prefix}" if prefix else text)


@pytest.fixture(scope="module")
def images(engine: NextChatEngine):
    arrays = [make_image(96, 60, 1), make_image(50, 90, 2), make_image(64, 64, 3)]
    return engine.encode_images(arrays)


def mixed_requests(engine: NextChatEngine, images) -> list[GenerationRequest]:
    """Prompts of different lengths and kinds: free text, forced <at> (boxes), an input box, teacher-forced REC."""
    at = engine.ids.at
    box = boxes_to_square(np.array([[5, 5, 40, 30]]), images[0].geometry)
    return [
        GenerationRequest(
            prompt(engine, vqa_question("What is this?")), image=images[0], max_new_tokens=6, request_id=0
        ),
        GenerationRequest(
            prompt(engine, vqa_question("Where are the shapes in this picture?", ground=True)),
            image=images[1],
            max_new_tokens=9,
            logit_bias={at: 4.0},
            request_id=1,
        ),
        GenerationRequest(
            prompt(engine, region_question()), image=images[0], boxes=box, max_new_tokens=5, request_id=2
        ),
        GenerationRequest(
            prompt(engine, locate_question("the red circle"), LOCATE_ANSWER_PREFIX),
            image=images[2],
            max_new_tokens=1,
            request_id=3,
        ),
    ]


def assert_same(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    assert len(a.objects) == len(b.objects)
    for x, y in zip(a.objects, b.objects, strict=True):
        assert x.token_index == y.token_index
        torch.testing.assert_close(x.box, y.box, atol=1e-4, rtol=0)
        torch.testing.assert_close(x.at_hidden, y.at_hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(96, 60), (50, 90), (64, 64), (700, 9), (11, 500), (3000, 2000), (20, 12)])
def test_first_resizes_made_where_the_image_was_decoded_encode_to_the_same_bits(
    engine: NextChatEngine, size: tuple[int, int]
) -> None:
    """The decode workers' first resizes (nextchat.resizing) give the vision features and SAM embeddings the model
    thread computes from the pixels, bit for bit; a resize made for other sides is not used."""
    pixels = make_image(*size, 5)
    config = engine.model.config
    sides = InputSides(config.image_size, config.sam.image_size)
    own = engine.encode_images([pixels])[0].features
    given = engine.encode_images([pixels], [resize_for_model(pixels, sides)])[0].features
    assert torch.equal(own, given)
    own_sam = engine.encode_sam_images([pixels])[0].embeddings
    given_sam = engine.encode_sam_images([pixels], [resize_for_model(pixels, sides)])[0].embeddings
    assert torch.equal(own_sam, given_sam)
    other = resize_for_model(pixels, InputSides(config.image_size + 2, config.sam.image_size + 2))
    assert torch.equal(engine.encode_images([pixels], [other])[0].features, own)
    assert torch.equal(engine.encode_sam_images([pixels], [other])[0].embeddings, own_sam)


def test_forced_at_yields_boxes_and_the_token_after_at_is_boxes(engine: NextChatEngine, images) -> None:
    request = mixed_requests(engine, images)[1]
    (result,) = engine.run_batch([request])
    assert result.objects, "a strong <at> bias must produce objects"
    for obj in result.objects:
        assert result.token_ids[obj.token_index] == engine.ids.at
        assert result.token_ids[obj.token_index + 1] == engine.ids.boxes
        assert obj.box.shape == (4,)
        assert torch.isfinite(obj.box).all()
        with torch.no_grad():
            torch.testing.assert_close(obj.box, engine.model.decode_boxes(obj.at_hidden[None])[0])


def test_mixed_batch_equals_one_by_one(engine: NextChatEngine, images) -> None:
    requests = mixed_requests(engine, images)
    solo = [engine.run_batch([r])[0] for r in requests]
    batched = engine.run_batch(requests)
    assert [r.request_id for r in batched] == [0, 1, 2, 3]
    for a, b in zip(solo, batched, strict=True):
        assert_same(a, b)
    assert solo[3].objects
    assert solo[3].objects[0].token_index == -1
    assert solo[3].token_ids == [engine.ids.boxes]


def test_generation_is_deterministic(engine: NextChatEngine, images) -> None:
    requests = mixed_requests(engine, images)
    first = engine.run_batch(requests)
    second = engine.run_batch(requests)
    for a, b in zip(first, second, strict=True):
        assert a.token_ids == b.token_ids
        assert all(torch.equal(x.box, y.box) for x, y in zip(a.objects, b.objects, strict=True))


def test_requests_join_and_leave_between_steps_without_changing_results(engine: NextChatEngine, images) -> None:
    requests = mixed_requests(engine, images)
    solo = {r.request_id: engine.run_batch([r])[0] for r in requests}
    results = {}
    engine.submit(requests[0])
    engine.submit(requests[3])
    for result in engine.step():  # both prefilled; the REC request finishes at once
        results[result.request_id] = result
    assert set(results) == {3}
    assert engine.num_active == 1
    engine.step()
    engine.submit(requests[1])  # joins a batch that is already two tokens in
    engine.submit(requests[2])
    while engine.has_work():
        for result in engine.step():
            results[result.request_id] = result
    assert set(results) == {0, 1, 2, 3}
    for key, expected in solo.items():
        assert_same(results[key], expected)


def test_cancelled_requests_leave_at_the_next_step(engine: NextChatEngine, images) -> None:
    requests = mixed_requests(engine, images)
    engine.submit(requests[0])
    engine.submit(requests[1])
    engine.step()
    assert engine.num_active == 2
    engine.submit(requests[2])
    assert engine.cancel(2)
    assert engine.cancel(1)
    finished = engine.step()
    assert {r.request_id: r.finish_reason for r in finished} == {2: "cancelled", 1: "cancelled"}
    assert next(r for r in finished if r.request_id == 2).token_ids == []  # cancelled while queued: never ran
    assert engine.num_active == 1
    assert engine.num_waiting == 0
    while engine.has_work():
        engine.step()
    assert not engine.cancel(0)


def test_at_as_the_last_allowed_token_still_gets_its_box(engine: NextChatEngine, images) -> None:
    at = engine.ids.at
    request = GenerationRequest(prompt(engine, "Find it."), image=images[0], max_new_tokens=1, logit_bias={at: 100.0})
    (result,) = engine.run_batch([request])
    assert result.token_ids == [at, engine.ids.boxes]
    assert len(result.objects) == 1
    assert result.finish_reason == "length"


def test_prompt_with_wrong_image_block_is_rejected(engine: NextChatEngine, images) -> None:
    ids = prompt(engine, "What is this?")
    broken = [t for t in ids if t != engine.ids.im_end]
    with pytest.raises(ValueError, match="im_end"):
        engine.run_batch([GenerationRequest(broken, image=images[0])])
    assert not engine.has_work()


@pytest.mark.gpu
def test_cuda_graph_decode_steps_equal_eager_ones_with_requests_joining_and_leaving(tiny_parts) -> None:
    model, tokenizer = tiny_parts
    cuda_model = copy.deepcopy(model).to("cuda")
    eager, graphs = (NextChatEngine(cuda_model, tokenizer, decode_mode=mode) for mode in ("eager", "graphs"))
    images = eager.encode_images([make_image(96, 60, 1), make_image(50, 90, 2), make_image(64, 64, 3)])
    requests = mixed_requests(eager, images)
    expected = eager.run_batch(requests)
    for engine in (graphs, graphs):  # the second run replays the graphs the first one captured
        results = {}
        engine.submit(requests[0])
        engine.submit(requests[1])
        engine.step()
        engine.submit(requests[2])
        engine.submit(requests[3])
        while engine.has_work():
            results.update({r.request_id: r for r in engine.step()})
        for want in expected:
            assert_same(results[want.request_id], want)
    assert graphs.decode_mode == "graphs"  # no capture fell back to eager


def test_a_graph_capture_that_fails_leaves_eager_steps_with_the_same_results(
    tiny_parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback on a GPU, played on the CPU: every CUDA call the capture makes is a stand-in, and capturing
    raises as it does for a model with a host sync inside its step."""

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    def failing_capture(*args: object, **kwargs: object) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    model, tokenizer = tiny_parts
    eager = NextChatEngine(model, tokenizer, decode_mode="eager")
    falling_back = NextChatEngine(model, tokenizer, decode_mode="padded")
    falling_back._decode_step.mode = "graphs"  # as on a CUDA device
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    images = eager.encode_images([make_image(96, 60, 1), make_image(50, 90, 2), make_image(64, 64, 3)])
    requests = mixed_requests(eager, images)
    for got, want in zip(falling_back.run_batch(requests), eager.run_batch(requests), strict=True):
        assert_same(got, want)
    assert falling_back.decode_mode == "eager"
