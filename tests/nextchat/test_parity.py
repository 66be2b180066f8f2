"""Parity with the official NExT-Chat code on the shared fixture (tiny random checkpoint + official outputs)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextchat import GenerationRequest, NextChatEngine, load_model
from nextchat.processing import (
    ImageGeometry,
    boxes_from_square,
    boxes_to_square,
    mask_logits_to_original,
    sam_pixel_values,
    vision_pixel_values,
)
from nextchat.resizing import sam_resized_image


FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "nextchat-parity"
if not (FIXTURE / "cases.pt").exists():
    pytest.skip(
        f"NExT-Chat parity fixture not found at {FIXTURE} (it ships only with the shared data folder)",
        allow_module_level=True,
    )

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def cases() -> dict:
    return torch.load(FIXTURE / "cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def loaded():
    return load_model(FIXTURE / "checkpoint", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(loaded) -> NextChatEngine:
    model, tokenizer, _ = loaded
    return NextChatEngine(model, tokenizer)


def image(cases: dict, name: str) -> np.ndarray:
    return cases["images"][name]["uint8"].numpy()


def assert_summary(actual: torch.Tensor, summary: dict) -> None:
    """Compare a full tensor with the fixture's summary of the official one (strided view, centre lines, sums)."""
    stride = summary["stride"]
    torch.testing.assert_close(actual[..., ::stride, ::stride].float(), summary["strided"], **TOL)
    h, w = actual.shape[-2:]
    torch.testing.assert_close(actual[..., h // 2, :].float(), summary["center_row"], **TOL)
    torch.testing.assert_close(actual[..., :, w // 2].float(), summary["center_col"], **TOL)
    total = actual.double().sum().item()
    assert abs(total - float(summary["sum"])) <= 1e-5 * float(summary["abs_sum"]) + 1e-6
    assert actual.min().item() == pytest.approx(float(summary["min"]), abs=1e-4)
    assert actual.max().item() == pytest.approx(float(summary["max"]), abs=1e-4)


def assert_mask_matches(logits: torch.Tensor, case: dict) -> None:
    """Binary masks agree wherever the official logit is not within 1e-3 of the threshold."""
    official = case["mask_orig_logits"]
    torch.testing.assert_close(logits, official, **TOL)
    confident = official.abs() > 1e-3
    assert torch.equal((logits > 0)[confident], case["mask_orig"][confident])


def test_checkpoint_loads_with_no_missing_or_unexpected_keys(loaded) -> None:
    _, _, report = loaded
    assert report.missing == []
    assert report.unexpected == []
    # transformers 4.31 saved the rotary inv_freq buffers; they are recomputed, not loaded.
    assert all(k.endswith("rotary_emb.inv_freq") for k in report.ignored)
    assert len(report.ignored) == 2


def test_sam_sizes_read_off_the_weights_match_the_fixture(loaded) -> None:
    import json

    arch = json.loads((FIXTURE / "tiny_arch.json").read_text())["sam"]
    sam = loaded[0].config.sam
    enc = arch["image_encoder"]
    assert (sam.encoder_embed_dim, sam.encoder_depth, sam.encoder_num_heads) == (
        enc["embed_dim"],
        enc["depth"],
        enc["num_heads"],
    )
    assert list(sam.encoder_global_attn_indexes) == enc["global_attn_indexes"]
    assert (sam.encoder_window_size, sam.image_size, sam.patch_size) == (
        enc["window_size"],
        enc["img_size"],
        enc["patch_size"],
    )
    assert sam.decoder_mlp_dim == arch["mask_decoder"]["transformer_mlp_dim"]


@pytest.mark.parametrize("name", ["A", "B"])
def test_preprocessing_matches_official(cases: dict, loaded, name: str) -> None:
    model = loaded[0]
    official = cases["images"][name]
    pixels = vision_pixel_values(image(cases, name), model.config.image_size)
    torch.testing.assert_close(pixels, official["clip_pixel_values"], **TOL)
    resized = sam_resized_image(image(cases, name), 1024)
    expected = np.asarray(Image.open(io.BytesIO(official["sam_resized_png"].numpy().tobytes())))
    assert resized.shape[:2] == tuple(official["sam_hw"].tolist())
    assert np.array_equal(resized, expected)
    geometry = ImageGeometry(image(cases, name).shape[1], image(cases, name).shape[0])
    assert geometry.sam_padding(1024) == tuple(official["sam_pad_left_top"].tolist())
    assert geometry.side == official["expanded_side"]
    assert_summary(sam_pixel_values(image(cases, name), 1024), official["sam_pixel_values"])


def test_vision_tower_and_projector_match_official(cases: dict, loaded) -> None:
    model = loaded[0]
    pixels = cases["images"]["A"]["clip_pixel_values"][None]
    out = model.model.vision_tower.vision_model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(
        torch.stack([h[0] for h in out.hidden_states]), cases["rec"]["clip_hidden_states"], **TOL
    )
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixels)[0], cases["rec"]["image_features"], **TOL)


def full_forward(engine: NextChatEngine, input_ids: torch.Tensor, features: torch.Tensor, boxes: torch.Tensor):
    model = engine.model
    with torch.no_grad():
        embeds = model.embed_prompt(input_ids, [features], [boxes], engine.ids)
        mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.shape[1])[None]
        hidden, logits, _ = model.forward_llm(embeds, mask, positions)
    return embeds[0], hidden[0], logits[0]


def check_logits(logits: torch.Tensor, case: dict) -> None:
    torch.testing.assert_close(logits[:, case_probe(case)], case["logits_probe"], **TOL)
    torch.testing.assert_close(logits[case["logits_full_positions"]], case["logits_full"], **TOL)
    assert torch.equal(logits.argmax(-1), case["logits_argmax"])
    torch.testing.assert_close(torch.logsumexp(logits.double(), -1), case["logits_logsumexp"], **TOL)
    torch.testing.assert_close(logits.double().sum(-1), case["logits_sum"], atol=1e-2, rtol=1e-4)


_PROBE: list[torch.Tensor] = []


def case_probe(case: dict) -> torch.Tensor:
    return _PROBE[0]


@pytest.fixture(autouse=True, scope="module")
def _probe(cases: dict) -> None:
    _PROBE[:] = [cases["probe_ids"]]


def test_rec_forward_and_teacher_forced_box_match_official(cases: dict, engine: NextChatEngine) -> None:
    case = cases["rec"]
    features = engine.encode_images([image(cases, "A")])[0]
    input_ids = case["input_ids"]
    at = int(case["at_position"][0])
    # generate_rec feeds "Answer: <at> <boxes> .</s>" with no box embedding: <boxes> keeps its token embedding.
    head = input_ids[:, : at + 1]
    embeds, hidden, logits = full_forward(engine, head, features.features, torch.zeros(0, 4))
    with torch.no_grad():
        tail = engine.model.embed_tokens(input_ids[0, at + 1 :])
        all_embeds = torch.cat([embeds, tail])[None]
        hidden, logits, _ = engine.model.forward_llm(
            all_embeds, torch.ones_like(input_ids), torch.arange(input_ids.shape[1])[None]
        )
    torch.testing.assert_close(all_embeds[0], case["inputs_embeds"], **TOL)
    torch.testing.assert_close(hidden[0], case["final_hidden"], **TOL)
    check_logits(logits[0], case)

    # The engine's REC path: the prompt ends with <at>, its state gives the box with no decode step.
    (result,) = engine.run_batch([GenerationRequest(head[0].tolist(), image=features, max_new_tokens=1)])
    (obj,) = result.objects
    torch.testing.assert_close(obj.at_hidden[None], case["h_at"], **TOL)
    torch.testing.assert_close(obj.box[None], case["pred_box"], **TOL)
    geometry = features.geometry
    torch.testing.assert_close(boxes_from_square(obj.box, geometry, clamp=False).float(), case["box_px"], **TOL)
    clamped = boxes_from_square(obj.box, geometry)[0]
    assert clamped[1] == 0
    assert case["box_px"][0, 1] < 0

    check_masks(engine, cases, "A", obj.at_hidden[None], obj.box[None], case)


def check_masks(engine, cases, name, at_hidden, boxes, case) -> None:
    model = engine.model
    (sam_image,) = engine.encode_sam_images([image(cases, name)])
    assert_summary(sam_image.embeddings, case["sam_image_embeddings"])
    with torch.no_grad():
        prompt_states = model.seg_prompt_mlp(at_hidden).view(1, 4, 256)
        torch.testing.assert_close(prompt_states, case["prompt_states"], **TOL)
        sparse, _dense = model.sam.model.prompt_encoder(points=None, boxes=boxes * 1024, masks=None)
        torch.testing.assert_close(sparse, case["sam_box_sparse_embeddings"], **TOL)
        low_res, iou = model.predict_masks(sam_image.embeddings, at_hidden, boxes)
    torch.testing.assert_close(low_res, case["low_res_masks"], **TOL)
    torch.testing.assert_close(iou, case["iou_predictions"].reshape(-1), **TOL)
    up = torch.nn.functional.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
    assert_summary(up, case["pred_masks_1024"])
    logits, iou2 = engine.predict_masks(sam_image, at_hidden, boxes)
    assert_mask_matches(logits, case)
    assert bool(iou2 >= 0.3) == bool(case["iou_keep"][0])


def test_dense_positional_encoding_matches_official(cases: dict, loaded) -> None:
    assert_summary(loaded[0].sam.model.prompt_encoder.get_dense_pe(), cases["sam_dense_pe"])


def test_region_input_box_matches_official(cases: dict, engine: NextChatEngine) -> None:
    case = cases["region"]
    features = engine.encode_images([image(cases, "B")])[0]
    box = boxes_to_square(case["box_px"][None], features.geometry)
    torch.testing.assert_close(box, case["loc_inputs"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(engine.model.encode_boxes(box), case["loc_embeds"], **TOL)
    embeds, hidden, logits = full_forward(engine, case["input_ids"], features.features, box)
    torch.testing.assert_close(embeds, case["inputs_embeds"], **TOL)
    torch.testing.assert_close(hidden, case["final_hidden"], **TOL)
    check_logits(logits, case)


def test_generation_feedback_loop_matches_official(cases: dict, engine: NextChatEngine) -> None:
    case = cases["gen"]
    features = engine.encode_images([image(cases, "B")])[0]
    request = GenerationRequest(
        case["input_ids"][0].tolist(),
        image=features,
        boxes=case["loc_inputs"],
        max_new_tokens=int(case["max_new_tokens"]),
        trace=True,
    )
    (result,) = engine.run_batch([request])
    # Official sequences start with transformers 4.31's BOS placeholder and end with </s>.
    assert [1, *result.token_ids, 2] == case["sequences"][0].tolist()
    assert result.finish_reason == "stop"
    steps = result.trace
    torch.testing.assert_close(torch.stack([s.logits for s in steps]), case["step_logits"], **TOL)
    torch.testing.assert_close(torch.stack([s.hidden for s in steps]), case["step_final_hidden"], **TOL)
    assert [int(s.logits.argmax()) for s in steps] == case["step_argmax"].tolist()
    torch.testing.assert_close(torch.stack([s.input_embed for s in steps[1:]]), case["step_input_embeds"], **TOL)
    (obj,) = result.objects
    assert result.token_ids[obj.token_index] == engine.ids.at
    torch.testing.assert_close(obj.at_hidden[None], case["h_at"], **TOL)
    torch.testing.assert_close(obj.box[None], case["pred_locs"], **TOL)
    torch.testing.assert_close(steps[int(case["feedback_step"])].input_embed, case["feedback_input_embed"], **TOL)
    torch.testing.assert_close(
        boxes_from_square(obj.box, features.geometry, clamp=False).float(), case["box_px"], **TOL
    )
    check_masks(engine, cases, "B", obj.at_hidden[None], obj.box[None], case)


def test_mask_postprocessing_crops_rows_for_landscape_and_columns_for_portrait(cases: dict) -> None:
    for key, name in (("rec", "A"), ("gen", "B")):
        case = cases[key]
        geometry = ImageGeometry(image(cases, name).shape[1], image(cases, name).shape[0])
        logits = mask_logits_to_original(case["low_res_masks"], geometry, 1024)
        assert logits.shape[1:] == (geometry.height, geometry.width)
        assert_mask_matches(logits, case)
