"""Selective log-softmax (log-prob of given ids) and its fused-linear variant, forward and backward.

``selective_log_softmax(logits, index)`` equals ``log_softmax(logits / T).gather(index)`` but the
Triton forward keeps only an online logsumexp per row (one read of the logits) and saves the
(R,) logsumexp for the backward, which writes ``dlogits = g/T * (onehot - softmax)`` in one
more read; the (R, V) log-softmax never exists.

``fused_linear_selective_log_softmax(hidden, weight, bias, index)`` also fuses the LM head
(Liger's fused-linear idea): logits are computed chunk by chunk of rows, reduced to (R,)
log-probs, and dropped; the backward recomputes each chunk's logits instead of storing them,
so peak extra memory is one (chunk, V) block instead of (R, V).

Why not TRL's ``trl.kernels.logprob_entropy`` directly: it compiles one kernel per temperature
(a ``tl.constexpr``), computes an entropy we do not need here, and wraps with ``triton.jit`` at
import time, which freezes the interpreter mode (see ``dispatch``). The tests check both
against TRL's ``selective_log_softmax``.

Outputs are float32 whatever the logits dtype (RL ratios want the precision); gradients come
back in the input dtypes. ``index`` values must lie in [0, V): the Triton path does not check.
"""

from __future__ import annotations

import torch

from .dispatch import jit, resolve_backend

# Set by dispatch.jit on first use: importing triton here would freeze its interpreter mode.
tl = None

_BLOCK = 4096


