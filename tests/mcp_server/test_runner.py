"""The NExT-Chat runner on real weights: batched and cached results equal one-by-one uncached ones, an out-of-memory
step is split and retried with correct results, device errors are sorted, and fixed-length generation."""

import threading
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from support import make_image

from mcp_server import runner as runner_module
from mcp_server.executor import Executor
from mcp_server.messages import (
    DecodedImage,
    DeviceFailure,
    GenerationJob,
    GenerationOutcome,
    Job,
    MaskJob,
    MaskOutcome,
    MaskPrompt,
    Outcome,
    StepOutOfMemory,
)
from mcp_server.runner import NextChatRunner
from nextchat import tasks
from nextchat.loading import load_model
from nextchat.pipeline import GroundedObject


@pytest.fixture(scope="module", params=["tiny", "demo"])
def loaded(request: pytest.FixtureRequest, tiny_checkpoint: Path):
    """(model, tokenizer) of the tiny random checkpoint, and of the embedded demo model."""
    if request.param == "demo":
        net, tokenizer, _ = load_model("demo", device="cpu")
    else:
        net, tokenizer, _ = load_model(tiny_checkpoint, device="cpu")
    return net, tokenizer


@pytest.fixture(scope="module")
def images() -> list[DecodedImage]:
    arrays = [make_image(96, 60, 1), make_image(50, 90, 2), make_image(64, 64, 3)]
    return [DecodedImage(a, f"image{i}") for i, a in enumerate(arrays)]


def locate(image: DecodedImage, query: str, max_new_tokens: int = 64) -> GenerationJob:
    return GenerationJob(image=image, prompt=tasks.locate_all(query), max_new_tokens=max_new_tokens)


def run_alone(runner: NextChatRunner, job: Job) -> Outcome:
    runner.submit(job)
    outcomes: list[Outcome | BaseException] = []
    while runner.has_work():
        outcomes += [outcome for _, outcome in runner.step()]
    (outcome,) = outcomes
    assert not isinstance(outcome, BaseException)
    return outcome


def run_together(runner: NextChatRunner, waves: list[list[Job]]) -> dict[int, Outcome]:
    """Submit each wave one step after the previous one (continuous batching), run until all finish."""
    outcomes: dict[int, Outcome] = {}
    pending = list(waves)
    while pending or runner.has_work():
        if pending:
            for job in pending.pop(0):
                runner.submit(job)
        for job_id, outcome in runner.step():
            assert not isinstance(outcome, BaseException)
            outcomes[job_id] = outcome
    return outcomes


def assert_same(a: Outcome, b: Outcome) -> None:
    if isinstance(a, GenerationOutcome):
        assert isinstance(b, GenerationOutcome)
        assert a.segments == b.segments and a.finish_reason == b.finish_reason
        assert len(a.objects) == len(b.objects)
        for x, y in zip(a.objects, b.objects, strict=True):
            assert x.phrase == y.phrase
            np.testing.assert_allclose(x.box, y.box, atol=0.11)  # boxes are rounded to 0.1 px
            assert isinstance(x.state, GroundedObject) and isinstance(y.state, GroundedObject)
            np.testing.assert_allclose(x.state.square_box, y.state.square_box, atol=1e-4, rtol=0)
            torch.testing.assert_close(x.state.at_hidden, y.state.at_hidden, atol=1e-4, rtol=1e-4)
    else:
        assert isinstance(a, MaskOutcome) and isinstance(b, MaskOutcome)
        assert a.empty == b.empty
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        for x, y in zip(a.masks, b.masks, strict=True):
            assert (x != y).mean() < 1e-3  # a pixel whose logit is ~0 may flip


