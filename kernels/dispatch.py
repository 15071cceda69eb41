"""Decide per call whether a kernel runs in Triton or in plain torch, and JIT the Triton kernels lazily.

Triton is an optional dependency: nothing here imports it at module import time, so
``import posttrain.kernels`` works on a machine without it.

The kernels are written as plain functions and wrapped with ``triton.jit`` on first use
(:func:`jit`), cached per interpreter mode. Triton decides between the compiled JIT and the
CPU interpreter when ``triton.jit`` runs, by reading ``TRITON_INTERPRET``; wrapping at
import time would freeze whatever the environment was when the first module imported us
(pytest imports every test module before running any), so a test module that turns the
interpreter on after another one imported ``posttrain.kernels`` would get kernels that
cannot launch on CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

BACKENDS = ("auto", "triton", "torch")


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True when ``import triton`` succeeds (cached: the answer cannot change in a process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def triton_available(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device right now.

    True when triton imports and either the tensor is on CUDA, or ``TRITON_INTERPRET=1`` is
    set and the tensor is on the CPU (the interpreter: correct but very slow, for tests).
    False otherwise, e.g. a CPU tensor without the interpreter, or triton not installed.
    """
    if not triton_importable():
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpret_mode()


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch") to the one that runs: "triton" or "torch".

    "auto" picks Triton where :func:`triton_available` says it can run and torch otherwise;
    "triton" raises RuntimeError where it cannot run rather than silently falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    ok = triton_available(tensor)
    if backend == "triton" and not ok:
        raise RuntimeError(
            f"backend='triton' but Triton cannot run on device {tensor.device} "
            f"(triton importable: {triton_importable()}, TRITON_INTERPRET: {interpret_mode()})"
        )
    return "triton" if ok else "torch"


_JIT_CACHE: dict[tuple[Callable[..., Any], bool], Any] = {}


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)`` built for the current interpreter mode, cached per (fn, mode)."""
    key = (fn, interpret_mode())
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        import triton

        kernel = triton.jit(fn)
        _JIT_CACHE[key] = kernel
    return kernel
