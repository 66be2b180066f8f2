"""The CPU's decode-step kernels: ``cpu_kernels.c``, built once with the system C compiler and loaded with ctypes.

A decode step reads every weight of the language model and every cached key and value once, for a handful of
activation rows, so its time is the time to stream those bytes from memory. On an AVX2 machine torch's kernels for
these shapes run well below that: ``aten._weight_int8pack_mm`` at about half of it, SDPA and batched products over a
bfloat16 cache at a tenth; the faster library int8 kernels (fbgemm's dynamically quantized linear, oneDNN's
``_int_mm``) round the activations to 8 bits, which LLaMA's outlier channels do not survive (see
``benchmarks/NOTES.md``). Two kernels stream their bytes at about memory speed instead:

- :func:`int8_matvec`: one or two activation rows times an int8 weight, with 16-bit activations;
- :func:`bf16_matvec`: one or two rows times a bfloat16 weight (the language model's head stays 16-bit);
- :func:`single_query_attention`: one query per row over the cache's step window, read in place.

They are used where they can be: an x86-64 CPU with AVX2, a C compiler (``$CC``, else ``cc``), float32 or bfloat16
tensors of the shapes each function names. Anywhere else, or with ``NEXTCHAT_CPU_KERNELS=torch``, the functions
return ``None`` and the caller uses torch. The library is cached under ``$NEXTCHAT_CACHE_DIR`` (default
``$XDG_CACHE_HOME/nextchat-mcp``, else ``~/.cache/nextchat-mcp``), named by a hash of the source and the flags.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch


log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# A decode step's rows. Past two the int8 kernel's arithmetic, not the weight traffic, bounds it, and torch's int8
# kernel is faster.
MAX_ROWS = 2
_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if configured := os.environ.get("NEXTCHAT_CACHE_DIR"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nextchat-mcp"


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or ``None`` when it can (before building it)."""
    if os.environ.get("NEXTCHAT_CPU_KERNELS", "").lower() == "torch":
        return "NEXTCHAT_CPU_KERNELS=torch"
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"{platform.machine()} is not x86-64"
    if torch.backends.cpu.get_cpu_capability() not in {"AVX2", "AVX512"}:
        return "the CPU has no AVX2"
    if not compiler():
        return "no C compiler (set CC)"
    return None


