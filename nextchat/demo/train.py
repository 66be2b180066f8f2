"""Train the embedded demo model from scratch on the shapes world (a 2-core CPU recipe).

``python -m nextchat.demo.train --out runs/demo`` reproduces the shipped checkpoint from its seed. The run is
resumable (``--resume``) from the checkpoint it writes every few hundred steps, shows a progress bar and appends
every logged step to ``<out>/loss.jsonl``.

The paper's recipe at small scale:

- **Stage 1/2** (language + location): next-token loss on the answers, box loss ``2·L1 + 0.8·(1 − GIoU)`` on
  ``loc_decoder`` at every answer ``<at>``, and both cycle losses (``loc_encoder(loc_decoder(h)) ≈ h``, which here
  trains the box encoder alone, see ``stage12_loss``, and ``loc_decoder(loc_encoder(b)) ≈ b``). With no pretrained
  CLIP here the tower trains too, helped by auxiliary losses from the renderer's masks (the class and the box of the
  object at each position, and for questions about particular objects which positions hold them, read after the
  LLM's first layer and after its last); their heads are not part of the model. ``--curriculum-steps`` optionally
  starts with at most two objects a scene (the shipped recipe does without).
- **Stage 3** (masks): everything but SAM and ``seg_prompt_mlp`` frozen; ``20·focal + dice + MSE(IoU prediction)``
  on masks prompted by the ``<at>`` state with its predicted box, and by ``loc_encoder(box)`` with a given box (how
  masks for a caller's boxes are made).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nextchat.configuration import build_demo_shapes
from nextchat.demo.data import NUM_PATCH_CLASSES, Batch, BatchBuilder, sam_frame_masks, task_corpus
from nextchat.demo.world import render_scene
from nextchat.loading import build_model, demo_checkpoint_dir, save_pretrained
from nextchat.modeling_nextchat import NextChatModel
from nextchat.processing import ImageGeometry, boxes_to_square, sam_pixel_values, vision_pixel_values
from nextchat.prompting import chat_prompt
from nextchat.tasks import LOCATE_ANSWER_PREFIX, locate_question
from nextchat.tokenization import NextChatTokenizer, train_tokenizer


VOCAB_PIECES = 640  # ~260 for byte fallback; the rest learns every word of the task texts whole
WHOLE_PIECES = ("USER:", "ASSISTANT:")


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching xyxy rows ``[M, 4]`` (``a`` may be unordered: it is sorted first)."""
    a = torch.cat([torch.minimum(a[:, :2], a[:, 2:]), torch.maximum(a[:, :2], a[:, 2:])], dim=1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter_wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area_a + area_b - inter
    hull_wh = torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)


class AuxHeads(nn.Module):
    """Training-only probes that give the from-scratch tower and LLM a dense signal (not saved in the model)."""

    def __init__(self, vision_width: int, hidden: int) -> None:
        super().__init__()
        self.patch_class = nn.Linear(vision_width, NUM_PATCH_CLASSES)
        self.patch_box = nn.Linear(vision_width, 4)
        self.target_patch = nn.Linear(hidden, 1)
        self.target_patch_early = nn.Linear(hidden, 1)


def llm_hidden_states(model: NextChatModel, embeds: torch.Tensor, lengths: torch.Tensor, chunks: int = 2):
    """The LLM over right-padded rows, in chunks of similar length so short rows do not pay for the longest.

    Rows are right-padded, so with causal attention no real position ever sees a pad: no attention mask is needed,
    which keeps attention on its fast causal path. Returns the final-norm hidden states and the first layer's
    output, both ``[B, T, hidden]`` (zero past each chunk's own length).
    """
    order = lengths.argsort()
    hidden = embeds.new_zeros(embeds.shape)
    early = embeds.new_zeros(embeds.shape)
    for rows in order.chunk(chunks):
        length = int(lengths[rows].max())
        out = model.model(inputs_embeds=embeds[rows, :length], use_cache=False, output_hidden_states=True)
        pad = (0, 0, 0, embeds.shape[1] - length)
        hidden = hidden.index_put((rows,), F.pad(out.last_hidden_state, pad))
        early = early.index_put((rows,), F.pad(out.hidden_states[1], pad))
    return hidden, early


