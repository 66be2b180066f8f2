"""Load and save NExT-Chat checkpoints in the official layout.

A checkpoint directory holds ``config.json`` (``model_type: nextchat``), the weights as ``pytorch_model.bin``,
sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json`` (the published 7B), or safetensors (single or
sharded, what :func:`save_pretrained` writes), and the tokenizer files. State-dict keys are the official names,
which are this package's attribute names; the keys some checkpoint eras add are data in :data:`IGNORED_KEYS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextchat.configuration import OFFICIAL_CLIP_TOWER, NextChatConfig, SamConfig
from nextchat.modeling_nextchat import NextChatModel
from nextchat.tokenization import NextChatTokenizer


# Keys a checkpoint may carry that hold no learned state here: transformers 4.31 saved LLaMA's rotary inv_freq
# (recomputed from the config now) and some CLIP versions saved their position-id buffer.
IGNORED_KEYS = (
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r"^model\.vision_tower\.vision_model\.embeddings\.position_ids$"),
)

CLIP_PREFIX = "model.vision_tower."
SAM_PREFIX = "sam.model."
DEMO_NAME = "demo"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or matched to the model; the message says what to change."""


@dataclass
class LoadReport:
    """What loading did with the checkpoint's keys."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # part → where its weights came from

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


# ----------------------------------------------------------------------------------------------------------------
# Devices and dtypes


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    config: NextChatConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> NextChatModel:
    """Construct a model directly on ``device`` in ``dtype`` (``meta`` builds shapes without memory).

    SAM's prompt encoder is kept in float32 (see :class:`~nextchat.modeling_nextchat.SamHead`).
    """
    with torch.device(device), _default_dtype(dtype):
        model = NextChatModel(config)
    model.sam.model.prompt_encoder.float()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Finding and reading checkpoints


def demo_checkpoint_dir() -> Path:
    """Where the embedded demo checkpoint lives inside the installed package."""
    return Path(__file__).parent / "demo" / "checkpoint"


def resolve_checkpoint_dir(path_or_id: str | Path) -> Path:
    """A local directory, ``demo``, or a Hugging Face hub id (from the local cache first, then the hub)."""
    if str(path_or_id) == DEMO_NAME:
        path = demo_checkpoint_dir()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"the demo checkpoint is not installed at {path}")
        return path
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; point at a NExT-Chat checkpoint directory")
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(f"{path_or_id} is neither a checkpoint directory nor a hub id like 'owner/name'")
    return _download(str(path_or_id))


def _download(repo_id: str, patterns: tuple[str, ...] = ("*.json", "*.model", "*.safetensors", "*.bin")) -> Path:
    from huggingface_hub import snapshot_download  # only hub ids need it

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as error:
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(error).__name__}); when offline, download "
            "it elsewhere and pass the local directory instead"
        ) from error


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(f"{directory} holds no weights (model.safetensors or pytorch_model*.bin)")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Tensors from safetensors or pickle shards. Pickles only through ``weights_only`` (no code runs), mmap'd."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    state[key] = f.get_tensor(key)
        else:
            try:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:
                raise CheckpointError(f"{file.name} is not a plain tensor checkpoint: {error}") from error
            state.update(part.get("state_dict", part) if isinstance(part, dict) else {})
    return state


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key → shape without materialising the tensors (for reading sizes off the weights)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            part = torch.load(file, map_location="meta", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in part.items()})
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# load_model


def load_config(directory: Path, sam: SamConfig | None = None) -> NextChatConfig:
    """The model config of a checkpoint directory, filling in what the official ``config.json`` lacks.

    The vision tower's config comes from the file's own ``nextchat`` block, else from ``mm_vision_tower`` when
    that is a local directory (relative paths are relative to the checkpoint), else CLIP ViT-L/14-336. SAM's sizes
    come from the block, else from ``sam``, else they are read off the weights' shapes.
    """
    raw = json.loads((directory / "config.json").read_text())
    vision = None
    tower = raw.get("mm_vision_tower")
    if tower and "nextchat" not in raw:
        tower_dir = (directory / tower).resolve()
        if (tower_dir / "config.json").is_file():
            vision = json.loads((tower_dir / "config.json").read_text())
            vision["_name_or_path"] = str(tower_dir)
    if sam is None and "sam_config" not in (raw.get("nextchat") or {}):
        shapes = read_shapes(_weight_files(directory))
        if any(k.startswith(SAM_PREFIX) for k in shapes):
            sam = SamConfig.from_state_dict_shapes(shapes)
    return NextChatConfig.from_checkpoint_dict(raw, vision=vision, sam=sam, name=directory.name)


def _vision_tower_weights(config: NextChatConfig) -> tuple[dict[str, torch.Tensor], str]:
    source = str(config.vision.get("_name_or_path") or OFFICIAL_CLIP_TOWER)
    directory = Path(source) if Path(source).is_dir() else _download(source)
    state = read_state_dict(_weight_files(directory))
    # A standalone CLIPVisionModel checkpoint names keys vision_model.*; ours sit under model.vision_tower.
    return {CLIP_PREFIX + k: v for k, v in state.items() if k.startswith("vision_model.")}, source


def _sam_weights(sam_checkpoint: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(sam_checkpoint), map_location="cpu", weights_only=True, mmap=True)
    return {SAM_PREFIX + k: v for k, v in state.items()}


def load_model(
    path_or_id: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    sam_checkpoint: str | Path | None = None,
    sam: SamConfig | None = None,
    strict: bool = True,
) -> tuple[NextChatModel, NextChatTokenizer, LoadReport]:
    """Load a NExT-Chat checkpoint.

    Args:
        path_or_id: a checkpoint directory, ``"demo"`` (the embedded shapes-world model) or a hub id such as
            ``AoZhang/nextchat-7b-336``.
        device: ``auto`` (cuda, then mps, then cpu) or a torch device.
        dtype: ``auto`` (bfloat16 on CUDA, float32 elsewhere) or a dtype name.
        sam_checkpoint: ``sam_vit_h_4b8939.pth`` for checkpoints that carry no ``sam.model.*`` weights.
        sam: SAM sizes, when neither the config nor the weights give them.
        strict: raise :class:`CheckpointError` on any missing or unexpected key.

    Returns:
        The model (eval mode), its tokenizer and the report of what was loaded from where.
    """
    directory = resolve_checkpoint_dir(path_or_id)
    config = load_config(directory, sam=sam)
    tokenizer = NextChatTokenizer.from_pretrained(directory)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {config.vocab_size}"
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model = build_model(config, torch_device, torch_dtype)

    report = LoadReport(sources={"checkpoint": str(directory)})
    state: dict[str, torch.Tensor] = {}
    for key, tensor in read_state_dict(_weight_files(directory)).items():
        if any(p.search(key) for p in IGNORED_KEYS):
            report.ignored.append(key)
        else:
            state[key] = tensor
    if not any(k.startswith(CLIP_PREFIX) for k in state):
        clip_state, report.sources["vision_tower"] = _vision_tower_weights(config)
        state.update(clip_state)
    if not any(k.startswith(SAM_PREFIX) for k in state) and sam_checkpoint is not None:
        state.update(_sam_weights(sam_checkpoint))
        report.sources["sam"] = str(sam_checkpoint)

    expected = model.state_dict()
    report.unexpected = sorted(k for k in state if k not in expected)
    report.missing = sorted(k for k in expected if k not in state)
    if strict and not report.ok:
        hint = (
            " (pass sam_checkpoint=sam_vit_h_4b8939.pth)"
            if any(k.startswith(SAM_PREFIX) for k in report.missing)
            else ""
        )
        raise CheckpointError(
            f"{directory}: {len(report.missing)} missing keys {report.missing[:5]}, "
            f"{len(report.unexpected)} unexpected keys {report.unexpected[:5]}{hint}"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            if key in expected:
                target = expected[key]
                if target.shape != tensor.shape:
                    raise CheckpointError(
                        f"{key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}"
                    )
                target.copy_(tensor)
    return model, tokenizer, report


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained


def save_pretrained(
    model: NextChatModel,
    tokenizer: NextChatTokenizer,
    directory: str | Path,
    *,
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint in the official layout: config.json, generation_config.json, tokenizer files and weights.

    Args:
        safe_serialization: safetensors (default) or a pickle ``pytorch_model.bin``.
        dtype: cast floating weights (e.g. ``torch.float16`` to halve the size); float32 buffers that need the
            precision (SAM's positional-encoding matrix) are cast too, since they round-trip through the model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.clone()
    if safe_serialization:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, directory / "pytorch_model.bin")
    config = model.config.to_checkpoint_dict()
    config["torch_dtype"] = str(dtype or model.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation: Mapping[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(directory)
    return directory
