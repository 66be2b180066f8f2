"""NExT-Chat configuration: one nested config, the official ``config.json`` reader, and the named presets.

The official checkpoint stores a flat ``LlamaConfig`` plus ``mm_*`` fields (``model_type: nextchat``). The vision
tower's and SAM's sizes are not in it: the official code takes the tower from ``mm_vision_tower`` and hard-codes
SAM ViT-H. Here both are explicit sub-configs; checkpoints written by :func:`nextchat.save_pretrained` carry them in
an extra ``nextchat`` block of ``config.json`` so they load without guessing. The preset builders at the bottom of
this file are the only home of model sizes.

This module knows no torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# The official checkpoint names a CLIP tower by an absolute path on the authors' machine; this is what it was.
OFFICIAL_CLIP_TOWER = "openai/clip-vit-large-patch14-336"

# Fields of the official config.json that belong to the LLaMA text model.
_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
)


@dataclass(frozen=True)
class SamConfig:
    """Sizes of the SAM image encoder, prompt encoder and mask decoder (segment-anything's modules).

    ``image_size`` is SAM's square input side; boxes given to the prompt encoder are in that pixel frame, and the
    image embedding is ``image_size // patch_size`` on a side.
    """

    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    encoder_mlp_ratio: float = 4.0
    encoder_window_size: int = 14
    patch_size: int = 16
    image_size: int = 1024
    prompt_embed_dim: int = 256  # seg_prompt_mlp emits 4 tokens of this width
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid."""
        return self.image_size // self.patch_size

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], prefix: str = "sam.model.") -> SamConfig:
        """Read SAM's sizes off checkpoint tensor shapes (the official code hard-codes them; no config has them).

        Every size is visible in some weight: the relative-position tables give the head width (so the head count)
        and which blocks attend globally, ``pos_embed`` the grid, the MLP weights the ratios.
        """
        enc = prefix + "image_encoder."
        patch = shapes[enc + "patch_embed.proj.weight"]  # [C, 3, P, P]
        embed_dim, patch_size = patch[0], patch[2]
        grid = shapes[enc + "pos_embed"][1]  # [1, G, G, C]
        depth = 1 + max(int(k[len(enc) :].split(".")[1]) for k in shapes if k.startswith(enc + "blocks."))
        rel = [shapes[f"{enc}blocks.{i}.attn.rel_pos_h"] for i in range(depth)]  # [2*span-1, head_dim]
        head_dim = rel[0][1]
        global_blocks = tuple(i for i, r in enumerate(rel) if r[0] == 2 * grid - 1)
        window_rows = [r[0] for r in rel if r[0] != 2 * grid - 1]
        dec = prefix + "mask_decoder."
        decoder_depth = 1 + max(
            int(k[len(dec) :].split(".")[2]) for k in shapes if k.startswith(dec + "transformer.layers.")
        )
        iou_layers = [k for k in shapes if k.startswith(dec + "iou_prediction_head.layers.") and k.endswith("weight")]
        return cls(
            encoder_embed_dim=embed_dim,
            encoder_depth=depth,
            encoder_num_heads=embed_dim // head_dim,
            encoder_global_attn_indexes=global_blocks,
            encoder_mlp_ratio=shapes[enc + "blocks.0.mlp.lin1.weight"][0] / embed_dim,
            encoder_window_size=(window_rows[0] + 1) // 2 if window_rows else 0,
            patch_size=patch_size,
            image_size=grid * patch_size,
            prompt_embed_dim=shapes[dec + "iou_token.weight"][1],
            mask_in_chans=shapes[prefix + "prompt_encoder.mask_downscaling.3.weight"][0],
            decoder_depth=decoder_depth,
            decoder_mlp_dim=shapes[dec + "transformer.layers.0.mlp.lin1.weight"][0],
            decoder_num_heads=SamConfig.decoder_num_heads,  # not visible in shapes; upstream SAM always uses 8
            num_multimask_outputs=shapes[dec + "mask_tokens.weight"][0] - 1,
            iou_head_depth=len(iou_layers),
            iou_head_hidden_dim=shapes[dec + "iou_prediction_head.layers.0.weight"][0],
        )