def stage12_loss(model: NextChatModel, aux: AuxHeads, batch: Batch, ids) -> dict[str, torch.Tensor]:
    """Language, box, cycle and auxiliary losses of one batch."""
    tower = model.model.vision_tower(batch.pixel_values)  # [S, N, mm_hidden]
    features = model.model.mm_projector(tower)
    embeds = model.embed_prompt(batch.input_ids, [features[s] for s in batch.scene_index], batch.boxes, ids)
    hidden, early = llm_hidden_states(model, embeds, batch.attention_mask.sum(1))
    # The language loss needs logits only where there is a label (the answers): a few positions a row, not ~90.
    targets = batch.labels[:, 1:]
    answer = targets != -100
    logits = model.lm_head(hidden[:, :-1][answer]).float()
    losses = {"lm": F.cross_entropy(logits, targets[answer])}
    if batch.at_rows.numel():
        h_at = hidden[batch.at_rows, batch.at_positions]
        pred = model.loc_decoder(h_at)
        losses["box_l1"] = 2.0 * F.l1_loss(pred, batch.at_targets)
        losses["box_giou"] = 0.8 * (1 - generalized_iou(pred, batch.at_targets)).mean()
        # Only the box encoder learns to invert here: with the gradient reaching h_at, a from-scratch LLM collapses
        # every <at> state onto loc_encoder's 4-D image of a constant box, and box regression never starts.
        losses["cycle_state"] = F.mse_loss(model.loc_encoder(pred.detach()), h_at.detach())
    given = torch.cat(batch.boxes)
    if given.numel():
        losses["cycle_box"] = F.l1_loss(model.loc_decoder(model.loc_encoder(given)), given)
    losses["aux_patch"] = F.cross_entropy(aux.patch_class(tower).flatten(0, 1), batch.patch_classes.flatten())
    # Every object position also regresses its object's box: the tower learns to carry each object's extent at its
    # positions, so the LLM has only to find the right positions and copy what they hold.
    foreground = batch.patch_classes > 0
    if bool(foreground.any()):
        losses["aux_box"] = 2.0 * F.l1_loss(aux.patch_box(tower)[foreground], batch.patch_boxes[foreground])
    rows = (batch.target_patches[:, 0] >= 0).nonzero().flatten()
    if rows.numel():
        image_rows = batch.input_ids == ids.im_patch
        image = hidden[image_rows].view(hidden.shape[0], -1, hidden.shape[-1])[rows]
        image_early = early[image_rows].view(hidden.shape[0], -1, hidden.shape[-1])[rows]
        # Which positions hold the object(s) the question is about, as one choice among all positions: a
        # per-position sigmoid is satisfied by telling objects from background, this only by telling the asked-for
        # object from the others.
        coverage = batch.target_patches[rows]
        target = coverage / coverage.sum(1, keepdim=True).clamp(min=1e-6)
        losses["aux_target"] = 0.5 * F.cross_entropy(aux.target_patch(image)[..., 0], target)
        # The same choice after the first layer, where the image positions must read the question's words: the
        # gradient reaches the attention that binds them without passing through the layers above.
        losses["aux_target_early"] = 0.5 * F.cross_entropy(aux.target_patch_early(image_early)[..., 0], target)
    return losses


def mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAM's losses (lightning-SAM weights): ``20·focal + dice + MSE(predicted IoU, actual IoU)``, on ``[M, S, S]``."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * (1 - p_t) ** 2 * bce).mean()
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    hard = (logits > 0).float()
    actual = (hard * target).flatten(1).sum(1) / ((hard + target).clamp(max=1).flatten(1).sum(1)).clamp(min=1)
    return {"focal": 20 * focal, "dice": dice.mean(), "iou": F.mse_loss(iou_pred, actual.detach())}


