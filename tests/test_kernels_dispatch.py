"""Tests of posttrain.kernels dispatch: when Triton runs, when torch does, and import-order safety.

Import-order cases run in fresh subprocesses, since Triton's interpreter mode is frozen per
process by the first import of ``triton.language``.
"""

# isort: off
from _triton_interp import DEVICE, TRITON_RUNS, needs_triton, triton_interpret  # noqa: F401  (first)
# isort: on

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posttrain.kernels as K
from posttrain.kernels import dispatch


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_public_api_exported():
    for name in ("sample", "selective_log_softmax", "fused_linear_selective_log_softmax", "triton_available",
                 "SampleOutput"):
        assert hasattr(K, name), name


def test_cpu_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 40)
    assert not K.triton_available(x)
    assert dispatch.resolve_backend("auto", x) == "torch"
    with pytest.raises(RuntimeError, match="backend='triton'"):
        dispatch.resolve_backend("triton", x)
    out = K.sample(x, uniform=torch.rand(3), top_k=5)  # auto -> torch, still works
    assert out.tokens.shape == (3,)


@needs_triton
def test_interpreter_env_enables_triton_on_cpu(monkeypatch):
    x = torch.randn(3, 40)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if DEVICE == "cpu":
        assert K.triton_available(x) and dispatch.resolve_backend("auto", x) == "triton"
        kernel = dispatch.jit(K.sampling._sample_kernel)
        assert type(kernel).__name__ == "InterpretedFunction"
        assert dispatch.jit(K.sampling._sample_kernel) is kernel  # cached per mode
    assert not K.triton_available(torch.empty(2, 2, device="meta"))


def test_triton_missing_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    x = torch.randn(2, 30)
    assert not K.triton_available(x)
    assert K.selective_log_softmax(x, torch.tensor([1, 2])).shape == (2,)


def test_import_without_triton_installed():
    out = _run("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import posttrain.kernels as K
        x = torch.randn(4, 50)
        print(K.triton_available(x), K.sample(x, top_p=0.9).tokens.shape[0],
              K.selective_log_softmax(x, torch.zeros(4, dtype=torch.long)).shape[0])
    """)
    assert out == "False 4 4"


def test_cpu_process_that_never_asks_for_triton_never_imports_it():
    out = _run("""
        import sys, torch
        import posttrain.kernels as K
        K.sample(torch.randn(2, 10), top_k=3)
        print("triton.language" in sys.modules)
    """)
    assert out == "False"


def test_interpreter_after_compiled_import_reports_unavailable():
    # triton.language imported in compiled mode first (e.g. by another library), then the
    # interpreter is requested: Triton cannot run here, so dispatch must say so, not crash.
    out = _run("""
        import os, torch
        import triton.language
        import posttrain.kernels as K
        os.environ["TRITON_INTERPRET"] = "1"
        x = torch.randn(2, 10)
        print(K.triton_available(x), K.sample(x, uniform=torch.rand(2)).tokens.shape[0])
    """)
    assert out == "False 2"


def test_interpreter_set_after_posttrain_import_still_runs_kernels():
    # The case pytest creates: posttrain.kernels imported first, interpreter requested later.
    out = _run("""
        import os, torch
        import posttrain.kernels as K
        os.environ["TRITON_INTERPRET"] = "1"
        x = torch.randn(3, 64)
        u = torch.rand(3)
        a = K.sample(x, uniform=u, top_k=8, backend="triton")
        b = K.sample(x, uniform=u, top_k=8, backend="torch")
        print(K.triton_available(x), bool((a.tokens == b.tokens).all()))
    """)
    assert out == "True True"


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA a compiled-mode triton.language is the right mode: no skip")
def test_require_kernels_fails_a_kernel_test_that_would_silently_skip():
    """`make test` runs pytest with --require-kernels (tests/conftest.py). Here peft is loaded as a
    plugin (-p peft), i.e. before collection, as a test module collected earlier that imports peft or
    trl at its top would: triton.language is frozen in compiled mode, the kernel test's skip must
    then turn into a failure that says why."""
    node = f"{__file__}::test_interpreter_env_enables_triton_on_cpu"
    # PYTHONSAFEPATH: `-p peft` imports peft (and through transformers Hugging Face's `kernels`) before
    # conftest.py can take the clone's root off sys.path, where its own `kernels/` folder would shadow theirs.
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONSAFEPATH": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "peft", node]
    strict = subprocess.run([*command, "--require-kernels"], capture_output=True, text=True, env=env, timeout=300)
    assert strict.returncode != 0 and "--require-kernels:" in strict.stdout and "imports peft or trl" in strict.stdout, \
        strict.stdout[-3000:]