def jobs(images: list[DecodedImage], single_state: object) -> list[Job]:
    """Every kind of job, several on each image (so the batched runner reuses cached features)."""
    two_prompts = (MaskPrompt(state=single_state), MaskPrompt(box=(1.0, 2.0, 30.0, 40.0)))
    return [
        locate(images[0], "the red square", max_new_tokens=8),
        locate(images[1], "all the circles", max_new_tokens=10),
        GenerationJob(image=images[2], prompt=tasks.locate_one("the blue circle")),
        GenerationJob(image=images[0], prompt=tasks.describe_region((10.0, 5.0, 60.0, 40.0)), max_new_tokens=6),
        GenerationJob(
            image=images[1], prompt=tasks.answer_question("What colour is the square?", True), max_new_tokens=7
        ),
        GenerationJob(image=images[2], prompt=tasks.answer_question("Is there a triangle?"), max_new_tokens=5),
        MaskJob(image=images[0], prompts=(MaskPrompt(box=(5.0, 5.0, 50.0, 30.0)),)),
        MaskJob(image=images[2], prompts=two_prompts),
    ]


def test_batched_and_cached_results_equal_one_by_one_uncached_ones(loaded, images) -> None:
    net, tokenizer = loaded
    single = GenerationJob(image=images[2], prompt=tasks.locate_one("the blue circle"))
    located = run_alone(NextChatRunner(net, tokenizer), single)
    assert isinstance(located, GenerationOutcome) and located.objects
    state = located.objects[0].state
    alone = [run_alone(NextChatRunner(net, tokenizer), job) for job in jobs(images, state)]  # a fresh cache each
    batched = jobs(images, state)
    runner = NextChatRunner(net, tokenizer)
    together = run_together(runner, [batched[:3], batched[3:5], batched[5:]])
    assert set(together) == {job.id for job in batched}
    for job, expected in zip(batched, alone, strict=True):
        assert_same(together[job.id], expected)
    # Each image went through the vision tower once (three generation jobs reused it) and SAM's encoder once.
    assert (runner.features.misses, runner.features.hits) == (3, 3)
    assert (runner.sam_images.misses, runner.sam_images.hits) == (2, 0)


def test_an_out_of_memory_step_is_split_and_retried_with_correct_results(
    tiny_checkpoint: Path, images, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, tokenizer, _ = load_model(tiny_checkpoint, device="cpu")
    kinds = [("the red square", 0), ("the blue circle", 1), ("all the circles", 2), ("the green one", 0)]
    expected = {
        (text, i): run_alone(NextChatRunner(net, tokenizer), locate(images[i], text, max_new_tokens=6))
        for text, i in kinds
    }
    # The device holds at most two rows: a bigger batch runs out of memory. The first call waits for the test.
    forward_llm, first_call, release = net.forward_llm, threading.Event(), threading.Event()

    def limited(inputs_embeds: torch.Tensor, *args, **kwargs):
        first_call.set()
        release.wait(10)
        if inputs_embeds.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward_llm(inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(net, "forward_llm", limited)
    runner = NextChatRunner(net, tokenizer)
    executor = Executor(lambda: runner, max_queue=256, max_active=8, max_wait_ms=0)
    results: dict[int, tuple[tuple[str, int], Outcome]] = {}

    async def call(number: int, kind: tuple[str, int]) -> None:
        text, i = kind
        results[number] = (kind, await executor.generate(locate(images[i], text, max_new_tokens=6)))

    async def main() -> None:
        executor.start()
        assert await executor.wait_ready(10)
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, -1, kinds[0])
                await anyio.to_thread.run_sync(first_call.wait, 10)  # the worker is busy: the next 8 queue up
                for number in range(8):
                    tg.start_soon(call, number, kinds[number % 4])
                while executor.queue_depth < 9:
                    await anyio.sleep(0)
                release.set()
            assert runner.out_of_memory_steps >= 1 and executor.state == "ready"
            async with anyio.create_task_group() as tg:
                for number in range(100, 200):
                    tg.start_soon(call, number, kinds[number % 4])

    anyio.run(main)
    executor.stop()
    assert set(results) == {-1, *range(8), *range(100, 200)}
    for kind, outcome in results.values():
        assert_same(outcome, expected[kind])


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), StepOutOfMemory),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), DeviceFailure),
        (RuntimeError("CUDA error: device-side assert triggered"), DeviceFailure),
        (ValueError("a bug"), ValueError),
    ],
)
def test_a_failed_step_drops_every_job_and_reports_the_kind_of_failure(
    tiny_checkpoint: Path, images, monkeypatch: pytest.MonkeyPatch, error: Exception, raised: type
) -> None:
    net, tokenizer, _ = load_model(tiny_checkpoint, device="cpu")
    runner = NextChatRunner(net, tokenizer)
    runner.submit(locate(images[0], "the red square", max_new_tokens=4))
    runner.submit(MaskJob(image=images[1], prompts=(MaskPrompt(box=(1.0, 1.0, 20.0, 20.0)),)))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(net, "forward_llm", fail)
    with pytest.raises(raised):
        runner.step()
    assert not runner.has_work() and not runner.engine.has_work()


