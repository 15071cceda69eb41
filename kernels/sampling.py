"""Fused batched sampling from (R, V) logits with temperature, top-k and top-p, without sorting.

One Triton program handles one row and streams the row in blocks:

1. one pass: online max ``m``, the tempered partition function ``Z_full``, the argmax, the
   number of finite logits and the smallest finite logit;
2. top-k, then top-p, each as a bisection on a logit *threshold* ``tau``: every pass counts
   the logits ``>= mid`` (top-k) or sums their tempered mass (top-p), and snaps the bracket to
   logit values present in the row, so the search ends on an exact row value (no sort, no
   (R, V) scratch; a handful of passes over a row that stays in L2 on a GPU);
3. one inverse-CDF scan: the first token whose running kept mass exceeds ``u * Z_kept``, with
   early exit once found.

Semantics shared by the kernel and :func:`sample_reference` (so both pick the SAME token for
the same uniform, up to float rounding exactly at a CDF boundary):

* temperature ``T`` scales the logits first; top-k and then top-p filter, top-p measuring mass
  under the tempered distribution renormalised over the top-k set (the HF / vLLM order);
* the kept set is ``{v : logit_v >= tau}`` (threshold semantics). Top-k: ``tau`` is the k-th
  largest logit counted with multiplicity (``torch.topk(x, k).values[-1]``), so logits tied
  with it are all kept and the set can exceed k. Top-p: ``tau`` is the largest logit value
  whose set ``{logit >= tau}`` holds at least ``top_p`` of the mass; ties at the cut are kept;
  a tiny top_p keeps the top token (and logits tied with it);
* sampling walks the vocabulary in index order: token = first index whose cumulative kept
  probability exceeds ``u * Z_kept``; if rounding leaves none (u within an ulp of 1) the argmax;
* ``temperature == 0`` (and ``top_k == 1``) is greedy: the first index of the row maximum,
  no uniform is consumed, ``logprobs`` is 0 (a point mass). ``full_logprobs`` is then the
  log-softmax of the raw logits at temperature 1 (for ``temperature == 0``) or at
  ``temperature`` (for ``top_k == 1``): the untruncated distribution RL importance ratios need;
* ``-inf`` logits have probability 0 and are never sampled; a row with one finite logit always
  yields it (logprob 0); a row that is all ``-inf`` (or has NaN / +inf) is undefined input;
* a temperature so small that ``1/T`` overflows is clamped to ``1/T = 1e30``, which makes every
  logit below the maximum underflow to probability 0: the same as greedy up to ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import jit, resolve_backend

# Set by dispatch.jit on first use: importing triton here would freeze its interpreter mode.
tl = None

_LOG2E = 1.4426950408889634
_MAX_INV_TEMPERATURE = 1e30
_BLOCK = 4096
# The bisection shrinks a bracket of row values; for fp32 logits it ends in ~log2(range/gap)
# passes, far below this cap, which only guards pathological inputs (then a superset is kept).
_MAX_SEARCH_PASSES = 96


class SampleOutput(NamedTuple):
    """What :func:`sample` returns; every tensor is (R,)."""

    tokens: torch.Tensor  # (R,) int64 sampled ids
    logprobs: torch.Tensor  # (R,) float32 log-prob under the truncated, tempered distribution
    full_logprobs: torch.Tensor | None  # (R,) float32 under the untruncated tempered one, if asked


def _sample_kernel(
    logits_ptr, uniform_ptr, tokens_ptr, logprobs_ptr, full_logprobs_ptr,
    stride_row, stride_col, V, scale, top_k, top_p,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, MAX_PASSES: tl.constexpr, BLOCK: tl.constexpr,
):
    # scale = log2(e) / T: probabilities are exp2((x - m) * scale), x the raw logit.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    POS_INF: tl.constexpr = float("inf")
    BIG_IDX: tl.constexpr = 2147483647

    # -- pass 1: online max / partition function / argmax / finite count and min --
    m = tl.full([], NEG_INF, tl.float32)
    z_full = tl.full([], 0.0, tl.float32)
    arg = tl.full([], 0, tl.int32)
    n_finite = tl.full([], 0, tl.int32)
    min_finite = tl.full([], POS_INF, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols.to(tl.int64) * stride_col, mask=cols < V, other=NEG_INF).to(tl.float32)
        finite = x > NEG_INF
        b_max = tl.max(x, axis=0)
        b_arg = tl.min(tl.where(x == b_max, cols, BIG_IDX), axis=0)
        arg = tl.where(b_max > m, b_arg, arg)  # strict: the first index wins ties across blocks
        m_new = tl.maximum(m, b_max)
        corr = tl.where(m == m_new, 1.0, tl.exp2((m - m_new) * scale))
        z_full = z_full * corr + tl.sum(tl.where(finite, tl.exp2((x - m_new) * scale), 0.0), axis=0)
        m = m_new
        n_finite += tl.sum(finite.to(tl.int32), axis=0)
        min_finite = tl.minimum(min_finite, tl.min(tl.where(finite, x, POS_INF), axis=0))

    # Invariant of both searches: the threshold lies in [lo, hi], both row values, and
    # lo satisfies the predicate with kept mass lo_mass. Starting at the smallest finite
    # logit keeps every token of non-zero probability.
    lo = min_finite
    lo_mass = z_full
    if HAS_TOP_K:
        # k >= number of finite logits: keep all (empty bracket, no pass).
        hi = tl.where(top_k < n_finite, m, lo)
        it = tl.full([], 0, tl.int32)
        while (lo < hi) & (it < MAX_PASSES):
            mid = lo * 0.5 + hi * 0.5
            mid = tl.where(mid > lo, mid, hi)  # adjacent floats: probe hi itself
            cnt = tl.full([], 0, tl.int32)
            mass = tl.full([], 0.0, tl.float32)
            above = tl.full([], POS_INF, tl.float32)
            below = tl.full([], NEG_INF, tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                x = tl.load(base + cols.to(tl.int64) * stride_col, mask=cols < V, other=NEG_INF).to(tl.float32)
                ge = x >= mid
                cnt += tl.sum(ge.to(tl.int32), axis=0)
                mass += tl.sum(tl.where(ge, tl.exp2((x - m) * scale), 0.0), axis=0)
                above = tl.minimum(above, tl.min(tl.where(ge, x, POS_INF), axis=0))
                below = tl.maximum(below, tl.max(tl.where(ge, NEG_INF, x), axis=0))
            ok = cnt >= top_k
            lo = tl.where(ok, above, lo)
            lo_mass = tl.where(ok, mass, lo_mass)
            hi = tl.where(ok, hi, below)
            it += 1
    if HAS_TOP_P:
        need = top_p * lo_mass
        hi = m
        it = tl.full([], 0, tl.int32)
        while (lo < hi) & (it < MAX_PASSES):
            mid = lo * 0.5 + hi * 0.5
            mid = tl.where(mid > lo, mid, hi)
            mass = tl.full([], 0.0, tl.float32)
            above = tl.full([], POS_INF, tl.float32)
            below = tl.full([], NEG_INF, tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                x = tl.load(base + cols.to(tl.int64) * stride_col, mask=cols < V, other=NEG_INF).to(tl.float32)
                ge = x >= mid
                mass += tl.sum(tl.where(ge, tl.exp2((x - m) * scale), 0.0), axis=0)
                above = tl.minimum(above, tl.min(tl.where(ge, x, POS_INF), axis=0))
                below = tl.maximum(below, tl.max(tl.where(ge, NEG_INF, x), axis=0))
            ok = mass >= need
            lo = tl.where(ok, above, lo)
            lo_mass = tl.where(ok, mass, lo_mass)
            hi = tl.where(ok, hi, below)
            it += 1
    tau = lo

    # -- last pass: inverse CDF over the kept set, in index order, stopping at the hit --
    u = tl.load(uniform_ptr + row).to(tl.float32)
    target = u * lo_mass
    carry = tl.full([], 0.0, tl.float32)
    tok = tl.full([], -1, tl.int32)
    start = tl.full([], 0, tl.int32)
    while (start < V) & (tok < 0):
        cols = start + offs
        x = tl.load(base + cols.to(tl.int64) * stride_col, mask=cols < V, other=NEG_INF).to(tl.float32)
        p = tl.where(x >= tau, tl.exp2((x - m) * scale), 0.0)
        cs = carry + tl.cumsum(p, axis=0)
        first = tl.min(tl.where((cs > target) & (cols < V), cols, BIG_IDX), axis=0)
        tok = tl.where(first < V, first, tok)
        carry += tl.sum(p, axis=0)
        start += BLOCK
    tok = tl.where(tok < 0, arg, tok)  # rounding left u*Z_kept past the total: take the argmax

    x_tok = tl.load(base + tok.to(tl.int64) * stride_col).to(tl.float32)
    s_tok = (x_tok - m) * scale
    LN2: tl.constexpr = 0.6931471805599453
    tl.store(tokens_ptr + row, tok.to(tl.int64))
    tl.store(logprobs_ptr + row, (s_tok - tl.log2(lo_mass)) * LN2)
    tl.store(full_logprobs_ptr + row, (s_tok - tl.log2(z_full)) * LN2)


def _inv_temperature(temperature: float) -> float:
    return min(1.0 / temperature, _MAX_INV_TEMPERATURE)


def _sample_triton(logits, uniform, temperature, top_k, top_p):
    R, V = logits.shape
    tokens = torch.empty(R, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(R, dtype=torch.float32, device=logits.device)
    full = torch.empty(R, dtype=torch.float32, device=logits.device)
    block = min(_BLOCK, max(16, 1 << (V - 1).bit_length()))
    jit(_sample_kernel)[(R,)](
        logits, uniform, tokens, logprobs, full,
        logits.stride(0), logits.stride(1), V, _inv_temperature(temperature) * _LOG2E,
        top_k if top_k is not None else 0, float(top_p) if top_p is not None else 1.0,
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None,
        MAX_PASSES=_MAX_SEARCH_PASSES, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return tokens, logprobs, full


def sample_reference(logits, uniform, temperature=1.0, top_k=None, top_p=None):
    """Plain-torch sampling with the module's semantics (sorts; reads the logits many times).

    Expects validated arguments, ``temperature > 0``, ``top_k``/``top_p`` already normalised
    (None when they keep everything). Returns (tokens, logprobs, full_logprobs), all (R,).
    """
    x = logits.float()  # (R, V)
    m = x.max(dim=-1, keepdim=True).values  # (R, 1)
    s = (x - m) * _inv_temperature(temperature)  # (R, V) tempered, shifted logits
    p = torch.exp(s)  # (R, V) unnormalised probabilities; exactly 0 for -inf logits
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]  # (R, 1)
        keep &= x >= kth
    if top_p is not None:
        xs, order = torch.sort(torch.where(keep, x, float("-inf")), dim=-1, descending=True)
        cum = torch.cumsum(torch.gather(torch.where(keep, p, 0.0), -1, order), dim=-1)  # (R, V)
        need = top_p * cum[:, -1:]
        # First sorted position whose mass reaches top_p; its value is the threshold.
        j = torch.searchsorted(cum.contiguous(), need.contiguous(), right=False).clamp_max(x.shape[-1] - 1)
        keep &= x >= torch.gather(xs, -1, j)
    pk = torch.where(keep, p, 0.0)  # (R, V) kept, unnormalised
    z_kept = pk.sum(-1)  # (R,)
    cdf = torch.cumsum(pk, dim=-1)  # (R, V)
    tok = torch.searchsorted(cdf, (uniform.float() * z_kept).unsqueeze(-1), right=True).squeeze(-1)
    tok = torch.where(tok >= x.shape[-1], x.argmax(-1), tok)
    s_tok = torch.gather(s, -1, tok.unsqueeze(-1)).squeeze(-1)
    return tok, s_tok - torch.log(z_kept), s_tok - torch.log(p.sum(-1))


def _validate(logits, temperature, top_k, top_p, uniform):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D (R, V) tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if not (temperature >= 0.0):  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if uniform is not None:
        if not isinstance(uniform, torch.Tensor) or tuple(uniform.shape) != (logits.shape[0],):
            shape = tuple(uniform.shape) if isinstance(uniform, torch.Tensor) else type(uniform).__name__
            raise ValueError(f"uniform must have shape ({logits.shape[0]},), got {shape}")
        if uniform.device != logits.device:
            raise ValueError(f"uniform is on {uniform.device} but logits are on {logits.device}")
        if not uniform.is_floating_point():
            raise ValueError(f"uniform must be floating point, got dtype {uniform.dtype}")


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_full_logprobs: bool = False,
    backend: str = "auto",
) -> SampleOutput:
    """Sample one token per row of ``logits`` (R, V); see the module docstring for semantics.

    Args:
        logits: (R, V) float tensor (fp32/fp16/bf16, any strides).
        temperature: >= 0; 0 means greedy.
        top_k: keep the logits >= the k-th largest (None: no top-k; k >= V keeps all).
        top_p: in (0, 1]; keep the smallest threshold set holding >= top_p of the mass.
        uniform: optional (R,) uniforms in [0, 1) on the logits' device, one per row; drawn
            with ``torch.rand(R, generator=generator)`` when None. Same uniforms -> same tokens
            on both backends.
        generator: torch.Generator for the uniforms when ``uniform`` is None (on the logits' device).
        return_full_logprobs: also return log-probs under the untruncated tempered distribution.
        backend: "auto" (Triton where :func:`triton_available`, else torch), "triton" or "torch".

    Returns:
        SampleOutput(tokens (R,) int64, logprobs (R,) fp32, full_logprobs (R,) fp32 or None).
        Nothing is differentiable: recompute log-probs with ``selective_log_softmax`` for losses.
    """
    _validate(logits, temperature, top_k, top_p, uniform)
    R, V = logits.shape
    logits = logits.detach()
    if temperature == 0.0 or top_k == 1:
        # Greedy: no uniform is consumed, so the caller's generator stream does not advance.
        tokens = logits.argmax(dim=-1)
        full = None
        if return_full_logprobs:
            from .logprobs import selective_log_softmax

            t_full = 1.0 if temperature == 0.0 else temperature
            full = selective_log_softmax(logits, tokens, temperature=t_full, backend=backend)
        return SampleOutput(tokens, torch.zeros(R, dtype=torch.float32, device=logits.device), full)
    if top_k is not None and top_k >= V:
        top_k = None
    if top_p is not None and top_p >= 1.0:
        top_p = None
    if uniform is None:
        uniform = torch.rand(R, generator=generator, device=logits.device)
    if R == 0:
        empty = torch.empty(0, dtype=torch.float32, device=logits.device)
        return SampleOutput(torch.empty(0, dtype=torch.int64, device=logits.device), empty,
                            empty if return_full_logprobs else None)
    if resolve_backend(backend, logits) == "triton":
        tokens, logprobs, full = _sample_triton(logits, uniform.contiguous(), temperature, top_k, top_p)
    else:
        tokens, logprobs, full = sample_reference(logits, uniform, temperature, top_k, top_p)
    return SampleOutput(tokens, logprobs, full if return_full_logprobs else None)