@dataclass(frozen=True)
class NextChatConfig:
    """Everything needed to build a NExT-Chat model.

    Attributes:
        text: keyword arguments of ``transformers.LlamaConfig`` (the LLM).
        vision: a transformers vision config as a dict with its ``model_type`` (``clip_vision_model`` for the
            official tower; small presets may use another backbone).
        sam: SAM sizes.
        mm_hidden_size: width of the vision features fed to ``mm_projector``.
        mm_depth: number of Linear layers in ``mm_projector`` (GELU between them).
        mm_vision_select_layer: which entry of the tower's ``hidden_states`` to use (CLIP towers drop CLS).
        image_first: put the image before the question in prompts (official); small presets trained from scratch
            put the question first so the image positions can see it through causal attention.
        system_prompt: the conversation's system line; ``None`` is vicuna_v1.1's (official). A small preset may
            use ``""`` to keep its sequences short.
        mask_iou_threshold: masks whose predicted IoU is below this are reported empty (the official demo's 0.3).
        name: a preset name or checkpoint id, for provenance.
    """

    text: Mapping[str, Any]
    vision: Mapping[str, Any]
    sam: SamConfig = field(default_factory=SamConfig)
    mm_hidden_size: int = 1024
    mm_depth: int = 2
    mm_vision_select_layer: int = -2
    image_first: bool = True
    system_prompt: str | None = None
    mask_iou_threshold: float = 0.3
    name: str = "nextchat"

    @property
    def hidden_size(self) -> int:
        """LLM width."""
        return int(self.text["hidden_size"])

    @property
    def vocab_size(self) -> int:
        """LLM vocabulary size (base vocabulary plus added tokens)."""
        return int(self.text["vocab_size"])

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower takes."""
        return int(self.vision["image_size"])

    @property
    def is_vit_tower(self) -> bool:
        """Whether the tower is a ViT whose first token is CLS (CLIP); grid backbones give feature maps."""
        return "patch_size" in self.vision and self.vision.get("model_type", "").endswith("vision_model")

    @property
    def image_grid(self) -> int:
        """Image tokens per side: the ViT's patch grid, or the grid backbone's feature map (``output_stride``)."""
        if self.is_vit_tower:
            return self.image_size // int(self.vision["patch_size"])
        return self.image_size // int(self.vision.get("output_stride", 32))

    @property
    def image_token_len(self) -> int:
        """Number of ``<im_patch>`` positions an image fills (576 for CLIP-L/14 at 336 px)."""
        return self.image_grid**2

    # ----------------------------------------------------------------------------------------------------------
    # config.json in the official layout

    def to_checkpoint_dict(self) -> dict[str, Any]:
        """The official ``config.json`` fields, plus a ``nextchat`` block with what the official file lacks."""
        out: dict[str, Any] = {
            "architectures": ["NextChatForSegLM"],
            "model_type": "nextchat",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_scaling": None,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
        }
        out.update(self.text)
        out.update(
            use_mm_proj=True,
            mm_depth=self.mm_depth,
            mm_hidden_size=self.mm_hidden_size,
            mm_vision_select_layer=self.mm_vision_select_layer,
            mm_use_im_start_end=True,
            mm_vision_tower=self.vision.get("_name_or_path") or None,
            sam_path=None,
            use_cache=False,
            nextchat={
                "name": self.name,
                "vision_config": dict(self.vision),
                "sam_config": dataclasses.asdict(self.sam),
                "image_first": self.image_first,
                "system_prompt": self.system_prompt,
                "mask_iou_threshold": self.mask_iou_threshold,
            },
        )
        return out

    @classmethod
    def from_checkpoint_dict(
        cls,
        raw: Mapping[str, Any],
        *,
        vision: Mapping[str, Any] | None = None,
        sam: SamConfig | None = None,
        name: str | None = None,
    ) -> NextChatConfig:
        """Read a ``config.json`` as the official code writes it (or as :meth:`to_checkpoint_dict` does).

        Args:
            raw: the parsed JSON.
            vision: the vision tower's config when the file has none of its own (the official file only names a
                path); defaults to CLIP ViT-L/14-336.
            sam: SAM sizes when the file has none (read them off the weights with
                :meth:`SamConfig.from_state_dict_shapes`); defaults to ViT-H.
            name: provenance name.
        """
        if raw.get("model_type") not in ("nextchat", None):
            raise ValueError(f"config.json has model_type {raw.get('model_type')!r}; expected 'nextchat'")
        extra = raw.get("nextchat") or {}
        text = {k: raw[k] for k in _TEXT_KEYS if k in raw and raw[k] is not None}
        text.setdefault("num_key_value_heads", text.get("num_attention_heads"))
        text.setdefault("rope_theta", 10000.0)  # transformers 4.31 did not write LLaMA's default base
        vision_cfg = extra.get("vision_config") or vision or clip_vit_large_336_vision()
        sam_cfg = sam
        if sam_cfg is None and "sam_config" in extra:
            sam_raw = dict(extra["sam_config"])
            sam_raw["encoder_global_attn_indexes"] = tuple(sam_raw["encoder_global_attn_indexes"])
            sam_cfg = SamConfig(**sam_raw)
        return cls(
            text=text,
            vision=dict(vision_cfg),
            sam=sam_cfg or SamConfig(),
            mm_hidden_size=int(raw.get("mm_hidden_size", 1024)),
            mm_depth=int(raw.get("mm_depth", 2)),
            mm_vision_select_layer=int(raw.get("mm_vision_select_layer", -2)),
            image_first=bool(extra.get("image_first", True)),
            system_prompt=extra.get("system_prompt"),
            mask_iou_threshold=float(extra.get("mask_iou_threshold", 0.3)),
            name=extra.get("name") or name or str(raw.get("_name_or_path") or "nextchat"),
        )

    @classmethod
    def from_json_file(cls, path: str | Path, **kwargs: Any) -> NextChatConfig:
        """Read ``config.json`` from disk; see :meth:`from_checkpoint_dict` for the keyword arguments."""
        return cls.from_checkpoint_dict(json.loads(Path(path).read_text()), **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Presets: the only place that knows sizes.


def clip_vit_large_336_vision() -> dict[str, Any]:
    """``openai/clip-vit-large-patch14-336`` as a ``CLIPVisionConfig`` dict."""
    return {
        "model_type": "clip_vision_model",
        "_name_or_path": OFFICIAL_CLIP_TOWER,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    }


def llama_text(
    vocab_size: int, hidden_size: int, intermediate_size: int, layers: int, heads: int, max_positions: int
) -> dict[str, Any]:
    """``LlamaConfig`` keyword arguments: the given sizes plus LLaMA-2's fixed choices (SiLU, RMSNorm 1e-5, RoPE
    base 10000, untied head, ``<unk> <s> </s>`` = 0 1 2)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "hidden_act": "silu",
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def build_nextchat_7b_336() -> NextChatConfig:
    """The published ``AoZhang/nextchat-7b-336``: Vicuna-1.5-7B, CLIP ViT-L/14-336, SAM ViT-H."""
    text = llama_text(32005, 4096, 11008, 32, 32, 4096)  # LLaMA-2's 32000 + <im_patch> <im_start> <im_end> <at> <boxes>
    return NextChatConfig(text=text, vision=clip_vit_large_336_vision(), sam=SamConfig(), name="nextchat-7b-336")


