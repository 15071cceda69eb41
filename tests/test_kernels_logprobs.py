"""Tests of selective_log_softmax and fused_linear_selective_log_softmax: forward and gradients.

Compared with torch autograd through ``log_softmax + gather`` and with TRL's
``selective_log_softmax`` on the same inputs. Without CUDA the Triton kernels run on the CPU
interpreter for this module only (``_triton_interp`` is imported first on purpose).
"""

# isort: off
from _triton_interp import DEVICE, needs_triton, triton_interpret  # noqa: F401  (first: sets up Triton's mode)
# isort: on

import pytest
import torch
from tolerances import assert_within, log_softmax_bounds
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

from posttrain.kernels import (
    fused_linear_selective_log_softmax,
    fused_linear_selective_log_softmax_reference,
    selective_log_softmax,
    selective_log_softmax_reference,
)

BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)
    idx = torch.randint(0, shape[-1], shape[:-1], generator=g).to(DEVICE)
    grad = torch.randn(shape[:-1], generator=g).to(DEVICE)
    return x, idx, grad


def _check_against_float64(x, idx, g, temperature, out, grad, what):
    """`out` and `grad` (computed from x in float32, grad returned in x's dtype) lie within the rounding
    bounds of tests/tolerances.py around the float64 truth. Bounds, not a fixed 1e-6: another CPU sums
    in another order (a fixed 1e-6 failed on an AMD EPYC by 4.05e-6 on a gradient of size 2.2)."""
    V = x.shape[-1]
    y64, grad64, y_tol, grad_tol = log_softmax_bounds(x.reshape(-1, V).cpu(), idx.reshape(-1).cpu(), temperature,
                                                      g.reshape(-1).cpu(), x.dtype)
    assert_within(out.reshape(-1).cpu(), y64, y_tol, f"{what} forward")
    assert_within(grad.reshape(-1, V).cpu(), grad64, grad_tol, f"{what} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, temperature", [((7, 1000), 1.0), ((5, 4097), 0.7), ((2, 3, 513), 1.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_grad_match_autograd_and_trl(backend, shape, temperature, dtype):
    """Ours, torch autograd through log_softmax + gather, and TRL's selective_log_softmax (on the fp32
    upcast: its bf16 path rounds its output to bf16, which says nothing about ours) each lie within
    float32 rounding of the float64 truth; the reference checks that the bound is not too tight."""
    x, idx, g = _inputs(shape, dtype, seed=shape[-1])
    xa = x.clone().requires_grad_()
    out = selective_log_softmax(xa, idx, temperature, backend=backend)
    assert out.dtype == torch.float32 and out.shape == idx.shape
    (ga,) = torch.autograd.grad(out, xa, g)
    assert ga.dtype == dtype and ga.shape == x.shape
    _check_against_float64(x, idx, g, temperature, out, ga, backend)
    xr = x.clone().requires_grad_()
    ref = selective_log_softmax_reference(xr, idx, temperature)
    (gr,) = torch.autograd.grad(ref, xr, g)
    _check_against_float64(x, idx, g, temperature, ref, gr, "autograd reference")
    xt = x.float().clone().requires_grad_()
    trl = trl_selective_log_softmax(xt, idx, temperature=temperature)
    (gt,) = torch.autograd.grad(trl, xt, g)
    _check_against_float64(x, idx, g, temperature, trl.float(), gt.to(dtype), "TRL")


def test_float64_bound_catches_a_real_error():
    """The bound is tight enough to see a one-in-a-thousand relative error in one gradient element."""
    x, idx, g = _inputs((3, 257), torch.float32, seed=4)
    xa = x.clone().requires_grad_()
    out = selective_log_softmax(xa, idx, 0.9, backend="torch")
    (ga,) = torch.autograd.grad(out, xa, g)
    wrong = ga.clone()
    wrong[1, idx[1]] *= 1.001
    with pytest.raises(AssertionError, match="gradient"):
        _check_against_float64(x, idx, g, 0.9, out, wrong, "perturbed")


@needs_triton
def test_non_contiguous_and_neg_inf():
    x, idx, g = _inputs((6, 2 * 700), torch.float32, seed=1)
    x[:, 5] = float("-inf")  # outside the strided view: must never be read
    x[:, 4] = float("-inf")  # a banned id inside it (view column 2): no probability, no gradient
    x = x[:, ::2]  # (6, 700) view with column stride 2
    assert not x.is_contiguous()
    for view in (x, x.t().contiguous().t()):
        v = view.detach().requires_grad_()
        out = selective_log_softmax(v, idx % 700, backend="triton")
        (ga,) = torch.autograd.grad(out, v, g)
        assert bool((ga[:, 2] == 0).all())  # the banned id: exactly no gradient
        _check_against_float64(view, idx % 700, g, 1.0, out, ga, "non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias, chunk", [(True, 3), (False, 1), (True, None)])
def test_fused_linear_matches_naive(backend, bias, chunk):
    g = torch.Generator().manual_seed(2)
    R, D, V = 10, 24, 301
    h = torch.randn(R, D, generator=g).to(DEVICE)
    w = (torch.randn(V, D, generator=g) * 0.3).to(DEVICE)
    b = torch.randn(V, generator=g).to(DEVICE) if bias else None
    idx = torch.randint(0, V, (R,), generator=g).to(DEVICE)
    gout = torch.randn(R, generator=g).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    out = fused_linear_selective_log_softmax(
        leaves[0], leaves[1], leaves[2] if bias else None, idx, 0.8, chunk_size=chunk, backend=backend
    )
    grads = torch.autograd.grad(out, leaves, gout)
    ref_leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    ref = fused_linear_selective_log_softmax_reference(
        ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, idx, 0.8
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@needs_triton
def test_fused_linear_bf16_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 4, 16, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(130, 16, generator=g) * 0.3).to(DEVICE, torch.bfloat16)
    idx = torch.randint(0, 130, (2, 4), generator=g).to(DEVICE)
    ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_selective_log_softmax(ha, wa, None, idx, chunk_size=3, backend="triton")
    assert out.shape == (2, 4) and out.dtype == torch.float32
    out.sum().backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = fused_linear_selective_log_softmax_reference(hr, wr, None, idx)
    ref.sum().backward()
    # Both paths form bf16 logits with the same matmul, so the forward agrees to fp32 rounding;
    # gradients pass through bf16 matmuls in different groupings (chunks): a few bf16 ulps.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ha.grad.dtype == torch.bfloat16 and wa.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ha.grad.float(), hr.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(wa.grad.float(), wr.grad.float(), rtol=2e-2, atol=2e-2)


def test_only_requested_grads_are_computed():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen head
    out = fused_linear_selective_log_softmax(h, w, None, torch.tensor([0, 1, 2, 19]), backend="torch")
    out.sum().backward()
    assert h.grad is not None and w.grad is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: selective_log_softmax(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), 0.0), "temperature"),
        (lambda: selective_log_softmax(torch.randn(3, 5), torch.zeros(4, dtype=torch.long)), r"\(3,\)"),
        (lambda: selective_log_softmax(torch.randn(3, 5), torch.zeros(3)), "integer"),
        (lambda: selective_log_softmax(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), backend="x"), "backend"),
        (lambda: fused_linear_selective_log_softmax(torch.randn(3, 4), torch.randn(5, 6), None,
                                                    torch.zeros(3, dtype=torch.long)), r"\(5, 6\)"),
        (lambda: fused_linear_selective_log_softmax(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4),
                                                    torch.zeros(3, dtype=torch.long)), r"\(5,\)"),
        (lambda: fused_linear_selective_log_softmax(torch.randn(3, 4), torch.randn(5, 4), None,
                                                    torch.zeros(3, dtype=torch.long), chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_large_vocab(dtype):
    x, idx, g = _inputs((512, 65536), dtype, seed=9)
    xa = x.clone().requires_grad_()
    out = selective_log_softmax(xa, idx, 0.9, backend="triton")
    (ga,) = torch.autograd.grad(out, xa, g)
    _check_against_float64(x, idx, g, 0.9, out, ga, f"CUDA {dtype}")
