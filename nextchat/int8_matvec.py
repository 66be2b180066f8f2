"""The CPU's int8 decode kernel: ``int8_matvec.c``, built once with the system C compiler and loaded with ctypes.

A decode step reads every weight of the language model once for a handful of activation rows, so its time is the
time to stream the weights from memory. torch's ``aten._weight_int8pack_mm`` reaches about half of that speed on an
AVX2 machine, and the faster library kernels (fbgemm's dynamically quantized linear, oneDNN's ``_int_mm``) round the
activations to 8 bits, which LLaMA's outlier channels do not survive (see ``benchmarks/NOTES.md``). This kernel keeps
16-bit activations and streams the int8 weight at memory speed.

It is used where it can be: an x86-64 CPU with AVX2, a C compiler (``$CC``, else ``cc``), activations in float32 or
bfloat16 whose width is a multiple of 16. Anywhere else, or with ``NEXTCHAT_INT8_KERNEL=torch``, :func:`matvec`
returns ``None`` and the caller uses torch's kernel. The library is cached under ``$NEXTCHAT_CACHE_DIR`` (default
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

SOURCE = Path(__file__).with_name("int8_matvec.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# Past two rows the kernel's arithmetic, not the weight traffic, bounds it, and torch's int8 kernel is faster.
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
    if os.environ.get("NEXTCHAT_INT8_KERNEL", "").lower() == "torch":
        return "NEXTCHAT_INT8_KERNEL=torch"
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
        log.info("int8 decode kernel: torch's (%s)", reason)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    try:
        target = cache_dir() / f"int8_matvec-{digest}.so"  # RuntimeError: no home directory to cache in
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("int8 decode kernel: torch's (building %s failed: %s)", SOURCE.name, error)
        return None
    function = lib.nextchat_int8_matvec
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    # x, kind, rows, k_len, weight, scale, n_len, out, xq, x_step, threads
    function.argtypes = [pointer, *[integer] * 3, pointer, pointer, integer, *[pointer] * 3, integer]
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
        log.info("int8 decode kernel built: %s", target)
    finally:
        Path(partial).unlink(missing_ok=True)


def matvec(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
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
    if not fits:
        return None
    lib = library()
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