def build_bench_mid(vocab_size: int = 1005) -> NextChatConfig:
    """A mid-size random-weight model for testing the full-size benchmark: the 7B's structure and prompt length (CLIP
    at 336 px / 14 → 576 image tokens, SAM at 1024 px with windowed and global blocks), ~30 M parameters."""
    text = llama_text(vocab_size, 512, 1376, 4, 8, 2048)
    vision = {**clip_vit_large_336_vision(), "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
              "num_attention_heads": 4, "projection_dim": 128}  # fmt: skip
    vision.pop("_name_or_path")
    sam = SamConfig(encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3))
    return NextChatConfig(text=text, vision=vision, sam=sam, mm_hidden_size=128, name="bench-mid")


def build_tiny(vocab_size: int = 128) -> NextChatConfig:
    """A tiny random-weight model for tests and the random-weight smoke demo (builds in milliseconds).

    Every part keeps the official structure; only widths shrink. CLIP keeps patch 14 so the tower is a real ViT with
    a CLS token, SAM keeps the prompt width 256 (``seg_prompt_mlp`` emits 4×256) at a 64 px input.
    """
    text = llama_text(vocab_size, 32, 64, 2, 4, 512)
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 56,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
    }
    sam = SamConfig(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        encoder_window_size=2,
        image_size=64,
        decoder_mlp_dim=64,
    )
    return NextChatConfig(text=text, vision=vision, sam=sam, mm_hidden_size=32, name="tiny")


