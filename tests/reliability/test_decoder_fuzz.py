"""R1: the image decoder under hostile and random input never does anything but decode or refuse.

A crash is any exception other than :class:`ImageInputError`, a decoded image that breaks the output contract
(uint8 RGB within the size limits, hash of the original bytes), or a refusal that is not one short line.
"""

import hashlib
import time

import numpy as np
import pytest
from hostile_images import EITHER, OK, Specimen, blank_bilevel_png, generated_images, hostile_corpus, mutated_seeds
from reliability_support import one_sentence_problem, peak_rss_mib, percentiles, record_figures, rss_mib, sizes

from mcp_server.image_io import DecodedImage, ImageInputError, ImagePolicy, decode_image


def contract_problem(data: bytes, image: DecodedImage, policy: ImagePolicy) -> str | None:
    """Why a decoded image breaks the loader's output contract, or None."""
    pixels = image.pixels
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return f"pixels are {pixels.dtype} {pixels.shape}"
    if not policy.min_side <= min(image.width, image.height) <= max(image.width, image.height) <= policy.max_side:
        return f"size {image.width}x{image.height} is outside the side limits"
    if image.width * image.height > policy.max_pixels:
        return f"{image.width}x{image.height} is over the pixel cap"
    if image.sha256 != hashlib.sha256(data).hexdigest():
        return "sha256 is not that of the input bytes"
    return None


def try_decode(data: bytes, policy: ImagePolicy) -> tuple[str, str, float]:
    """(``ok`` | ``error`` | ``crash``, detail, seconds) for one input."""
    started = time.perf_counter()
    try:
        image = decode_image(data, policy, "data")
    except ImageInputError as error:
        problem = one_sentence_problem(str(error))
        outcome = ("crash", f"bad refusal ({problem}): {error}") if problem else ("error", str(error))
    except Exception as error:  # the point of the test: anything else is a crash, recorded with its type
        outcome = ("crash", f"{type(error).__name__}: {error}")
    else:
        problem = contract_problem(data, image, policy)
        outcome = ("crash", problem) if problem else ("ok", f"{image.width}x{image.height}")
    return outcome[0], outcome[1], time.perf_counter() - started


@pytest.fixture(scope="module")
def corpus(request: pytest.FixtureRequest) -> list[Specimen]:
    full = request.config.getoption("--run-slow")
    return hostile_corpus(gif_frames=10_000 if full else 1000)


def test_the_hostile_corpus_is_decoded_or_refused_exactly_as_expected(corpus: list[Specimen]) -> None:
    wrong, timings, counts = [], [], {"ok": 0, "error": 0, "crash": 0}
    for specimen in corpus:
        outcome, detail, seconds = try_decode(specimen.data, ImagePolicy(**specimen.policy))
        counts[outcome] += 1
        timings.append(seconds)
        if outcome == "crash":
            wrong.append(f"{specimen.name}: crashed: {detail}")
        elif specimen.expect != EITHER and outcome != specimen.expect:
            wrong.append(f"{specimen.name}: expected {specimen.expect}, got {outcome}: {detail}")
        elif specimen.message and specimen.message not in detail:
            wrong.append(f"{specimen.name}: expected {specimen.message!r} in {detail!r}")
    record_figures(
        "R1 hostile corpus",
        {"inputs": len(corpus), "decoded": counts["ok"], "refused": counts["error"], "crashes": counts["crash"]}
        | percentiles(timings),
    )
    assert not wrong, "\n".join(wrong)
    assert counts["ok"] >= 30 and counts["error"] >= 30  # the corpus exercises both sides


@pytest.mark.parametrize("count", sizes(200, 2000))
def test_generated_and_mutated_images_never_crash_the_decoder(corpus: list[Specimen], count: int) -> None:
    policy = ImagePolicy()
    inputs = [*generated_images(count), *mutated_seeds(corpus, count // 4)]
    crashes, timings, counts = [], [], {"ok": 0, "error": 0, "crash": 0}
    rss_before = rss_mib()
    for description, data in inputs:
        outcome, detail, seconds = try_decode(data, policy)
        counts[outcome] += 1
        timings.append(seconds)
        if outcome == "crash":
            crashes.append(f"{description}: {detail}")
    record_figures(
        f"R1 decoder fuzz ({count} generated + {count // 4} mutated seeds)",
        {"inputs": len(inputs), "decoded": counts["ok"], "refused": counts["error"], "crashes": counts["crash"]}
        | percentiles(timings)
        | {"rss_growth_mib": round(rss_mib() - rss_before, 1), "peak_rss_mib": round(peak_rss_mib(), 1)},
    )
    assert not crashes, "\n".join(crashes[:20])
    assert counts["ok"] >= count // 10 and counts["error"] >= count // 10  # both paths were really exercised


@pytest.mark.slow
def test_an_image_exactly_at_the_default_pixel_cap_decodes() -> None:
    """8000×5000 = the 40 MP cap: accepted and decoded (the figure recorded is its time and the process's peak)."""
    data = blank_bilevel_png(8000, 5000)
    outcome, detail, seconds = try_decode(data, ImagePolicy())
    record_figures(
        "R1 decode at the 40 MP cap",
        {"outcome": outcome, "seconds": round(seconds, 2), "file_kib": round(len(data) / 1024, 1)}
        | {"peak_rss_mib_after": round(peak_rss_mib(), 1)},
    )
    assert (outcome, detail) == (OK, "8000x5000")
