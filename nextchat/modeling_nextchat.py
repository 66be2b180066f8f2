"""NExT-Chat (arXiv 2311.04498) on transformers' LLaMA and CLIP and segment-anything's SAM.

Attribute names are the official checkpoint keys: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``,
``model.mm_projector.{0,2}``, ``model.vision_tower.vision_model.*``, ``lm_head``, ``loc_encoder.*``,
``loc_decoder.*``, ``seg_prompt_mlp.*`` and ``sam.model.*``.

Data flow (pix2emb):

- image → vision tower → ``mm_projector`` → the embeddings of the ``<im_patch>`` positions;
- a box given by the user (square-frame xyxy, 0–1) → ``loc_encoder`` → the embedding of its ``<boxes>`` token;
- the final-norm hidden state at each ``<at>`` → ``loc_decoder`` → a box (raw, unclamped, square frame), and
  → ``seg_prompt_mlp`` → 4 SAM prompt tokens that, with SAM's own box prompt of that box, give a mask.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from nextchat import attention, cpu_kernels
from nextchat.configuration import NextChatConfig, SamConfig
from nextchat.kv_cache import BatchKVCache
from nextchat.processing import SAM_MEAN, SAM_STD


SEG_PROMPT_TOKENS = 4  # seg_prompt_mlp emits this many SAM prompt tokens per <at>

# transformers renamed LlamaModel's ``past_key_values`` argument (and output field) to ``cache`` in 5.2x.
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
_LAYER_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


def mlp(*widths: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of the given widths with an activation between them (keys ``0``, ``2``, ...)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first parameter: parts of the model may differ (see :mod:`nextchat.devices`)."""
    return next(module.parameters()).dtype


def build_sam(config: SamConfig) -> Sam:
    """segment-anything's ``Sam`` at the given sizes (as its ``_build_sam``, with every size a parameter)."""
    grid = config.embedding_size
    encoder = ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.encoder_mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # pyright: ignore[reportArgumentType] - SAM's own builder does this
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=config.encoder_window_size,
        global_attn_indexes=config.encoder_global_attn_indexes,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            num_heads=config.decoder_num_heads,
            mlp_dim=config.decoder_mlp_dim,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(encoder, prompt_encoder, decoder, pixel_mean=list(SAM_MEAN), pixel_std=list(SAM_STD))


class SamHead(nn.Module):
    """SAM behind NExT-Chat's framing; ``model`` is segment-anything's ``Sam`` (keys ``sam.model.*``).

    The prompt encoder stays float32 whatever the model dtype: its Gaussian positional-encoding matrix is float32
    and its arithmetic fails in bfloat16.
    """

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        self.model = build_sam(config)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised, centre-padded images → image embeddings ``[B, C, S/16, S/16]``."""
        encoder = self.model.image_encoder
        return encoder(pixel_values.to(encoder.patch_embed.proj.weight.dtype))

    def decode_masks(
        self, image_embeddings: torch.Tensor, prompt_tokens: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on one image.

        Args:
            image_embeddings: ``[1, C, g, g]`` for the image.
            prompt_tokens: ``[N, 4, C]`` from ``seg_prompt_mlp``.
            boxes: ``[N, 4]`` xyxy in SAM's input pixel frame (square-frame box × S).

        Returns:
            ``low_res`` logits ``[N, 1, 4g, 4g]`` and predicted IoU ``[N]``, both float32.
        """
        prompt_encoder = self.model.prompt_encoder
        box_tokens, dense = prompt_encoder(points=None, boxes=boxes.float(), masks=None)
        dtype = image_embeddings.dtype
        sparse = torch.cat([prompt_tokens.to(dtype), box_tokens.to(dtype)], dim=1)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )
        return low_res.float(), iou.float().reshape(-1)


def grid_position_table(grid: int, width: int) -> torch.Tensor:
    """Fixed 2D sinusoids ``[grid*grid, width]`` (row-major): rows in the first half of the channels, columns in the
    second, each as sin/cos pairs over geometric frequencies; one period spans the grid at the lowest frequency."""
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.zeros(grid * grid, width)
    for k, coord in enumerate((rows.flatten(), cols.flatten())):
        angles = (coord[:, None].float() + 0.5) / grid * 2 * math.pi * freqs[None]
        table[:, 2 * k * quarter : (2 * k + 1) * quarter] = angles.sin()
        table[:, (2 * k + 1) * quarter : (2 * k + 2) * quarter] = angles.cos()
    return table


