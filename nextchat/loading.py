"""Load and save NExT-Chat checkpoints in the official layout.

A checkpoint directory holds ``config.json`` (``model_type: nextchat``), the weights as ``pytorch_model.bin``,
sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json`` (the published 7B), or safetensors (single or
sharded, what :func:`save_pretrained` writes), and the tokenizer files. State-dict keys are the official names,
which are this package's attribute names; the keys some checkpoint eras add are data in :data:`IGNORED_KEYS`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaModel

from nextchat.configuration import OFFICIAL_CLIP_TOWER, NextChatConfig, SamConfig
from nextchat.devices import Precision, plan_precision, resolve_device, slow_device_warning
from nextchat.devices import resolve_dtype as resolve_dtype  # re-exported: callers resolve dtypes here too
from nextchat.modeling_nextchat import NextChatModel
from nextchat.quantization import check_mode
from nextchat.streaming import Source, Target, fill, parameters_on_meta, release_pages
from nextchat.tokenization import NextChatTokenizer


# Keys a checkpoint may carry that hold no learned state here: transformers 4.31 saved LLaMA's rotary inv_freq
# (recomputed from the config now) and some CLIP versions saved their position-id buffer.
log = logging.getLogger(__name__)

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
# Building


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    config: NextChatConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    precision: Precision | None = None,
) -> NextChatModel:
    """Construct a model directly on ``device`` in ``dtype`` (``meta`` builds shapes without memory).

    ``precision`` gives each part its own dtype instead (see :mod:`nextchat.devices`). SAM's prompt encoder is
    kept in float32 (see :class:`~nextchat.modeling_nextchat.SamHead`).
    """
    precision = precision or Precision.uniform(dtype)
    with torch.device(device), _default_dtype(precision.llm):
        model = NextChatModel(config)
    return apply_precision(model, precision).eval()


def build_empty(config: NextChatConfig, precision: Precision) -> NextChatModel:
    """The model with its parameters on ``meta`` (no memory, no initialisation) and its buffers computed on the
    CPU as a normal build computes them; :func:`nextchat.streaming.fill` gives the parameters their values."""
    with parameters_on_meta(), _default_dtype(precision.llm):
        model = NextChatModel(config)
    return apply_precision(model, precision).eval()


def llm_parameter_count(config: NextChatConfig) -> int:
    """Parameters of the language model alone (layers, embeddings, norm, lm_head), counted on ``meta``."""
    with torch.device("meta"):
        llm = LlamaModel(LlamaConfig(**config.text))
    return sum(p.numel() for p in llm.parameters()) + config.vocab_size * config.hidden_size


def apply_precision(model: NextChatModel, precision: Precision) -> NextChatModel:
    """Cast the parts whose dtype differs from the LLM's (a no-op for a uniform precision)."""
    parts = {
        precision.vision: (model.model.vision_tower, model.model.mm_projector),
        precision.heads: (model.loc_encoder, model.loc_decoder, model.seg_prompt_mlp),
        precision.sam: (model.sam,),
    }
    for dtype, modules in parts.items():
        if dtype != precision.llm:
            for module in modules:
                module.to(dtype)
    model.sam.model.prompt_encoder.float()
    return model


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


def _load_pickle(file: Path, map_location: str) -> dict[str, torch.Tensor]:
    try:
        part = torch.load(file, map_location=map_location, weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"{file.name} is not a plain tensor checkpoint: {error}") from error
    return part.get("state_dict", part) if isinstance(part, dict) else {}


