"""Presets and the official config.json; the 7B preset's exact shapes, built on the meta device."""

import pytest
import torch

from nextchat.configuration import NextChatConfig, SamConfig, build_nextchat_7b_336, preset
from nextchat.loading import build_model


# config.json of AoZhang/nextchat-7b-336 (the fields that matter, verbatim values).
OFFICIAL_7B_CONFIG = {
    "_name_or_path": "output/stage2_3epoch/checkpoint-4950/",
    "architectures": ["NextChatForSegLM"],
    "model_type": "nextchat",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "rope_scaling": None, "pretraining_tp": 1, "vocab_size": 32005, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "use_mm_proj": True, "mm_depth": 2, "mm_hidden_size": 1024, "mm_vision_select_layer": -2,
    "mm_use_im_start_end": True,
    "mm_vision_tower": "/mnt/data/user/clip-vit-large-patch14-336",
    "sam_path": "/mnt/data/user/sam_vit_h_4b8939.pth",
    "use_cache": False, "torch_dtype": "float32", "transformers_version": "4.31.0",
}  # fmt: skip


@pytest.fixture(scope="module")
def meta_7b():
    return build_model(build_nextchat_7b_336(), device="meta", dtype=torch.bfloat16)


def test_official_config_json_reads_as_the_7b_preset() -> None:
    config = NextChatConfig.from_checkpoint_dict(OFFICIAL_7B_CONFIG, name="nextchat-7b-336")
    assert config == build_nextchat_7b_336()
    assert config.vision["_name_or_path"] == "openai/clip-vit-large-patch14-336"  # the absolute path is unusable
    assert config.sam == SamConfig()  # ViT-H
    assert config.image_token_len == 576
    assert config.image_first


def test_7b_preset_has_the_official_parameter_count(meta_7b) -> None:
    parts = {
        # Vicuna-7B with 5 added tokens: embeddings, 32 blocks, final norm, untied lm_head.
        "llm": 32005 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32005 * 4096,
        "mm_projector": (1024 * 4096 + 4096) + (4096 * 4096 + 4096),
        "loc_encoder": (4 * 2048 + 2048) + (2048 * 4096 + 4096),
        "loc_decoder": (4096 * 2048 + 2048) + (2048 * 4 + 4),
        "seg_prompt_mlp": (4096 * 4096 + 4096) + (4096 * 1024 + 1024),
        "vision_tower": 303_507_456,  # CLIP ViT-L/14 at 336 px (577 positions)
        "sam": 641_090_608,  # sam_vit_h_4b8939
    }
    counts = dict.fromkeys(parts, 0)
    for name, parameter in meta_7b.named_parameters():
        part = next((p for p in parts if p != "llm" and p in name), "llm")
        counts[part] += parameter.numel()
    assert counts == parts
    assert sum(parts.values()) * 2 == pytest.approx(15.48e9, rel=1e-3)  # 16-bit: the size of the published shards


EXPECTED_SHAPES = {
    "model.embed_tokens.weight": (32005, 4096),
    "model.layers.31.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.mlp.gate_proj.weight": (11008, 4096),
    "model.layers.0.mlp.down_proj.weight": (4096, 11008),
    "model.layers.7.input_layernorm.weight": (4096,),
    "model.norm.weight": (4096,),
    "lm_head.weight": (32005, 4096),
    "model.mm_projector.0.weight": (4096, 1024),
    "model.mm_projector.0.bias": (4096,),
    "model.mm_projector.2.weight": (4096, 4096),
    "model.vision_tower.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
    "model.vision_tower.vision_model.embeddings.position_embedding.weight": (577, 1024),
    "model.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
    "loc_encoder.0.weight": (2048, 4),
    "loc_encoder.2.weight": (4096, 2048),
    "loc_decoder.0.weight": (2048, 4096),
    "loc_decoder.2.weight": (4, 2048),
    "loc_decoder.2.bias": (4,),
    "seg_prompt_mlp.0.weight": (4096, 4096),
    "seg_prompt_mlp.2.weight": (1024, 4096),
    "sam.model.image_encoder.patch_embed.proj.weight": (1280, 3, 16, 16),
    "sam.model.image_encoder.pos_embed": (1, 64, 64, 1280),
    "sam.model.image_encoder.blocks.0.attn.qkv.weight": (3840, 1280),
    "sam.model.image_encoder.blocks.0.attn.rel_pos_h": (27, 80),
    "sam.model.image_encoder.blocks.7.attn.rel_pos_h": (127, 80),
    "sam.model.image_encoder.blocks.31.attn.rel_pos_w": (127, 80),
    "sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "sam.model.prompt_encoder.no_mask_embed.weight": (1, 256),
    "sam.model.mask_decoder.iou_token.weight": (1, 256),
    "sam.model.mask_decoder.mask_tokens.weight": (4, 256),
    "sam.model.mask_decoder.transformer.layers.1.mlp.lin1.weight": (2048, 256),
}


def test_7b_preset_builds_every_official_key_with_its_shape(meta_7b) -> None:
    state = meta_7b.state_dict()
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(1 for k in state if k.startswith("model.layers.")) == 32 * 9
    assert not any("rotary_emb" in k or "pixel_mean" in k or "position_ids" in k for k in state)  # buffers not saved
    assert meta_7b.sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32


def test_sam_sizes_read_from_shapes_give_back_vit_h(meta_7b) -> None:
    shapes = {k: tuple(v.shape) for k, v in meta_7b.state_dict().items()}
    assert SamConfig.from_state_dict_shapes(shapes) == SamConfig()


def test_checkpoint_dict_round_trips_every_preset() -> None:
    for name in ("tiny", "nextchat-7b-336"):
        config = preset(name)
        assert NextChatConfig.from_checkpoint_dict(config.to_checkpoint_dict()) == config


def test_unknown_preset_and_foreign_config_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="model_type 'llava'"):
        NextChatConfig.from_checkpoint_dict({"model_type": "llava"})


def test_a_grid_tower_gives_one_placed_token_per_feature_cell_and_saves_only_the_backbone() -> None:
    config = preset("demo-shapes")
    assert not config.is_vit_tower and config.image_grid == 8 and config.image_token_len == 64
    torch.manual_seed(0)
    tower = build_model(config).model.vision_tower
    features = tower(torch.zeros(2, 3, config.image_size, config.image_size))
    assert features.shape == (2, 64, config.mm_hidden_size)
    # A blank image gives the same backbone output everywhere but the borders; the position table makes every
    # token distinct, so the box decoder can tell where each one is.
    assert torch.unique(features[0].round(decimals=4), dim=0).shape[0] == 64
    assert not any("grid_positions" in key for key in tower.state_dict())
    round_trip = NextChatConfig.from_checkpoint_dict(config.to_checkpoint_dict(), name="demo-shapes")
    assert round_trip.vision == config.vision and round_trip.image_token_len == 64