def _lse_fwd_kernel(
    logits_ptr, index_ptr, out_ptr, lse_ptr, stride_row, stride_col, V, inv_t,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        y = tl.load(base + cols.to(tl.int64) * stride_col, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(y, axis=0))
        corr = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        z = z * corr + tl.sum(tl.where(y > float("-inf"), tl.exp(y - m_new), 0.0), axis=0)
        m = m_new
    lse = m + tl.log(z)  # logsumexp of the tempered row
    idx = tl.load(index_ptr + row).to(tl.int64)
    y_idx = tl.load(base + idx * stride_col).to(tl.float32) * inv_t
    tl.store(out_ptr + row, y_idx - lse)
    tl.store(lse_ptr + row, lse)


def _lse_bwd_kernel(
    grad_out_ptr, logits_ptr, index_ptr, lse_ptr, grad_ptr, stride_row, stride_col,
    g_stride_row, g_stride_col, V, inv_t,
    BLOCK: tl.constexpr,
):
    # grad may alias logits (fused-linear backward): each block is read before it is written.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * g_stride_row
    offs = tl.arange(0, BLOCK)
    g = tl.load(grad_out_ptr + row).to(tl.float32) * inv_t
    lse = tl.load(lse_ptr + row)
    idx = tl.load(index_ptr + row).to(tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        y = tl.load(base + cols.to(tl.int64) * stride_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        d = tl.where(cols.to(tl.int64) == idx, g, 0.0) - g * tl.exp(y - lse)
        tl.store(gbase + cols.to(tl.int64) * g_stride_col, d.to(grad_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(_BLOCK, max(16, 1 << (V - 1).bit_length()))


def _fwd_rows_triton(logits, index, inv_t):
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.float32, device=logits.device)
    lse = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R:
        block = _block(V)
        jit(_lse_fwd_kernel)[(R,)](
            logits, index, out, lse, logits.stride(0), logits.stride(1), V, inv_t,
            BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    return out, lse


def _bwd_rows_triton(grad_out, logits, index, lse, inv_t, out=None):
    R, V = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    if R:
        block = _block(V)
        jit(_lse_bwd_kernel)[(R,)](
            grad_out.contiguous(), logits, index, lse, grad, logits.stride(0), logits.stride(1),
            grad.stride(0), grad.stride(1), V, inv_t, BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    return grad


def _fwd_rows_torch(logits, index, inv_t):
    y = logits.float() * inv_t  # (R, V)
    lse = torch.logsumexp(y, dim=-1)  # (R,)
    return torch.gather(y, -1, index.unsqueeze(-1)).squeeze(-1) - lse, lse


def _bwd_rows_torch(grad_out, logits, index, lse, inv_t, out=None):
    g = grad_out.float().unsqueeze(-1) * inv_t  # (R, 1)
    d = -torch.exp(logits.float() * inv_t - lse.unsqueeze(-1)) * g  # (R, V)
    d.scatter_add_(-1, index.unsqueeze(-1), g)
    if out is None:
        return d.to(logits.dtype)
    return out.copy_(d)


_ROWS = {"triton": (_fwd_rows_triton, _bwd_rows_triton), "torch": (_fwd_rows_torch, _bwd_rows_torch)}


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, inv_t):
        out, lse = _fwd_rows_triton(logits, index, inv_t)
        ctx.save_for_backward(logits, index, lse)
        ctx.inv_t = inv_t
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, lse = ctx.saved_tensors
        return _bwd_rows_triton(grad_out, logits, index, lse, ctx.inv_t), None, None


def _check_temperature(temperature: float) -> float:
    if not (temperature > 0.0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / temperature


def _check_index(index: torch.Tensor, lead_shape: tuple, device: torch.device) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if tuple(index.shape) != tuple(lead_shape):
        raise ValueError(f"index must have shape {tuple(lead_shape)}, got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but logits are on {device}")


def selective_log_softmax_reference(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0):
    """The naive definition: ``log_softmax(logits / T)`` then gather, in float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    return torch.gather(logp, -1, index.long().unsqueeze(-1)).squeeze(-1)


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """Log-prob of ``index`` under ``softmax(logits / temperature)``, differentiable w.r.t. logits.

    Args:
        logits: (..., V) float tensor.
        index: (...) integer ids in [0, V).
        temperature: > 0.
        backend: "auto" | "triton" | "torch" (see ``dispatch.resolve_backend``).

    Returns:
        (...) float32 log-probs.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape (..., V)")
    inv_t = _check_temperature(temperature)
    _check_index(index, logits.shape[:-1], logits.device)
    lead, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V)  # (N, V), a view when possible
    idx = index.reshape(-1).long()  # (N,)
    if resolve_backend(backend, logits) == "triton":
        out = _SelectiveLogSoftmax.apply(flat, idx, inv_t)
    else:
        # gather - logsumexp: no (N, V) log-softmax in the forward (autograd still keeps softmax).
        y = flat.float() * inv_t
        out = torch.gather(y, -1, idx.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(y, dim=-1)
    return out.reshape(lead)


class _FusedLinearSelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, index, inv_t, chunk, backend):
        fwd_rows, _ = _ROWS[backend]
        R = hidden.shape[0]
        out = torch.empty(R, dtype=torch.float32, device=hidden.device)  # (R,)
        lse = torch.empty(R, dtype=torch.float32, device=hidden.device)  # (R,)
        for s in range(0, R, chunk):
            e = min(R, s + chunk)
            logits = _chunk_logits(hidden[s:e], weight, bias)  # (C, V), dropped after the chunk
            out[s:e], lse[s:e] = fwd_rows(logits, index[s:e], inv_t)
        ctx.save_for_backward(hidden, weight, bias, index, lse)
        ctx.inv_t, ctx.chunk, ctx.backend = inv_t, chunk, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, index, lse = ctx.saved_tensors
        _, bwd_rows = _ROWS[ctx.backend]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        R = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate weight/bias grads in fp32: summing R chunk products in bf16 loses bits.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, R, ctx.chunk):
            e = min(R, s + ctx.chunk)
            h = hidden[s:e]  # (C, D)
            logits = _chunk_logits(h, weight, bias)  # recomputed (C, V): cheaper than storing (R, V)
            dlogits = bwd_rows(grad_out[s:e], logits, index[s:e], lse[s:e], ctx.inv_t, out=logits)
            if need_h:
                grad_h[s:e] = dlogits @ weight
            if need_w:
                grad_w += (dlogits.t() @ h).float()
            if need_b:
                grad_b += dlogits.float().sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None,
        )


def _chunk_logits(h, weight, bias):
    if bias is None:
        return h @ weight.t()
    return torch.addmm(bias, h, weight.t())


def fused_linear_selective_log_softmax_reference(hidden, weight, bias, index, temperature=1.0):
    """The naive path: full (R, V) logits = hidden @ weight.T + bias, then log_softmax + gather."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return selective_log_softmax_reference(logits, index, temperature)


def fused_linear_selective_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-prob of ``index`` under ``softmax((hidden @ weight.T + bias) / T)`` without (R, V) logits.

    Args:
        hidden: (R, D) activations (leading dims are flattened: (..., D) with index (...)).
        weight: (V, D) LM-head weight, same dtype as hidden.
        bias: (V,) or None.
        index: (R,) integer ids in [0, V).
        temperature: > 0.
        chunk_size: rows per chunk; None picks ``max(1, 2**24 // V)`` rounded down to a power
            of two, i.e. about 64 MiB of fp32 logits per chunk.
        backend: "auto" | "triton" | "torch" for the per-chunk reduction (matmuls are torch).

    Returns:
        (R,) (or (...)) float32 log-probs; gradients flow to hidden, weight and bias.
    """
    inv_t = _check_temperature(temperature)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"need hidden (..., D) and weight (V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError("hidden, weight and bias must share a dtype")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_index(index, hidden.shape[:-1], hidden.device)
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = 1 << max(0, (max(1, (1 << 24) // V)).bit_length() - 1)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size}")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])  # (R, D)
    idx = index.reshape(-1).long()  # (R,)
    which = resolve_backend(backend, hidden)
    out = _FusedLinearSelectiveLogSoftmax.apply(h, weight, bias, idx, inv_t, int(chunk_size), which)
    return out.reshape(lead)