def build_demo_shapes(vocab_size: int = 645) -> NextChatConfig:
    """The embedded demo model, trained from scratch on the shapes world on a 2-core CPU.

    Sizes follow from that budget (measured, see ``nextchat/demo/README.md``):

    - A small ResNet tower (transformers' ``ResNetModel``: stem of width 32, stages 48/96/192 with 1/2/2 basic
      blocks, output stride 16) at 128 px → an 8 × 8 feature map = 64 image tokens. From scratch it learns the
      class of the object at each position several times faster than a ViT of the same cost (16-px patches only
      see flat colour inside a large shape; convolutions see edges and corners). Fixed 2D sinusoids added to its
      features say where each token is (see ``VisionTower``).
    - LLaMA 3 × 128 (MLP 384, 4 heads): three layers let the image positions read the question (first), the
      ``<at>`` position pick the matching one (second) and the box be refined (third); width 128 trains ~1.6× more
      conversations a minute than 192 on two cores, and from scratch the number of examples seen is what counts.
    - A vocabulary of a few hundred pieces trained on the task texts (byte fallback keeps any text encodable).
    - Question before the image and no system line: with causal attention only positions after the question can
      condition on it, and every token saved is step time.
    - SAM: a 2-block ViT encoder of width 64 at 128 px with 8 px patches (16 × 16 grid, 64 × 64 low-res masks),
      prompt width 64, so masks are fine enough for shapes that fill 10–50 px.
    """
    text = llama_text(vocab_size, 128, 384, 3, 4, 512)
    vision = {
        "model_type": "resnet",
        "embedding_size": 32,
        "hidden_sizes": [48, 96, 192],
        "depths": [1, 2, 2],
        "layer_type": "basic",
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "image_size": 128,
        "output_stride": 16,
    }
    sam = SamConfig(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        encoder_window_size=8,
        patch_size=8,
        image_size=128,
        prompt_embed_dim=64,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
    )
    return NextChatConfig(
        text=text,
        vision=vision,
        sam=sam,
        mm_hidden_size=192,
        mm_vision_select_layer=-1,
        image_first=False,
        system_prompt="",
        name="demo-shapes",
    )


PRESETS: dict[str, Callable[[], NextChatConfig]] = {
    "nextchat-7b-336": build_nextchat_7b_336,
    "tiny": build_tiny,
    "bench-mid": build_bench_mid,
    "demo-shapes": build_demo_shapes,
}


def preset(name: str) -> NextChatConfig:
    """Build the config of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