def stage3_loss(
    model: NextChatModel,
    tokenizer: NextChatTokenizer,
    rng: np.random.Generator,
    num_scenes: int,
    ids,
) -> dict[str, torch.Tensor]:
    """Mask losses for up to two objects of each of ``num_scenes`` fresh scenes."""
    config = model.config
    sam_size = config.sam.image_size
    scenes = [render_scene(rng) for _ in range(num_scenes)]
    picks = [rng.permutation(len(s.objects))[:2] for s in scenes]
    prompts, owners, object_index, boxes_px = [], [], [], []
    for s_index, (scene, pick) in enumerate(zip(scenes, picks, strict=True)):
        for i in pick:
            obj = scene.objects[int(i)]
            text = chat_prompt(
                locate_question(f"the {obj.name}"), config.image_token_len, config.image_first, config.system_prompt
            )
            prompts.append(tokenizer.encode(f"{text} {LOCATE_ANSWER_PREFIX}"))
            owners.append(s_index)
            object_index.append(int(i))
            boxes_px.append(obj.box)
    with torch.no_grad():
        pixels = torch.stack([vision_pixel_values(s.image, config.image_size) for s in scenes])
        features = model.encode_images(pixels)
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), tokenizer.pad_id)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the last column, on its <at>
            input_ids[row, length - len(p) :] = torch.tensor(p)
            mask[row, length - len(p) :] = 1
        embeds = model.embed_prompt(input_ids, [features[o] for o in owners], [torch.zeros(0, 4)] * len(prompts), ids)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden, _, _ = model.forward_llm(embeds, mask, positions, use_cache=False)
        h_at = hidden[:, -1]
        pred_boxes = model.loc_decoder(h_at)
        given = torch.cat(
            [
                boxes_to_square(np.asarray([b]), ImageGeometry(scenes[o].width, scenes[o].height))
                for o, b in zip(owners, boxes_px, strict=True)
            ]
        )
        # Half the prompts are the model's own <at> state and box, half a given box through loc_encoder.
        use_given = torch.from_numpy(rng.random(len(prompts)) < 0.5)
        states = torch.where(use_given[:, None], model.loc_encoder(given), h_at)
        prompt_boxes = torch.where(use_given[:, None], given, pred_boxes)
    sam_pixels = torch.stack([sam_pixel_values(s.image, sam_size) for s in scenes])
    embeddings = model.sam.encode_images(sam_pixels)
    gt = [sam_frame_masks(s, sam_size) for s in scenes]
    tokens = model.seg_prompt_mlp(states).view(len(prompts), 4, -1)
    logits, ious, targets = [], [], []
    for row, owner in enumerate(owners):
        low, iou = model.sam.decode_masks(
            embeddings[owner : owner + 1], tokens[row : row + 1], prompt_boxes[row : row + 1] * sam_size
        )
        logits.append(F.interpolate(low, (sam_size, sam_size), mode="bilinear", align_corners=False)[0, 0])
        ious.append(iou[0])
        targets.append(torch.from_numpy(gt[owner][object_index[row]]).float())
    return mask_losses(torch.stack(logits), torch.stack(ious), torch.stack(targets))


