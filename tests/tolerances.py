"""Tolerances that follow from a dtype's epsilon and the size of the values, never from what passed here.

Two float computations of one quantity that add in different orders (another CPU's vector width,
DDP's all-reduce, micro-batches, a Triton block against torch's reduction) differ by a few units of
rounding of the *terms they add*, not of the result: a gradient entry that cancels to ~0 keeps the
rounding error of the large terms it cancelled. So:

* `assert_close_reordered` compares two float32 results of the same sums in other orders, with an
  absolute tolerance of `ulps` epsilons of the tensor's largest magnitude (the scale of its terms)
  plus the same relative tolerance. It states what it assumes; a tolerance that another CPU breaks
  means a larger condition number, not a larger fudge factor.
* `log_softmax_bounds` gives elementwise first-order error bounds for `log_softmax(x / T)[index]` and
  its gradient, computed from a float64 reference (see the docstring), for the kernel tests.
"""

from __future__ import annotations

import math

import torch


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_reordered(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 64,
                           dtype: torch.dtype = torch.float32, msg: str | None = None) -> None:
    """`actual` and `expected` are the same float sums added in other orders.

    Allowed: |a - e| <= ulps * eps(dtype) * (max|e| + |e|). 64 ulps covers summing ~4,000 terms of one
    sign pairwise (error ~ log2(n) eps each) with headroom for a few layers of propagation; tests whose
    values pass through many ill-conditioned steps (Adam's first step near a zero gradient) must bound
    that separately instead of raising `ulps`."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    tol = ulps * eps(dtype)
    torch.testing.assert_close(actual, expected, atol=tol * max(scale, torch.finfo(dtype).tiny), rtol=tol, msg=msg)


def log_softmax_bounds(x: torch.Tensor, index: torch.Tensor, temperature: float, grad_out: torch.Tensor,
                       out_dtype: torch.dtype, safety: float = 4.0):
    """Float64 truth and elementwise error bounds for `y = log_softmax(x / T)[index]` and dy/dx · grad_out,
    as computed in float32 (any summation order) and returned in `out_dtype`.

    First-order rounding analysis with u = eps(float32), z = x / T, lse = logsumexp(z), p = softmax(z):
    * z is formed with <= 2 roundings: |dz| <= 2u|z|;
    * the sum inside lse has relative error <= (log2(V) + 2) u (pairwise or blocked tree sums; a strictly
      sequential sum would need V u), so |dlse| <= u (|lse| + log2(V) + 2) + max|dz|;
    * forward: y = z_idx - lse, so |dy| <= |dz_idx| + |dlse| + u|y|;
    * gradient: d_j = (g/T)(onehot_j - p_j) with p_j = exp(z_j - lse): |dp_j| <= p_j (|dz_j| + |dlse| + 2u),
      |dd_j| <= |g/T| (|dp_j| + 2u) + 2u|d_j|, plus the final rounding to `out_dtype`: eps(out_dtype) |d_j|,
      or one subnormal step for values below its normal range.
    `safety` multiplies the float32 terms (second-order terms, exp/log's own last-bit errors).

    Returns (y64, grad64, y_tol, grad_tol): the truths (float64) and the bounds, shaped like them.
    """
    u = eps(torch.float32)
    x64 = x.detach().double()
    z = x64 / temperature  # (R, V)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (R, 1)
    logp = z - lse
    p = logp.exp()
    y64 = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (R,)
    g = grad_out.detach().double().unsqueeze(-1) / temperature  # (R, 1)
    onehot = torch.zeros_like(z).scatter_(-1, index.unsqueeze(-1), 1.0)
    grad64 = g * (onehot - p)  # (R, V)

    V = x.shape[-1]
    dz = torch.where(z.isfinite(), 2 * u * z.abs(), 0.0)  # a -inf (banned) logit has p = 0 exactly
    dlse = u * (lse.abs() + math.log2(V) + 2) + dz.max(dim=-1, keepdim=True).values
    y_tol = safety * (dz.gather(-1, index.unsqueeze(-1)) + dlse + u * y64.abs().unsqueeze(-1)).squeeze(-1)
    dp = p * (dz + dlse + 2 * u)
    # Rounding to out_dtype: one ulp of |d_j|, and below its normal range one subnormal step (fp16's is 6e-8).
    out_info = torch.finfo(out_dtype)
    grad_tol = (safety * (g.abs() * (dp + 2 * u) + 2 * u * grad64.abs())
                + out_info.eps * grad64.abs() + out_info.tiny * out_info.eps)
    return y64, grad64, y_tol, grad_tol


def assert_within(actual: torch.Tensor, truth: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """Elementwise |actual - truth| <= tol; the message names the worst element and its margin."""
    err = (actual.detach().double() - truth).abs()
    ratio = err / tol
    worst = int(ratio.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
    assert bool((err <= tol).all()), (
        f"{what}: {int((err > tol).sum())} of {err.numel()} elements outside the rounding bound; worst at {index}: "
        f"error {float(err.flatten()[worst]):.3g} vs bound {float(tol.flatten()[worst]):.3g}")


def logprob_bound(logits_row: torch.Tensor, temperature: float = 1.0, safety: float = 4.0) -> float:
    """How far a float32 log-prob `z_i - logsumexp(z)` of one row (z = logits / T) may lie from the float64
    truth: the forward bound of `log_softmax_bounds`, for the row's largest |z| (also covers log-probs
    renormalised over a top-k / top-p subset, whose logsumexp is no larger)."""
    u = eps(torch.float32)
    z = logits_row.detach().double() / temperature
    z = z[z.isfinite()]
    lse = float(torch.logsumexp(z, 0))
    zmax = float(z.abs().max())
    return safety * u * (3 * zmax + 2 * abs(lse) + math.log2(z.numel()) + 2)