class VisionTower(nn.Module):
    """A transformers vision backbone (``vision_model``) that yields one feature per image token.

    ViT towers (CLIP) give ``hidden_states[select_layer]`` without CLS; their learned position embeddings already
    say where each token is. Grid backbones (convolutional) give their last feature map flattened row-major, plus a
    fixed 2D sinusoid table (as DETR adds to ResNet features): a convolution's output does not know its own place,
    and the box decoder needs it. The table is a non-persistent buffer, so checkpoints hold only the backbone.
    """

    def __init__(self, config: NextChatConfig) -> None:
        super().__init__()
        vision = dict(config.vision)
        vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
        backbone = AutoModel.from_config(vision_config)
        # Older transformers nest CLIP's modules under .vision_model; newer ones put them on CLIPVisionModel itself.
        # Either way the keys below this module stay the official ``vision_model.*``.
        self.vision_model = getattr(backbone, "vision_model", backbone)
        self.select_layer = config.mm_vision_select_layer
        self.is_vit = config.is_vit_tower
        if not self.is_vit:
            table = grid_position_table(config.image_grid, config.mm_hidden_size)
            self.register_buffer("grid_positions", table, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, s, s]`` → ``[B, N, mm_hidden]`` image-token features (N = ``image_grid ** 2``, row-major)."""
        dtype = next(self.vision_model.parameters()).dtype
        if self.is_vit:
            out = self.vision_model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            return out.hidden_states[self.select_layer][:, 1:]
        grid = self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # [B, C, h, w]
        return grid.flatten(2).transpose(1, 2) + self.grid_positions.to(grid.dtype)


class NextChatLlamaModel(LlamaModel):
    """LLaMA with the multimodal projector and vision tower under the official ``model.*`` keys."""

    def __init__(self, config: NextChatConfig) -> None:
        # The attention is SDPA but for single-query steps on a CPU (see nextchat.attention); a config that names
        # another implementation keeps it.
        super().__init__(LlamaConfig(**{"attn_implementation": attention.NAME, **config.text}))
        self.vision_tower = VisionTower(config)
        hidden = config.hidden_size
        widths = [config.mm_hidden_size] + [hidden] * config.mm_depth
        self.mm_projector = mlp(*widths, activation=nn.GELU)


@dataclass(frozen=True)
class TokenIds:
    """Ids of the tokens the model treats specially (read from the tokenizer, never hard-coded)."""

    im_patch: int
    im_start: int
    im_end: int
    at: int
    boxes: int
    bos: int
    eos: int
    pad: int


class NextChatModel(nn.Module):
    """The NExT-Chat network (``NextChatForSegLM``): LLaMA + vision tower + location heads + SAM.

    Methods are the building blocks the engine schedules; none of them loops over tokens.
    """

    def __init__(self, config: NextChatConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.model = NextChatLlamaModel(config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.loc_encoder = mlp(4, hidden // 2, hidden)
        self.loc_decoder = mlp(hidden, hidden // 2, 4)
        self.seg_prompt_mlp = mlp(hidden, hidden, config.sam.prompt_embed_dim * SEG_PROMPT_TOKENS)
        self.sam = SamHead(config.sam)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------------------------------------------------
    # Inputs

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision-tower input ``[B, 3, s, s]`` → projected image features ``[B, N, hidden]`` (N = image_token_len)."""
        features = self.model.vision_tower(pixel_values)
        return self.model.mm_projector(features.to(parameter_dtype(self.model.mm_projector)))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[...]`` → embeddings ``[..., hidden]``."""
        return self.model.embed_tokens(input_ids)

    def embed_prompt(
        self,
        input_ids: torch.Tensor,
        image_features: list[torch.Tensor | None],
        boxes: list[torch.Tensor],
        ids: TokenIds,
    ) -> torch.Tensor:
        """Prompt embeddings with images and boxes spliced in.

        Args:
            input_ids: ``[B, L]``; each row holds at most one ``<im_start>`` + N × ``<im_patch>`` + ``<im_end>``.
            image_features: per row ``[N, hidden]`` (or ``None`` for a row without image).
            boxes: per row ``[K, 4]`` square-frame xyxy for the row's K ``<boxes>`` tokens, in order.
            ids: special token ids.

        Returns:
            ``[B, L, hidden]``: ``<im_patch>`` positions hold the image features, ``<boxes>`` positions
            ``loc_encoder(box)``; ``<at>``, ``<im_start>`` and ``<im_end>`` keep their token embeddings.
        """
        embeds = self.embed_tokens(input_ids).clone()
        for row, (features, row_boxes) in enumerate(zip(image_features, boxes, strict=True)):
            starts = (input_ids[row] == ids.im_start).nonzero().flatten()
            if features is not None:
                if starts.numel() != 1:
                    raise ValueError(f"prompt row {row} has {starts.numel()} <im_start> tokens; expected 1")
                start, n = int(starts[0]) + 1, features.shape[0]
                span = input_ids[row, start : start + n + 1]
                if span.numel() != n + 1 or not bool((span[:n] == ids.im_patch).all()) or int(span[n]) != ids.im_end:
                    raise ValueError(f"prompt row {row} needs <im_start> + {n} × <im_patch> + <im_end>")
                embeds[row, start : start + n] = features.to(embeds.dtype)
            box_positions = (input_ids[row] == ids.boxes).nonzero().flatten()
            if box_positions.numel() != row_boxes.shape[0]:
                raise ValueError(
                    f"prompt row {row} has {box_positions.numel()} <boxes> tokens but {row_boxes.shape[0]} boxes"
                )
            if box_positions.numel():
                embeds[row, box_positions] = self.encode_boxes(row_boxes).to(embeds.dtype)
        return embeds

    # ------------------------------------------------------------------------------------------------------------
    # Location heads

    def encode_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Square-frame xyxy ``[K, 4]`` → ``<boxes>`` input embeddings ``[K, hidden]``."""
        return self.loc_encoder(boxes.to(device=self.device, dtype=parameter_dtype(self.loc_encoder)))

    def decode_boxes(self, at_hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm ``<at>`` states ``[K, hidden]`` → square-frame xyxy ``[K, 4]`` (raw: no sigmoid, no clamp)."""
        return self.loc_decoder(at_hidden.to(parameter_dtype(self.loc_decoder)))

    def box_feedback(self, at_hidden: torch.Tensor) -> torch.Tensor:
        """Input embedding of the token after ``<at>``: ``loc_encoder(loc_decoder(h_at))`` ``[K, hidden]``."""
        return self.encode_boxes(self.decode_boxes(at_hidden)).to(self.dtype)

    # ------------------------------------------------------------------------------------------------------------
    # LLM

    def forward_llm(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object | None = None,
        logits_positions: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """One LLaMA pass.

        Args:
            inputs_embeds: ``[B, T, hidden]`` new positions.
            attention_mask: ``[B, past + T]``, 1 for real positions, 0 for padding.
            position_ids: ``[B, T]``.
            cache: a transformers cache holding ``past`` positions, or ``None``.
            logits_positions: if given, ``[B]`` index into T whose logits to compute (the others are not needed).
            use_cache: build and return the cache (training does not need one).

        Returns:
            final-norm hidden states ``[B, T, hidden]``, logits (``[B, vocab]`` at ``logits_positions``, else
            ``[B, T, vocab]``, float32), and the updated cache.
        """
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{_CACHE_ARG: cache},
        )
        hidden = out.last_hidden_state
        if logits_positions is not None:
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_positions]
            logits = self.lm_head(picked).float()
        else:
            logits = self.lm_head(hidden).float()
        return hidden, logits, getattr(out, _CACHE_ARG, None)

    def decode_step(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: BatchKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new position for each row of the step's window, on the batch's own cache.

        transformers' decoder layers, driven directly: ``LlamaModel.forward`` builds a 4D mask from the 2D padding
        mask on every call, and its ``DynamicCache`` concatenates every layer's keys at every step; here the mask is
        the cache's own and the new keys are written in place. Only device work: a CUDA graph can capture it.

        Args:
            inputs_embeds: ``[B, 1, hidden]`` the rows' next inputs (B rows of the window opened by
                :meth:`BatchKVCache.begin_step`).
            position_ids: ``[B, 1]`` their positions (each row counts only its real tokens).
            attention_mask: ``[B, 1, 1, L]`` bool, what ``begin_step`` returned.
            cache: the running rows' keys and values, with a step open.

        Returns:
            final-norm hidden states ``[B, hidden]`` and logits ``[B, vocab]`` (float32).
        """
        llm = self.model
        mask = attention_mask
        if llm.config._attn_implementation not in {"sdpa", attention.NAME}:  # eager adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(inputs_embeds.dtype).min
            )
        position_embeddings = llm.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden = inputs_embeds
        for layer in llm.layers[: llm.config.num_hidden_layers]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **{_LAYER_CACHE_ARG: cache},
            )
        hidden = llm.norm(hidden)[:, -1]
        # On a CPU a kernel reads the 16-bit head at memory speed (torch's GEMV reaches a third to a half of it).
        logits = cpu_kernels.bf16_matvec(hidden, self.lm_head.weight)
        return hidden, self.lm_head(hidden).float() if logits is None else logits

    # ------------------------------------------------------------------------------------------------------------
    # Masks

    def encode_sam_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM input ``[B, 3, S, S]`` → image embeddings ``[B, 256, S/16, S/16]``."""
        return self.sam.encode_images(pixel_values.to(self.device))

    def predict_masks(
        self, image_embeddings: torch.Tensor, at_hidden: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N objects of one image.

        Args:
            image_embeddings: ``[1, 256, g, g]`` SAM embedding of the image.
            at_hidden: ``[N, hidden]`` the objects' ``<at>`` states (or a stand-in, see the engine).
            boxes: ``[N, 4]`` square-frame xyxy (the decoded boxes).

        Returns:
            low-resolution logits ``[N, 1, 4g, 4g]`` and predicted IoU ``[N]``, float32.
        """
        prompt_tokens = self.seg_prompt_mlp(at_hidden.to(parameter_dtype(self.seg_prompt_mlp)))
        prompt_tokens = prompt_tokens.view(at_hidden.shape[0], SEG_PROMPT_TOKENS, -1)
        sam_boxes = boxes.float() * self.config.sam.image_size
        return self.sam.decode_masks(image_embeddings, prompt_tokens, sam_boxes)
