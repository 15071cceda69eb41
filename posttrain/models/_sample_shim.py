"""Temporary torch sampler with the `posttrain.kernels.sample` signature (removed once kernels lands)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SampleOutput(NamedTuple):
    tokens: torch.Tensor
    logprobs: torch.Tensor
    full_logprobs: torch.Tensor | None


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, uniform=None, generator=None, return_full_logprobs=False):
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        full = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        return SampleOutput(tokens, torch.zeros_like(full), full if return_full_logprobs else None)
    scaled = logits / temperature
    full_lp = torch.log_softmax(scaled, -1)
    filtered = scaled.clone()
    if top_k is not None:
        kth = torch.topk(scaled, top_k, -1).values[:, -1:]
        filtered[scaled < kth] = float("-inf")
    if top_p is not None:
        probs = torch.softmax(filtered, -1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        filtered.scatter_(-1, order, torch.where(drop, float("-inf"), filtered.gather(-1, order)))
    lp = torch.log_softmax(filtered, -1)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    cdf = lp.exp().cumsum(-1)
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).squeeze(-1).clamp_max(logits.shape[1] - 1)
    return SampleOutput(tokens, lp.gather(-1, tokens[:, None]).squeeze(-1),
                        full_lp.gather(-1, tokens[:, None]).squeeze(-1) if return_full_logprobs else None)