def test_fixed_length_mode_generates_exactly_n_tokens_even_when_the_model_would_stop(
    tiny_checkpoint: Path, images, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, tokenizer, _ = load_model(tiny_checkpoint, device="cpu")
    # End-of-answer wins every argmax: without the fixed length the answer ends at once.
    net.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits.index_fill(-1, torch.tensor([2]), 50.0))
    assert tokenizer.eos_id == 2
    lengths: list[int] = []
    for fixed in (None, 7):
        runner = NextChatRunner(net, tokenizer, fixed_new_tokens=fixed)
        engine_step = runner.engine.step

        def step(engine_step=engine_step):
            results = engine_step()
            lengths.extend(len(r.token_ids) for r in results)
            return results

        monkeypatch.setattr(runner.engine, "step", step)
        question = GenerationJob(image=images[0], prompt=tasks.answer_question("What is this?"), max_new_tokens=20)
        outcome = run_alone(runner, question)
        assert isinstance(outcome, GenerationOutcome)
        assert outcome.finish_reason == ("stop" if fixed is None else "length")
    assert lengths[0] == 0 and lengths[1] in (7, 8)  # 8 only when the 7th token is <at> (its <boxes> follows)


def test_cpu_threads_leave_a_core_to_the_protocol_side_unless_told(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcp_server.runner import default_cpu_threads
    from mcp_server.settings import OptionParser

    monkeypatch.setenv("NEXTCHAT_CPU_THREADS", "3")
    assert OptionParser().parse_settings([])[0].cpu_threads == 3
    assert OptionParser().parse_settings(["--cpu-threads", "1"])[0].cpu_threads == 1
    with pytest.raises(SystemExit):
        OptionParser().parse_settings(["--cpu-threads", "0"])
    before = torch.get_num_threads()
    try:
        NextChatRunner.load(str(tiny_checkpoint), "cpu", cpu_threads=1)
        assert torch.get_num_threads() == 1
        NextChatRunner.load(str(tiny_checkpoint), "cpu")
        assert torch.get_num_threads() == default_cpu_threads() >= 1
    finally:
        torch.set_num_threads(before)


def test_decode_steps_are_eager_off_cuda_and_graphs_can_be_switched_off(
    tiny_parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcp_server.settings import OptionParser

    assert OptionParser().parse_settings([], environ={})[0].cuda_graphs
    assert not OptionParser().parse_settings(["--no-cuda-graphs"], environ={})[0].cuda_graphs
    monkeypatch.setenv("NEXTCHAT_NO_CUDA_GRAPHS", "1")
    assert not OptionParser().parse_settings([])[0].cuda_graphs
    model, tokenizer = tiny_parts
    assert NextChatRunner(model, tokenizer).decode_mode == "eager"  # the CPU: graphs would need CUDA
    # On this CPU both ways end eager, so what the runner asks its engine for is what shows the switch: the engine's
    # own default (graphs on a CUDA device), or eager steps when graphs are off.
    asked: list[object] = []
    pipeline = runner_module.NextChatPipeline

    def recording(net, tok, decode_mode=None):
        asked.append(decode_mode)
        return pipeline(net, tok, decode_mode)

    monkeypatch.setattr(runner_module, "NextChatPipeline", recording)
    assert NextChatRunner(model, tokenizer).decode_mode == "eager"
    assert NextChatRunner(model, tokenizer, cuda_graphs=False).decode_mode == "eager"
    assert asked == [None, "eager"]
