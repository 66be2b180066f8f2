"""Checkpoints: save → load_model round trips, the official layouts, strict key reports, clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import make_image

from nextchat import CheckpointError, load_model, save_pretrained
from nextchat.loading import resolve_device, resolve_dtype
from nextchat.pipeline import NextChatPipeline


def test_save_then_load_round_trip_has_an_empty_report(tiny_parts, tmp_path: Path) -> None:
    model, tokenizer = tiny_parts
    save_pretrained(model, tokenizer, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "added_tokens.json",
        "tokenizer_config.json", "special_tokens_map.json",
    }  # fmt: skip
    loaded, loaded_tokenizer, report = load_model(tmp_path, device="cpu", dtype="float32")
    assert report.ok
    assert report.missing == []
    assert report.unexpected == []
    assert report.ignored == []
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert loaded.config == model.config


def test_config_json_is_in_the_official_layout(tiny_checkpoint: Path) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "nextchat"
    assert raw["architectures"] == ["NextChatForSegLM"]
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "mm_depth",
        "mm_hidden_size",
        "mm_vision_select_layer",
    ):
        assert key in raw
    assert raw["mm_use_im_start_end"] is True
    assert raw["use_mm_proj"] is True


def test_official_pickle_shards_with_index_load_like_safetensors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The published 7B ships pytorch_model-0000N-of-0000M.bin with pytorch_model.bin.index.json, in 16-bit."""
    for name in ("config.json", "tokenizer.model", "added_tokens.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_checkpoint / name, tmp_path / name)
    state = load_file(tiny_checkpoint / "model.safetensors")
    keys = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for shard, shard_keys in halves.items():
        torch.save({k: state[k].half() for k in shard_keys}, tmp_path / shard)
        weight_map.update(dict.fromkeys(shard_keys, shard))
    # 4.31 also saved LLaMA's rotary buffers; they must be ignored, not reported.
    torch.save({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, tmp_path / "extra.bin")
    weight_map["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _, report = load_model(tmp_path, device="cpu", dtype="float32")
    assert report.ok
    assert report.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"].half().float())


def test_unexpected_and_missing_keys_are_reported(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    state = load_file(tiny_checkpoint / "model.safetensors")
    state["loc_encoder.9.weight"] = torch.zeros(1)
    del state["seg_prompt_mlp.0.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"1 missing keys \['seg_prompt_mlp.0.bias'\], 1 unexpected keys \['loc_encoder.9.weight'\]",
    ):
        load_model(tmp_path, device="cpu")
    _, _, report = load_model(tmp_path, device="cpu", strict=False)
    assert report.missing == ["seg_prompt_mlp.0.bias"]
    assert report.unexpected == ["loc_encoder.9.weight"]


def test_sam_weights_can_come_from_a_separate_sam_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(tiny_checkpoint / "model.safetensors")
    sam = {k.removeprefix("sam.model."): v for k, v in state.items() if k.startswith("sam.model.")}
    save_file(
        {k: v for k, v in state.items() if not k.startswith("sam.model.")}, str(tmp_path / "ckpt" / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match=r"sam_checkpoint"):
        load_model(tmp_path / "ckpt", device="cpu")
    torch.save(sam, tmp_path / "sam_tiny.pth")
    model, _, report = load_model(tmp_path / "ckpt", device="cpu", sam_checkpoint=tmp_path / "sam_tiny.pth")
    assert report.ok
    assert report.sources["sam"].endswith("sam_tiny.pth")
    assert torch.equal(model.sam.model.mask_decoder.iou_token.weight, state["sam.model.mask_decoder.iou_token.weight"])


def test_pickles_that_need_code_to_load_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"weights": np.arange(3)}, tmp_path / "pytorch_model.bin")  # numpy objects need unpickling code
    with pytest.raises(CheckpointError, match=r"not a plain tensor checkpoint"):
        load_model(tmp_path, device="cpu")


def test_unknown_paths_and_unreachable_hub_ids_give_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a hub id"):
        load_model(tmp_path / "missing" / "dir", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"could not fetch 'nobody/no-such-model'.*pass the local directory"):
        load_model("nobody/no-such-model", device="cpu")


def test_loaded_checkpoint_runs_the_whole_path(tiny_checkpoint: Path) -> None:
    pipeline = NextChatPipeline.from_pretrained(tiny_checkpoint, device="cpu")
    image = make_image(80, 48)
    obj = pipeline.locate(image, "the red thing")
    x1, y1, x2, y2 = obj.box
    assert 0 <= x1 <= x2 <= 80
    assert 0 <= y1 <= y2 <= 48
    (mask,) = pipeline.segment(image, [obj])
    assert mask.mask.shape == (48, 80)
    assert mask.mask.dtype == bool


def test_devices_and_dtypes_resolve_to_cpu_float32_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto").type in {"cpu", "mps"}
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