def init_grid_positions(model: NextChatModel) -> None:
    """Start the tower's learned position embeddings as 2D sinusoids (rows in one half, columns in the other).

    From-scratch ViTs begin with near-zero position embeddings and must discover "where" before boxes can be
    regressed; a 2D pattern gives every patch its place from step 0 (it stays trainable).
    """
    embedding = model.model.vision_tower.vision_model.embeddings.position_embedding.weight  # [1 + g*g, C]
    width = embedding.shape[1]
    grid = round((embedding.shape[0] - 1) ** 0.5)
    quarter = width // 4
    freqs = 1.0 / (grid ** (torch.arange(quarter) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.zeros(grid * grid, width)
    for k, coord in enumerate((rows.flatten(), cols.flatten())):
        angles = coord[:, None].float() * freqs[None] * math.pi / 2
        table[:, 2 * k * quarter : (2 * k + 1) * quarter] = angles.sin()
        table[:, (2 * k + 1) * quarter : (2 * k + 2) * quarter] = angles.cos()
    with torch.no_grad():
        embedding[1:] = table


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_tokenizer(directory: Path, seed: int) -> NextChatTokenizer:
    """The demo vocabulary, trained on task texts of a fixed seed."""
    return train_tokenizer(task_corpus(np.random.default_rng([seed, 999_999])), directory, VOCAB_PIECES, WHOLE_PIECES)


def quick_eval(model: NextChatModel, tokenizer: NextChatTokenizer, scenes: int, masks: bool) -> dict:
    """Held-out figures mid-run: ``nextchat.demo.evaluate``'s report (as its ``--json`` writes it) on fewer scenes."""
    from nextchat.demo.evaluate import evaluate, held_out_scenes
    from nextchat.pipeline import NextChatPipeline

    model.eval()
    with torch.no_grad():
        report = evaluate(NextChatPipeline(model, tokenizer), held_out_scenes(scenes), masks=masks)
    model.train()
    print(report.table(), file=sys.stderr)
    return asdict(report)


# The training loop reads top to bottom as the recipe (arguments, model, resume, stages, logging, install); split into
# helpers it would scatter one run's state across them, so it is the one function exempt from the complexity limits.
def main(argv: list[str] | None = None) -> None:  # noqa: C901, PLR0915
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (checkpoints, loss log)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=7000, help="stage 1/2 steps")
    parser.add_argument("--mask-steps", type=int, default=2000, help="stage 3 steps")
    parser.add_argument("--scenes", type=int, default=12, help="scenes per step")
    parser.add_argument("--samples-per-scene", type=int, default=4, help="conversations about each scene")
    parser.add_argument("--curriculum-steps", type=int, default=0, help="steps with at most two objects a scene")
    parser.add_argument("--mask-scenes", type=int, default=12, help="scenes per stage 3 step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--mask-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=0, help="held-out figures every N steps (0: never)")
    parser.add_argument("--eval-scenes", type=int, default=40)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    parser.add_argument("--install", action="store_true", help="copy the final checkpoint into the package")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals slow CPU training down as weights shrink
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(args.out / "tokenizer", args.seed)
    config = build_demo_shapes(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(args.seed)
    model = build_model(config).train()
    if config.is_vit_tower:
        init_grid_positions(model)
    aux = AuxHeads(config.mm_hidden_size, config.hidden_size)
    from nextchat.engine import NextChatEngine

    ids = NextChatEngine(model, tokenizer).ids
    stage12_params = [p for n, p in model.named_parameters() if not n.startswith(("sam.", "seg_prompt_mlp."))]
    stage3_params = [p for n, p in model.named_parameters() if n.startswith(("sam.", "seg_prompt_mlp."))]
    opt12 = torch.optim.AdamW([*stage12_params, *aux.parameters()], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    opt3 = torch.optim.AdamW(stage3_params, lr=args.mask_lr, betas=(0.9, 0.95), weight_decay=0.01)
    step, elapsed = 0, 0.0
    state_path = args.out / "state.pt"
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt12.load_state_dict(state["opt12"])
        opt3.load_state_dict(state["opt3"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", file=sys.stderr)

    def save() -> None:
        state = {"model": model.state_dict(), "aux": aux.state_dict(), "opt12": opt12.state_dict(),
                 "opt3": opt3.state_dict(), "step": step, "elapsed": elapsed}  # fmt: skip
        torch.save(state, args.out / "state.tmp")
        (args.out / "state.tmp").replace(state_path)

    builder = BatchBuilder(tokenizer, config, samples_per_scene=args.samples_per_scene)
    total = args.steps + args.mask_steps
    log = (args.out / "loss.jsonl").open("a")
    stage12_frozen = False
    bar = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    while step < total:
        started = time.perf_counter()
        rng = np.random.default_rng([args.seed, step])  # per-step streams: resuming reproduces the same data
        if step < args.steps:
            stage, opt, params = "1/2", opt12, [*stage12_params, *aux.parameters()]
            lr = lr_at(step, args.steps, args.lr, args.warmup)
            max_objects = 2 if step < args.curriculum_steps else 4
            losses = stage12_loss(model, aux, builder.build(rng, args.scenes, max_objects), ids)
        else:
            if not stage12_frozen:  # stage 3 trains the mask path alone, also when a run resumes inside it
                for p in stage12_params:
                    p.requires_grad_(False)
                stage12_frozen = True
            stage, opt, params = "3", opt3, stage3_params
            lr = lr_at(step - args.steps, args.mask_steps, args.mask_lr, 100)
            losses = stage3_loss(model, tokenizer, rng, args.mask_scenes, ids)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.stack(list(losses.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{loss.item():.3f}")
        if step % 10 == 0 or step == total:
            record = {"step": step, "stage": stage, "lr": lr, "minutes": round(elapsed / 60, 2),
                      **{k: round(v.item(), 5) for k, v in losses.items()}}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == total:
            save()
        if args.eval_every and (step % args.eval_every == 0 or step == total):
            figures = quick_eval(model, tokenizer, args.eval_scenes, masks=step > args.steps)
            log.write(json.dumps({"step": step, "minutes": round(elapsed / 60, 2), "eval": figures}) + "\n")
            log.flush()
    bar.close()
    model.eval()
    final = save_pretrained(model, tokenizer, args.out / "checkpoint")
    print(f"wrote {final} after {elapsed / 60:.1f} min of training", file=sys.stderr)
    if args.install:
        target = demo_checkpoint_dir()
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(final, target)
        print(f"installed the checkpoint at {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