def tensors_of(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file in file order: safetensors, or a pickle read memory-mapped through
    ``weights_only`` (no code runs). Each is handed out once and not kept: the mapping goes with the last one."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, f.get_tensor(key)
        return
    state = _load_pickle(file, "cpu")
    while state:
        key = next(iter(state))
        yield key, state.pop(key)


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Tensors from safetensors or pickle shards (see :func:`tensors_of`)."""
    return {key: tensor for file in files for key, tensor in tensors_of(file)}


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key → shape without materialising the tensors (for reading sizes off the weights)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_pickle(file, "meta").items()})
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
    quantize: str = "none",
    sam_checkpoint: str | Path | None = None,
    sam: SamConfig | None = None,
    strict: bool = True,
) -> tuple[NextChatModel, NextChatTokenizer, LoadReport]:
    """Load a NExT-Chat checkpoint, shard by shard, without initialising the model first.

    Args:
        path_or_id: a checkpoint directory, ``"demo"`` (the embedded shapes-world model) or a hub id such as
            ``AoZhang/nextchat-7b-336``.
        device: ``auto`` (cuda, then mps, then cpu) or a torch device.
        dtype: ``auto`` or a dtype name. ``auto`` is bfloat16 on CUDA, float16 on MPS; on a CPU see
            :func:`nextchat.devices.plan_precision` (16-bit for a 7B-sized LLM, float32 for small models and, without
            bfloat16 instructions, for the vision tower, SAM and heads).
        quantize: ``none``, ``int8`` (CPU or CUDA) or ``nf4`` (CUDA): the LLM's layer linears only.
        sam_checkpoint: ``sam_vit_h_4b8939.pth`` for checkpoints that carry no ``sam.model.*`` weights.
        sam: SAM sizes, when neither the config nor the weights give them.
        strict: raise :class:`CheckpointError` on any missing or unexpected key (before any weight is read).

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
    model, report = load_weights(
        directory, config, device, dtype, quantize=quantize, sam_checkpoint=sam_checkpoint, strict=strict
    )
    return model, tokenizer, report


def load_weights(
    directory: Path,
    config: NextChatConfig,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    quantize: str = "none",
    sam_checkpoint: str | Path | None = None,
    strict: bool = True,
) -> tuple[NextChatModel, LoadReport]:
    """The model of ``config`` filled from ``directory``'s weight files (see :func:`load_model`; no tokenizer)."""
    torch_device = resolve_device(device)
    check_mode(quantize, torch_device)
    llm_parameters = llm_parameter_count(config)
    if (warning := slow_device_warning(torch_device, llm_parameters)) is not None:
        log.warning(warning)
    precision = plan_precision(dtype, torch_device, llm_parameters)
    model = build_empty(config, precision)

    report = LoadReport(sources={"checkpoint": str(directory)})
    files = _weight_files(directory)
    shapes = {k: v for k, v in read_shapes(files).items() if not _ignored(k, report)}
    sources: list[Source] = [(tensors_of(f), partial(release_pages, f)) for f in files]
    if not any(k.startswith(CLIP_PREFIX) for k in shapes):
        clip_state, report.sources["vision_tower"] = _vision_tower_weights(config)
        shapes.update({k: tuple(v.shape) for k, v in clip_state.items()})
        sources.append((clip_state.items(), clip_state.clear))
    if not any(k.startswith(SAM_PREFIX) for k in shapes) and sam_checkpoint is not None:
        sam_state = _sam_weights(sam_checkpoint)
        shapes.update({k: tuple(v.shape) for k, v in sam_state.items()})
        sources.append((sam_state.items(), sam_state.clear))
        report.sources["sam"] = str(sam_checkpoint)

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(directory, shapes, expected, report, strict)
    fill(model, sources, Target(torch_device, precision, quantize), accept=expected.__contains__)
    return model, report


def _ignored(key: str, report: LoadReport) -> bool:
    if any(p.search(key) for p in IGNORED_KEYS):
        report.ignored.append(key)
        return True
    return False


def _check_keys(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    report: LoadReport,
    strict: bool,
) -> None:
    """Fill the report's missing and unexpected keys; refuse (strict) before any weight is read, and refuse a
    shape that differs from the model's in any case."""
    report.unexpected = sorted(k for k in shapes if k not in expected)
    report.missing = sorted(k for k in expected if k not in shapes)
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
    for key, shape in shapes.items():
        if key in expected and expected[key] != shape:
            raise CheckpointError(f"{key}: checkpoint shape {shape} != model {expected[key]}")


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
    write_config_files(model.config, tokenizer, directory, dtype or model.dtype)
    return directory


def write_config_files(
    config: NextChatConfig, tokenizer: NextChatTokenizer, directory: Path, dtype: torch.dtype
) -> None:
    """config.json (official layout), generation_config.json and the tokenizer files of a checkpoint directory."""
    raw = config.to_checkpoint_dict()
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    generation: Mapping[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(directory)
