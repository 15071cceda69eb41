"""Stability penalties: colour drift, high-frequency noise and frozen frames.

Each is registered on its own as a reward (the negated penalty, so 0 is best)
and summed in ``stability``:

- ``color_drift``: total-variation distance between per-channel colour histograms
  (``bins`` bins) of each generated frame and of the context frames, averaged.
- ``hf_noise``: |log(E_gen / E_ctx)| where E is the mean squared 3x3 Laplacian
  response; penalises added noise (E up) and blur (E down) alike.
- ``frozen_frames``: for consecutive steps whose camera moved, 1 - change_gen /
  (``min_fraction`` * change_true) clipped to [0, 1], where change is the mean abs
  frame difference; a frozen rollout scores -1, one that changes at least
  ``min_fraction`` as much as the truth scores 0. success: no fully frozen pair.

The context statistics come from ``rollouts.context`` when present, otherwise from
the true episode frames 0..num_context-1 (frame 0 when num_context is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Reward, RewardResult, register_reward
from .types import EpisodeBatch, RolloutBatch
from .verifiers import true_frames

__all__ = ["ColorDrift", "HFNoise", "FrozenFrames", "Stability", "context_frames"]


def context_frames(rollouts: RolloutBatch, episodes: EpisodeBatch) -> torch.Tensor:
    """Reference frames for the statistics: (B, C, H, W, 3) float in [0, 1]."""
    if rollouts.context is not None and rollouts.context.shape[1] > 0:
        return rollouts.context.float()
    nc = max(rollouts.num_context, 1)
    return episodes.frames[:, :nc].to(rollouts.frames.device).float() / 255.0


def _histograms(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Normalised per-channel histograms of (B, T, H, W, C) -> (B, T, C, bins)."""
    b, t, h, w, c = x.shape
    idx = (x.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # (B, T, H, W, C)
    flat = idx.permute(0, 1, 4, 2, 3).reshape(b * t * c, h * w)
    offs = torch.arange(b * t * c, device=x.device).view(-1, 1) * bins
    counts = torch.bincount((flat + offs).reshape(-1), minlength=b * t * c * bins)
    return counts.view(b, t, c, bins).to(x.dtype) / (h * w)


def color_drift(frames: torch.Tensor, context: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """(B,) mean TV distance between generated-frame and context colour histograms."""
    ref = _histograms(context, bins).mean(dim=1, keepdim=True)  # (B, 1, C, bins)
    return 0.5 * (_histograms(frames, bins) - ref).abs().sum(dim=-1).mean(dim=(1, 2))


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared Laplacian response per frame: (B, T, H, W, C) -> (B, T)."""
    b, t, h, w, c = x.shape
    y = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
    k = _LAPLACE.to(x.device, x.dtype).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    return F.conv2d(y, k, groups=c).square().mean(dim=(1, 2, 3)).view(b, t)


def hf_noise(frames: torch.Tensor, context: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) mean over generated frames of |log((E_gen + eps) / (E_ctx + eps))|."""
    e_ctx = laplacian_energy(context).mean(dim=1, keepdim=True)
    return torch.log((laplacian_energy(frames) + eps) / (e_ctx + eps)).abs().mean(dim=1)


def frozen_penalty(
    rollouts: RolloutBatch, episodes: EpisodeBatch, min_fraction: float = 0.5, pose_eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean penalty (B,), max penalty (B,)) over consecutive steps where the camera moved."""
    frames = rollouts.frames.float()
    truth = true_frames(rollouts, episodes)
    nc, t = rollouts.num_context, rollouts.horizon
    first = nc
    if nc > 0:
        # The step from the last context frame into the rollout counts too: a model that
        # repeats its input has frozen there.
        prev = context_frames(rollouts, episodes)[:, -1:]
        frames = torch.cat([prev, frames], dim=1)
        truth = torch.cat([episodes.frames[:, nc - 1 : nc].to(frames.device).float() / 255.0, truth], dim=1)
        first = nc - 1
    poses = episodes.world_to_camera[:, first : nc + t].to(frames.device).double()
    moved = (poses[:, 1:] - poses[:, :-1]).abs().amax(dim=(-2, -1)) > pose_eps  # (B, P)
    gen_change = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(2, 3, 4))  # (B, P)
    true_change = (truth[:, 1:] - truth[:, :-1]).abs().mean(dim=(2, 3, 4))
    pen = (1.0 - gen_change / (min_fraction * true_change + 1e-8)).clamp(0.0, 1.0)
    pen = torch.where(moved, pen, torch.zeros_like(pen))
    n_moved = moved.sum(dim=1)
    mean = pen.sum(dim=1) / n_moved.clamp(min=1)
    return mean, pen.amax(dim=1) if pen.shape[1] else torch.zeros_like(mean)


@register_reward("color_drift")
class ColorDrift(Reward):
    """-(colour histogram drift from the context), in [-1, 0]."""

    def __init__(self, bins: int = 16):
        self.bins = bins

    def evaluate(self, rollouts, episodes) -> RewardResult:
        return RewardResult(reward=-color_drift(rollouts.frames.float(), context_frames(rollouts, episodes), self.bins))


@register_reward("hf_noise")
class HFNoise(Reward):
    """-|log Laplacian-energy ratio| of generated frames vs context (noise and blur both cost)."""

    def evaluate(self, rollouts, episodes) -> RewardResult:
        return RewardResult(reward=-hf_noise(rollouts.frames.float(), context_frames(rollouts, episodes)))


@register_reward("frozen_frames")
class FrozenFrames(Reward):
    """-(mean frozen-frame penalty) over steps where the camera moved, in [-1, 0]."""

    def __init__(self, min_fraction: float = 0.5):
        self.min_fraction = min_fraction

    def evaluate(self, rollouts, episodes) -> RewardResult:
        mean, worst = frozen_penalty(rollouts, episodes, self.min_fraction)
        return RewardResult(reward=-mean, success=worst < 1.0)


@register_reward("stability")
class Stability(Reward):
    """-(drift_weight * color_drift + noise_weight * hf_noise + frozen_weight * frozen);
    success from the frozen-frame check."""

    def __init__(
        self,
        drift_weight: float = 1.0,
        noise_weight: float = 1.0,
        frozen_weight: float = 1.0,
        bins: int = 16,
        min_fraction: float = 0.5,
    ):
        self.drift_weight = drift_weight
        self.noise_weight = noise_weight
        self.frozen_weight = frozen_weight
        self.bins = bins
        self.min_fraction = min_fraction

    def evaluate(self, rollouts, episodes) -> RewardResult:
        ctx = context_frames(rollouts, episodes)
        frames = rollouts.frames.float()
        drift = color_drift(frames, ctx, self.bins)
        noise = hf_noise(frames, ctx)
        frozen, worst = frozen_penalty(rollouts, episodes, self.min_fraction)
        total = self.drift_weight * drift + self.noise_weight * noise + self.frozen_weight * frozen
        return RewardResult(
            reward=-total,
            success=worst < 1.0,
            extras={"color_drift": drift, "hf_noise": noise, "frozen": frozen},
        )
