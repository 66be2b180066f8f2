"""Build the model without initialising its weights, then fill it from the checkpoint one shard at a time.

Initialising 7.7 B random parameters that the checkpoint then overwrites took 172 s of a 235 s load, and copying a
whole state dict into a built model holds the model twice. Here:

- :func:`build_empty` constructs the modules with every parameter on ``meta`` (no memory, no random numbers) while
  buffers are computed as usual: the ones no checkpoint holds (LLaMA's rotary ``inv_freq``, CLIP's position ids,
  SAM's pixel mean and std, a grid tower's position table) come out exactly as a normal build makes them.
- :func:`fill` walks the shards in order. Each tensor is cast to its part's dtype as it is copied out of the
  shard's mapped pages, straight onto the target device, and becomes the parameter; an LLM linear's weight
  becomes its quantized layer instead (:mod:`nextchat.quantization`), so the 16-bit LLM is never held whole.
  When a shard is done its mapping is dropped and its pages are handed back to the kernel (``POSIX_FADV_DONTNEED``).
  Peak memory is about the model plus one tensor in flight.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nextchat.devices import Precision
from nextchat.quantization import QUANTIZED_LINEAR, quantized_linear


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to ``meta`` as it is registered; buffers are not.

    Initialisers (``reset_parameters``, transformers' ``post_init``) then run on meta tensors, which costs nothing.
    """
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def release_pages(file: Path) -> None:
    """Tell the kernel the file's cached pages are not needed any more (a no-op where fadvise does not exist)."""
    if not hasattr(os, "posix_fadvise"):
        return
    gc.collect()  # the shard's mapping goes with its last tensor; mapped pages cannot be dropped
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# Tensors to place, and what to call once they are all placed (release a shard's pages).
Source = tuple[Iterable[tuple[str, torch.Tensor]], Callable[[], None]]


@dataclass
class Target:
    """Where the weights go: the device, the quantization mode and each part's dtype."""

    device: torch.device
    precision: Precision
    quantize: str = "none"


def fill(
    model: nn.Module,
    sources: Iterable[Source],
    target: Target,
    accept: Callable[[str], bool],
) -> None:
    """Put each accepted tensor of each source into ``model`` (built by :func:`build_empty`), then release it.

    Args:
        sources: pairs of (key, tensor) iterable and what to call once it is exhausted (release a shard's pages).
        accept: whether a key belongs to the model (ignored and unexpected keys are skipped).
    """
    with torch.no_grad():
        for tensors, done in sources:
            for key, tensor in tensors:
                if accept(key):
                    place(model, key, tensor, target)
                del tensor
            done()
    _materialise_missing(model, target.device)
    model.to(target.device)  # buffers were computed on the CPU; parameters are already there


def place(model: nn.Module, key: str, tensor: torch.Tensor, target: Target) -> None:
    """One checkpoint tensor into ``model`` at ``key``, cast to the dtype the (meta) slot was built with."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if target.quantize != "none" and attr == "weight" and QUANTIZED_LINEAR.match(owner_name):
        parent_name, _, child = owner_name.rpartition(".")
        layer = quantized_linear(tensor, target.quantize, target.device, target.precision.llm)
        setattr(model.get_submodule(parent_name), child, layer)
        return
    if attr in owner._parameters:
        slot = owner._parameters[attr]
        assert slot is not None
        value = tensor.to(device=target.device, dtype=slot.dtype, copy=True)
        owner._parameters[attr] = nn.Parameter(value, requires_grad=slot.requires_grad)
    else:
        slot = owner._buffers[attr]
        assert slot is not None
        owner._buffers[attr] = tensor.to(device=target.device, dtype=slot.dtype, copy=True)


def _materialise_missing(model: nn.Module, device: torch.device) -> None:
    """Zeros for parameters no source held (only a non-strict load gets here with any)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.device.type == "meta":
                zeros = torch.zeros(param.shape, dtype=param.dtype, device=device)
                module._parameters[name] = nn.Parameter(zeros, requires_grad=param.requires_grad)
