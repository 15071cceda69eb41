"""Run the kernel tests on Triton's CPU interpreter (no GPU) without leaking it to other tests.

Import this at the very top of a kernel test module, before ``posttrain.kernels``/``trl``:

* without CUDA it sets ``TRITON_INTERPRET=1`` just long enough to import ``triton.language``,
  whose standard library (``tl.sum``, ``tl.cumsum``...) is frozen in interpreter mode by its
  first import, then restores the environment; the module-scoped autouse fixture
  :func:`triton_interpret` turns the variable on again only while that module's tests run
  (the kernels read it at call time), so other test modules keep dispatching CPU tensors to
  torch, never to the slow interpreter;
* with CUDA it does nothing: the same tests then run the compiled kernels on ``DEVICE``.

``TRITON_RUNS`` is False when the kernels cannot run here (triton missing, or something
imported ``triton.language`` in compiled mode before this module on a CPU-only machine);
tests that need the Triton backend skip with that reason instead of failing for the wrong one.
"""

import importlib.util
import os

import pytest
import torch

_KEY = "TRITON_INTERPRET"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_USE_INTERPRETER = not HAS_CUDA


def _freeze_language_in_interpreter_mode() -> None:
    if importlib.util.find_spec("triton") is None:
        return
    prev = os.environ.get(_KEY)
    os.environ[_KEY] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if prev is None:
            os.environ.pop(_KEY, None)
        else:
            os.environ[_KEY] = prev


if _USE_INTERPRETER:
    _freeze_language_in_interpreter_mode()

from posttrain.kernels.dispatch import language_interpreted, triton_importable  # noqa: E402

TRITON_RUNS = triton_importable() and language_interpreted() == _USE_INTERPRETER
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="Triton kernels cannot run here: triton missing, or triton.language was imported in "
    "compiled mode before the kernel tests on a machine without CUDA",
)


@pytest.fixture(scope="module", autouse=True)
def triton_interpret():
    if not _USE_INTERPRETER:
        yield
        return
    prev = os.environ.get(_KEY)
    os.environ[_KEY] = "1"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop(_KEY, None)
        else:
            os.environ[_KEY] = prev
