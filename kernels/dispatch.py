"""Decide per call whether a kernel runs in Triton or in plain torch, and JIT the Triton kernels lazily.

Triton is an optional dependency: nothing here imports it at module import time, so
``import posttrain.kernels`` works on a machine without it, and a CPU-only process that never
asks for the interpreter never imports it at all.

Why everything is lazy: Triton chooses between its compiler and its CPU interpreter by reading
``TRITON_INTERPRET`` when a function is wrapped by ``triton.jit``, and ``triton.language``
wraps its own standard library (``tl.sum``, ``tl.max``, ``tl.cumsum``...) that way when it is
first imported. The mode of the whole process is therefore frozen by whoever imports
``triton.language`` first. We import it only on the first dispatch that wants Triton, wrap our
kernels on first use, cache them per mode, and report Triton unavailable when the frozen mode
and the requested one disagree (instead of crashing inside the launch).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import torch

BACKENDS = ("auto", "triton", "torch")


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True when ``import triton.language`` succeeds (cached; the first call freezes the mode)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def language_interpreted() -> bool | None:
    """Whether the imported ``triton.language`` was built for the interpreter (None: not imported)."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return None
    return type(getattr(lang, "sum", None)).__name__ == "InterpretedFunction"


def triton_available(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device right now.

    True when triton imports and either the tensor is on CUDA, or ``TRITON_INTERPRET=1`` is
    set and the tensor is on the CPU (the interpreter: correct but very slow, for tests).
    False otherwise: a CPU tensor without the interpreter, triton not installed, or
    ``triton.language`` already imported in the other mode (see the module docstring).
    """
    want_interpreter = interpret_mode()
    if tensor.device.type == "cpu":
        if not want_interpreter:
            return False
    elif tensor.device.type != "cuda":
        return False
    if not triton_importable():
        return False
    return language_interpreted() == want_interpreter


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
            f"(TRITON_INTERPRET: {interpret_mode()}, triton.language interpreted: {language_interpreted()})"
        )
    return "triton" if ok else "torch"


_JIT_CACHE: dict[tuple[Callable[..., Any], bool], Any] = {}


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)`` built for the current interpreter mode, cached per (fn, mode)."""
    key = (fn, interpret_mode())
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        import triton
        import triton.language

        # The kernel modules keep `tl = None` so that importing them does not import Triton;
        # the kernel bodies resolve `tl` from their module globals when compiled/interpreted.
        fn.__globals__["tl"] = triton.language
        kernel = triton.jit(fn)
        _JIT_CACHE[key] = kernel
    return kernel