def compiler() -> str | None:
    """The C compiler to build with: ``$CC`` or ``cc`` on the PATH."""
    return shutil.which(os.environ.get("CC") or "cc")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel (built on first call, then from the cache), or ``None`` where it cannot be had."""
    if reason := unavailable_reason():
        log.info("CPU decode kernels: torch's (%s)", reason)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    try:
        target = cache_dir() / f"cpu_kernels-{digest}.so"  # RuntimeError: no home directory to cache in
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("CPU decode kernels: torch's (building %s failed: %s)", SOURCE.name, error)
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    # x, kind, rows, k_len, weight, scale, n_len, out, xq, x_step, threads
    lib.nextchat_int8_matvec.argtypes = [pointer, *[integer] * 3, pointer, pointer, integer, *[pointer] * 3, integer]
    # q, k, v, kind, k_strides, v_strides, mask, mask_row, rows, heads, kv_heads, positions, head_dim, scale, out,
    # scores, threads
    lib.nextchat_single_query_attention.argtypes = [
        *[pointer] * 3, integer, pointer, pointer, pointer, ctypes.c_long, *[integer] * 5, ctypes.c_float,
        pointer, pointer, integer,
    ]  # fmt: skip
    # x, rows, k_len, weight, n_len, out, threads
    lib.nextchat_bf16_matvec.argtypes = [pointer, integer, integer, pointer, integer, pointer, integer]
    for function in (lib.nextchat_int8_matvec, lib.nextchat_bf16_matvec, lib.nextchat_single_query_attention):
        function.restype = integer
    return lib


def _build(target: Path) -> None:
    """Compile to a temporary file beside ``target`` and move it into place (two processes may build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run(
            [str(compiler()), *FLAGS, str(SOURCE), "-o", partial, "-lm"],
            check=True,
            capture_output=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        os.replace(partial, target)
        log.info("CPU decode kernels built: %s", target)
    finally:
        Path(partial).unlink(missing_ok=True)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would want a graph through these (the kernels make none: torch runs instead)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def int8_matvec(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``x @ (qweight * scale[:, None]).T`` with the kernel, or ``None`` when it cannot take these inputs.

    Args:
        x: ``[rows, in]`` float32 or bfloat16 on the CPU, ``rows`` ≤ :data:`MAX_ROWS`, ``in`` a multiple of 16.
        qweight: ``[out, in]`` int8, contiguous.
        scale: ``[out]`` in ``x``'s dtype.

    Returns:
        ``[rows, out]`` in ``x``'s dtype; ``None`` also when ``x`` holds a NaN or an infinity.
    """
    kind = _KINDS.get(x.dtype)
    rows, width = x.shape
    fits = (
        kind is not None
        and not _needs_grad(x, scale)
        and x.device.type == "cpu"
        and 0 < rows <= MAX_ROWS
        and width % 16 == 0
        and qweight.dtype == torch.int8
        and qweight.is_contiguous()
        and qweight.shape[1] == width
        and scale.dtype == x.dtype
        and scale.is_contiguous()
        and scale.shape == (qweight.shape[0],)
    )
    lib = library() if fits else None
    if lib is None:
        return None
    x = x.contiguous()
    out = torch.empty(rows, qweight.shape[0], dtype=x.dtype)
    scratch = torch.empty(rows, width, dtype=torch.int16)
    steps = torch.empty(rows, dtype=torch.float32)
    status = lib.nextchat_int8_matvec(
        x.data_ptr(), kind, rows, width, qweight.data_ptr(), scale.data_ptr(), qweight.shape[0],
        out.data_ptr(), scratch.data_ptr(), steps.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None


def bf16_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` in float32 with the kernel, or ``None`` when it cannot take these inputs.

    Args:
        x: ``[rows, in]`` on the CPU (widened to float32), ``rows`` ≤ :data:`MAX_ROWS`, ``in`` a multiple of 8.
        weight: ``[out, in]`` bfloat16, contiguous.

    Returns:
        ``[rows, out]`` float32.
    """
    rows, width = x.shape
    fits = (
        not _needs_grad(x, weight)
        and x.device.type == weight.device.type == "cpu"
        and 0 < rows <= MAX_ROWS
        and width % 8 == 0
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and weight.shape[1] == width
    )
    lib = library() if fits else None
    if lib is None:
        return None
    x = x.float().contiguous()
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    status = lib.nextchat_bf16_matvec(
        x.data_ptr(), rows, width, weight.data_ptr(), weight.shape[0], out.data_ptr(), torch.get_num_threads()
    )
    return out if status == 0 else None


def single_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor | None:
    """Attention of one query per row, or ``None`` when the kernel cannot take these inputs.

    Args:
        query: ``[B, heads, 1, D]``, float32 or bfloat16 on the CPU; ``D`` a multiple of 8, at most 256.
        key, value: ``[B, kv_heads, L, D]`` of ``query``'s dtype, last dimension contiguous (any other strides).
        mask: ``[B, 1, 1, L]`` bool (True attends) with its last dimension contiguous, or ``None``.
        scale: multiplies the scores (``D ** -0.5`` in LLaMA).

    Returns:
        ``[B, 1, heads, D]`` in ``query``'s dtype (transformers' attention output layout).
    """
    kind = _KINDS.get(query.dtype)
    batch, heads, queries, head_dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    mask_fits = mask is None or (
        mask.dtype == torch.bool and mask.shape == (batch, 1, 1, positions) and mask.stride(-1) == 1
    )
    fits = (
        kind is not None
        and mask_fits
        and not _needs_grad(query, key, value)
        and query.device.type == "cpu"
        and queries == 1
        and head_dim % 8 == 0
        and head_dim <= 256
        and key.dtype == value.dtype == query.dtype
        and key.shape == value.shape == (batch, kv_heads, positions, head_dim)
        and heads % kv_heads == 0
        and key.stride(-1) == value.stride(-1) == 1
    )
    lib = library() if fits else None
    if lib is None:
        return None
    q = query.reshape(batch, heads, head_dim).float().contiguous()
    out = torch.empty(batch, heads, head_dim, dtype=torch.float32)
    scores = torch.empty(batch, heads, positions, dtype=torch.float32)
    k_strides = (ctypes.c_long * 3)(*key.stride()[:3])
    v_strides = (ctypes.c_long * 3)(*value.stride()[:3])
    mask_pointer, mask_row = (None, 0) if mask is None else (mask.data_ptr(), mask.stride(0))
    status = lib.nextchat_single_query_attention(
        q.data_ptr(), key.data_ptr(), value.data_ptr(), kind, k_strides, v_strides, mask_pointer, mask_row,
        batch, heads, kv_heads, positions, head_dim, scale, out.data_ptr(), scores.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        return None
    return out.to(query.dtype).reshape(batch, 1, heads, head_dim)
