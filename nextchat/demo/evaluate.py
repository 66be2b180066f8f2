"""Evaluate a NExT-Chat model on held-out shapes-world scenes (a seed training never uses).

``python -m nextchat.demo.evaluate`` prints, for the embedded demo model:

- **locate Acc@0.5**: every object of every scene asked for by name ("Where is the red circle in the image?",
  teacher-forced "Answer: <at>"), box IoU ≥ 0.5 with the rendered box, in original pixels;
- **mean mask IoU**: the mask of each located object (from its ``<at>`` state) against the rendered mask;
- **region description**: one object per scene given by its box; right when the answer names its colour and shape;
- **questions**: count, colour, shape and yes/no existence questions; right when the answer is exactly right.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nextchat.demo.world import COLOURS, SHAPES, Scene, make_sample, render_scene
from nextchat.pipeline import NextChatPipeline
from nextchat.tasks import TaskPrompt, answer_question, describe_region, locate_one


EVAL_STREAM = (
    7_000_003  # training draws from default_rng([seed, step]); evaluation from default_rng([EVAL_STREAM, seed])
)
QUESTION_TASKS = ("count", "colour", "shape", "exists")


@dataclass
class EvalReport:
    """Held-out figures (fractions in 0–1) and how many cases each is over."""

    scenes: int
    locate_acc50: float
    locate_cases: int
    mask_iou: float
    description_acc: float
    description_cases: int
    question_acc: float
    question_cases: int
    seconds: float
    locate_by_objects: dict[int, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            ("locate Acc@0.5", f"{100 * self.locate_acc50:.1f} %", self.locate_cases),
            ("mean mask IoU", f"{self.mask_iou:.3f}", self.locate_cases),
            ("region description", f"{100 * self.description_acc:.1f} %", self.description_cases),
            ("questions", f"{100 * self.question_acc:.1f} %", self.question_cases),
        ]
        lines = [f"held-out scenes: {self.scenes} ({self.seconds:.0f} s)", f"{'metric':<20} {'value':>8}  cases"]
        lines += [f"{name:<20} {value:>8}  {cases}" for name, value, cases in rows]
        by_count = ", ".join(f"{n}: {100 * acc:.1f} %" for n, acc in sorted(self.locate_by_objects.items()))
        lines.append(f"locate Acc@0.5 by objects in the scene: {by_count}")
        return "\n".join(lines)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two pixel xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def names_object(text: str, colour: str, shape: str) -> bool:
    """Whether an answer names this colour and this shape, and no other colour or shape."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return words & set(COLOURS) == {colour} and words & set(SHAPES) == {shape}


def held_out_scenes(count: int, seed: int = 1) -> list[Scene]:
    """The evaluation scenes: deterministic, and from a stream training never draws from."""
    rng = np.random.default_rng([EVAL_STREAM, seed])
    return [render_scene(rng) for _ in range(count)]


def evaluate(
    pipeline: NextChatPipeline, scenes: list[Scene], seed: int = 1, chunk: int = 16, masks: bool = True
) -> EvalReport:
    """Run every task over ``scenes`` in batches of ``chunk`` scenes (``masks=False`` skips SAM: IoU reads 0)."""
    started = time.perf_counter()
    engine = pipeline.engine
    rng = np.random.default_rng([EVAL_STREAM, seed, 1])
    located, ious, described, answered, crowd = [], [], [], [], []
    for first in range(0, len(scenes), chunk):
        group = scenes[first : first + chunk]
        encoded = engine.encode_images([s.image for s in group])
        asked: list[tuple[TaskPrompt, int, tuple]] = []  # (prompt, token budget, (kind, scene, item, image))
        for scene, image in zip(group, encoded, strict=True):
            asked.extend((locate_one(f"the {o.name}"), 1, ("locate", scene, o, image)) for o in scene.objects)
            target = scene.objects[int(rng.integers(len(scene.objects)))]
            asked.append((describe_region(target.box), 12, ("describe", scene, target, image)))
            for task in QUESTION_TASKS:
                sample = make_sample(scene, task, rng)
                if sample is not None:
                    asked.append((answer_question(sample.question), 8, ("question", scene, sample, image)))
        requests = [pipeline.request(p, k[3].geometry, k[3], max_new_tokens=n) for p, n, k in asked]
        kinds = [(*kind, prompt) for prompt, _, kind in asked]
        results = engine.run_batch(requests)
        sam_images = {}
        if masks:
            sam_images = dict(zip(map(id, group), engine.encode_sam_images([s.image for s in group]), strict=True))
        for (kind, scene, item, image, prompt), result in zip(kinds, results, strict=True):
            answer = pipeline.answer(prompt, result, image.geometry)
            if kind == "locate":
                obj = answer.objects[0] if answer.objects else None
                located.append(obj is not None and box_iou(obj.box, item.box) >= 0.5)
                crowd.append(len(scene.objects))
                if obj is None or not masks:
                    ious.append(0.0)
                    continue
                (mask,) = pipeline.segment(sam_images[id(scene)], [obj])
                union = np.logical_or(mask.mask, item.mask).sum()
                ious.append(float(np.logical_and(mask.mask, item.mask).sum() / union) if union else 0.0)
            elif kind == "describe":
                described.append(names_object(answer.text, item.colour, item.shape))
            else:
                answered.append(" ".join(answer.text.split()) == " ".join(item.answer.replace(" .", ".").split()))
    return EvalReport(
        scenes=len(scenes),
        locate_acc50=float(np.mean(located)),
        locate_cases=len(located),
        mask_iou=float(np.mean(ious)),
        description_acc=float(np.mean(described)),
        description_cases=len(described),
        question_acc=float(np.mean(answered)),
        question_cases=len(answered),
        seconds=time.perf_counter() - started,
        locate_by_objects={n: float(np.mean(np.asarray(located)[np.asarray(crowd) == n])) for n in sorted(set(crowd))},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint directory or 'demo' (the embedded model)")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1, help="held-out seed (training uses another stream)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="the LLM's layer linears in int8")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipeline = NextChatPipeline.from_pretrained(args.model, device="cpu", quantize=args.quantize)
    report = evaluate(pipeline, held_out_scenes(args.scenes, args.seed), args.seed)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
