"""Verifiable rewards scored against the simulator's truth.

All take ``(rollouts: RolloutBatch, episodes: EpisodeBatch)`` and return a float
tensor (B,), higher is better; ``evaluate`` also gives success flags / masks.
Generated frame t of a rollout is episode step ``rollouts.num_context + t``.

- ``fidelity`` (and the shorthands ``neg_mse``, ``neg_mae``, ``psnr``, ``ssim``):
  per-frame image metric against the true (or tokenizer-reference) frames,
  aggregated over the horizon (``mean``, ``last`` or ``discounted``).
- ``consistency_3d``: generated frames agree with each other under the true
  camera motion and depth (negative masked mean abs error on co-visible pixels).
- ``loop_closure``: on loop episodes, the last generated frame matches the first.
- ``object_permanence``: objects keep their colour where the simulator says they
  are visible, and the colour blob follows the projected object position.
- ``object_presence``: the share of each visible object's interior (its true mask eroded
  by one pixel) drawn within 0.2 RGB distance of the true frame: `posttrain eval`'s object
  presence, as a reward. Blur toward the floor colour loses it.

Stability penalties (colour drift, noise, frozen frames) are in ``stability.py``.
"""

from __future__ import annotations

import math

import torch

from . import metrics
from .geometry import project_points, reproject, sample_image
from .registry import Reward, RewardResult, register_reward
from .types import EpisodeBatch, RolloutBatch

__all__ = ["Fidelity", "Consistency3D", "LoopClosure", "ObjectPermanence", "ObjectPresence", "true_frames",
           "true_segmentation", "rollout_steps", "aggregate"]


def rollout_steps(rollouts: RolloutBatch, episodes: EpisodeBatch) -> slice:
    """The episode steps a rollout's frames stand for, after checking the episodes cover them."""
    nc, t = rollouts.num_context, rollouts.horizon
    e = episodes.frames.shape[1]
    if nc + t > e:
        raise ValueError(f"rollout covers steps {nc}..{nc + t - 1} but episodes have {e} frames")
    if episodes.batch_size != rollouts.batch_size:
        raise ValueError(f"batch sizes differ: rollouts {rollouts.batch_size}, episodes {episodes.batch_size}")
    return slice(nc, nc + t)


def true_frames(rollouts: RolloutBatch, episodes: EpisodeBatch) -> torch.Tensor:
    """The episode frames for the rollout's steps, float in [0, 1]: (B, T, H, W, 3)."""
    return episodes.frames[:, rollout_steps(rollouts, episodes)].to(rollouts.frames.device).float() / 255.0


def true_segmentation(rollouts: RolloutBatch, episodes: EpisodeBatch) -> torch.Tensor:
    """The episode segmentation for the rollout's steps (0 background, k object k): (B, T, H, W)."""
    return episodes.segmentation[:, rollout_steps(rollouts, episodes)].to(rollouts.frames.device)


def aggregate(values: torch.Tensor, how: str = "mean", gamma: float = 0.9) -> torch.Tensor:
    """Reduce per-step values (B, T) to (B,): ``mean``, ``last`` or ``discounted``
    (sum_t gamma^t v_t / sum_t gamma^t, a weighted mean that keeps the metric's scale)."""
    if how == "mean":
        return values.mean(dim=1)
    if how == "last":
        return values[:, -1]
    if how == "discounted":
        w = gamma ** torch.arange(values.shape[1], device=values.device, dtype=values.dtype)
        return (values * w).sum(dim=1) / w.sum()
    raise ValueError(f"aggregate must be 'mean', 'last' or 'discounted', got {how!r}")


def _frame_metric(metric: str, pred: torch.Tensor, tgt: torch.Tensor, max_psnr: float,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-frame score, higher is better; `weight` (pixels, MSE/MAE only) as in `metrics.mse`."""
    if metric == "mse":
        return -metrics.mse(pred, tgt, weight=weight)
    if metric == "mae":
        return -metrics.mae(pred, tgt, weight=weight)
    if metric == "psnr":
        # Identical frames give +inf dB; clamp so a perfect rollout is a finite best score.
        return metrics.psnr(pred, tgt).clamp(max=max_psnr)
    if metric == "ssim":
        return metrics.ssim(pred, tgt)
    raise ValueError(f"metric must be one of mse, mae, psnr, ssim; got {metric!r}")


@register_reward("fidelity")
class Fidelity(Reward):
    """Frame fidelity vs the truth: -MSE, -MAE, PSNR (dB, clamped at ``max_psnr``) or SSIM.

    ``target="reference"`` scores against ``rollouts.reference_frames`` (the tokenizer's
    reconstruction), so the reward does not ask for detail the tokenizer cannot express.

    ``object_weight`` (MSE and MAE only): pixels of objects (the true segmentation > 0) count this many
    times a background pixel, in a weighted mean over the frame, so the score stays in the metric's
    units. Why: under plain MSE, a model unsure where an object is scores better erasing it (it pays once,
    where the object is) than drawing it in a wrong place (it pays twice); with object pixels weighted
    w, drawing it pays off once its chance of being right exceeds 1 / (w + 1) instead of 1 / 2.
    """

    default_metric = "psnr"

    def __init__(
        self,
        metric: str | None = None,
        aggregate: str = "mean",
        gamma: float = 0.9,
        target: str = "truth",
        max_psnr: float = 60.0,
        object_weight: float = 1.0,
    ):
        self.metric = metric or self.default_metric
        self.aggregate = aggregate
        self.gamma = gamma
        self.target = target
        self.max_psnr = max_psnr
        self.object_weight = float(object_weight)
        if target not in ("truth", "reference"):
            raise ValueError(f"target must be 'truth' or 'reference', got {target!r}")
        if self.object_weight != 1.0 and self.metric not in ("mse", "mae"):
            raise ValueError(f"object_weight is for metric 'mse' or 'mae' (a weighted mean over pixels), "
                             f"not {self.metric!r}")
        if not self.object_weight > 0:
            raise ValueError(f"object_weight must be > 0, got {object_weight!r}")

    def evaluate(self, rollouts: RolloutBatch, episodes: EpisodeBatch) -> RewardResult:
        if self.target == "reference":
            if rollouts.reference_frames is None:
                raise ValueError("fidelity(target='reference') needs rollouts.reference_frames")
            tgt = rollouts.reference_frames.float()
        else:
            tgt = true_frames(rollouts, episodes)
        weight = None
        if self.object_weight != 1.0:
            objects = true_segmentation(rollouts, episodes) > 0  # (B, T, H, W)
            weight = 1.0 + (self.object_weight - 1.0) * objects.float()
        pred = rollouts.frames.float()
        per_step = _frame_metric(self.metric, pred, tgt, self.max_psnr, weight)  # (B, T)
        reward = aggregate(per_step, self.aggregate, self.gamma)
        dense = self._map(pred, tgt, weight) if self.has_dense_map else None
        return RewardResult(reward=reward, dense=dense)

    @property
    def has_dense_map(self) -> bool:
        # A map whose mean is the reward exists for per-pixel means (MSE, MAE, SSIM) averaged over frames;
        # PSNR is a log of a mean and 'last'/'discounted' weigh frames unequally.
        return self.metric in ("mse", "mae", "ssim") and self.aggregate == "mean"

    def _map(self, pred: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H, W): per pixel, its part of the frame's score, scaled so the map's mean is the score."""
        if self.metric == "ssim":
            return metrics.ssim_map(pred, tgt)
        err = (pred - tgt).square() if self.metric == "mse" else (pred - tgt).abs()
        err = err.mean(-1)  # (B, T, H, W)
        if weight is None:
            return -err
        h, w = err.shape[-2:]
        return -err * weight * (h * w) / weight.sum((-2, -1), keepdim=True)


@register_reward("neg_mse")
class NegMSE(Fidelity):
    """``fidelity`` with metric='mse' (returns -MSE)."""

    default_metric = "mse"


@register_reward("neg_mae")
class NegMAE(Fidelity):
    """``fidelity`` with metric='mae' (returns -MAE)."""

    default_metric = "mae"


@register_reward("psnr")
class PSNR(Fidelity):
    """``fidelity`` with metric='psnr'."""

    default_metric = "psnr"


@register_reward("ssim")
class SSIM(Fidelity):
    """``fidelity`` with metric='ssim'."""

    default_metric = "ssim"


@register_reward("consistency_3d")
class Consistency3D(Reward):
    """Multi-view consistency of generated frames under the simulator's camera motion.

    For each consecutive pair (t, t+1) every pixel p of generated frame t is lifted
    with the simulator depth at t, moved by world_to_camera[t+1] @ inv(world_to_camera[t])
    and projected to p' in view t+1; generated frame t+1 is sampled there (``mode``)
    and compared with frame t at p. This is the inverse-warp form of "warp t into
    t+1" and has no forward-splatting holes. Co-visible pixels: p' inside the image,
    z' > 0 and |depth[t+1](p') - z'| <= abs_tol + rel_tol * z' (occlusion test, nearest
    sample). Reward = -(sum of per-pixel mean-over-RGB abs errors) / (co-visible count)
    over all pairs. A rigidly shifted hallucination scores well, morphing content badly.
    ``include_context`` adds the pair (last context frame, first generated frame).
    No co-visible pixels at all gives NaN (a loud failure in ``compose``).
    """

    has_dense_map = True

    def __init__(
        self, mode: str = "bilinear", rel_tol: float = 0.05, abs_tol: float = 0.02, include_context: bool = False
    ):
        self.mode = mode
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.include_context = include_context

    def evaluate(self, rollouts: RolloutBatch, episodes: EpisodeBatch) -> RewardResult:
        true_frames(rollouts, episodes)  # validates the step range
        frames = rollouts.frames.float()  # (B, T, H, W, 3)
        nc = rollouts.num_context
        first = nc
        if self.include_context:
            if nc == 0:
                raise ValueError("consistency_3d(include_context=True) needs num_context >= 1")
            prev = (
                rollouts.context[:, -1].float()
                if rollouts.context is not None
                else episodes.frames[:, nc - 1].float().to(frames.device) / 255.0
            )
            frames = torch.cat([prev[:, None], frames], dim=1)
            first = nc - 1
        b, t, h, w, c = frames.shape
        if t < 2:
            raise ValueError("consistency_3d needs at least two frames (or include_context=True)")
        dev = frames.device
        steps = slice(first, first + t)
        depth = episodes.depth[:, steps].to(dev).float()  # (B, T, H, W)
        poses = episodes.world_to_camera[:, steps].to(dev)  # (B, T, 4, 4)
        k = episodes.intrinsics.to(dev)[:, None].expand(b, t - 1, 3, 3).reshape(-1, 3, 3)
        n = b * (t - 1)
        u, v, z = reproject(
            depth[:, :-1].reshape(n, h, w), k, poses[:, :-1].reshape(n, 4, 4), poses[:, 1:].reshape(n, 4, 4)
        )
        nxt = frames[:, 1:].reshape(n, h, w, c)
        warped = sample_image(nxt, u, v, self.mode)  # frame t+1 seen from t's pixels, (N, H, W, 3)
        d_next = sample_image(depth[:, 1:].reshape(n, h, w, 1), u, v, "nearest")[..., 0]
        inb = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (z > 1e-6)
        visible = (d_next - z).abs() <= self.abs_tol + self.rel_tol * z.abs()
        mask = (inb & visible).to(frames.dtype)  # (N, H, W)
        err = (warped - frames[:, :-1].reshape(n, h, w, c)).abs().mean(dim=-1)  # (N, H, W)
        err_sum = (err * mask).reshape(b, -1).sum(dim=1)
        count = mask.reshape(b, -1).sum(dim=1)
        reward = -err_sum / count  # NaN where nothing is co-visible: deliberate
        # Dense map over the rollout's frames: pair (t, t+1)'s error, on frame t's pixel grid, goes to the
        # later frame t+1 (the one asked to agree with what came before); without include_context the first
        # generated frame is in no pair as the later one and gets 0. Approximate placement: the content at
        # pixel p of frame t lies at p' (a few pixels away for one camera step) in frame t+1.
        pairs = (-(err * mask)).reshape(b, t - 1, h, w)
        frames_out = rollouts.horizon
        dense = torch.zeros(b, frames_out, h, w, dtype=frames.dtype, device=dev)
        dense[:, frames_out - (t - 1):] = pairs
        dense = dense * (frames_out * h * w) / count[:, None, None, None]
        return RewardResult(reward=reward, extras={"covisible_fraction": count / (n // b * h * w)}, dense=dense)


@register_reward("loop_closure")
class LoopClosure(Reward):
    """Loop episodes: -error(last generated frame, first frame) with ``metric`` 'mae' or 'mse'.

    ``target='episode'`` compares with the true episode frame 0; ``'context'`` with
    rollouts.context[:, 0] (what the model saw). Applies only where ``is_loop`` and the
    rollout reaches the episode's last step; elsewhere the reward is exactly 0 and
    ``mask`` is False, so it neither helps nor hurts (no NaN). ``success``: applicable
    and error < ``success_tol``.
    """

    def __init__(self, metric: str = "mae", target: str = "episode", success_tol: float = 0.02):
        if metric not in ("mae", "mse"):
            raise ValueError(f"loop_closure metric must be 'mae' or 'mse', got {metric!r}")
        if target not in ("episode", "context"):
            raise ValueError(f"loop_closure target must be 'episode' or 'context', got {target!r}")
        self.metric = metric
        self.target = target
        self.success_tol = success_tol

    def evaluate(self, rollouts: RolloutBatch, episodes: EpisodeBatch) -> RewardResult:
        true_frames(rollouts, episodes)
        last = rollouts.frames[:, -1].float()
        if self.target == "context":
            if rollouts.context is None:
                raise ValueError("loop_closure(target='context') needs rollouts.context")
            first = rollouts.context[:, 0].float()
        else:
            first = episodes.frames[:, 0].to(last.device).float() / 255.0
        err = (metrics.mae if self.metric == "mae" else metrics.mse)(last, first)  # (B,)
        reaches_end = rollouts.num_context + rollouts.horizon == episodes.frames.shape[1]
        mask = episodes.is_loop.to(last.device).bool() & reaches_end
        reward = torch.where(mask, -err, torch.zeros_like(err))
        return RewardResult(reward=reward, success=mask & (err < self.success_tol), mask=mask)


@register_reward("object_permanence")
class ObjectPermanence(Reward):
    """Objects stay where the simulator says they are, with their colour.

    For each generated frame and each object the simulator marks visible:
    presence = fraction of pixels inside the true segmentation mask whose generated
    colour is within ``color_threshold`` (Euclidean RGB distance, [0, 1] units) of
    ``object_colors``; centroid error = distance between the centroid of colour-matching
    pixels in a window of half-size ``window * W`` around the projected object centre
    and that projected centre, over the image diagonal (no matching pixel: the window's
    corner distance, the worst case). Reward = mean presence - ``centroid_weight`` *
    mean centroid error over visible (frame, object) pairs; 0 with mask False when no
    object is visible in the rollout. ``success``: every visible object has presence >= 0.5.
    Invisible objects are not scored (no hallucination penalty yet).
    """

    def __init__(self, color_threshold: float = 0.2, window: float = 0.2, centroid_weight: float = 1.0):
        self.color_threshold = color_threshold
        self.window = window
        self.centroid_weight = centroid_weight

    def evaluate(self, rollouts: RolloutBatch, episodes: EpisodeBatch) -> RewardResult:
        frames = rollouts.frames.float()  # (B, T, H, W, 3)
        b, t, h, w, _ = frames.shape
        dev = frames.device
        steps = rollout_steps(rollouts, episodes)
        seg = episodes.segmentation[:, steps].to(dev)  # (B, T, H, W), as true_segmentation (steps already checked)
        vis = episodes.object_visible[:, steps].to(dev).bool()  # (B, T, 6)
        colors = episodes.object_colors.to(dev).float() / 255.0  # (B, 6, 3)
        pos = episodes.object_positions[:, steps].to(dev).float()  # (B, T, 6, 3)
        n_obj = pos.shape[2]
        k = episodes.intrinsics.to(dev).float()[:, None].expand(b, t, 3, 3).reshape(-1, 3, 3)
        w2c = episodes.world_to_camera[:, steps].to(dev).float().reshape(-1, 4, 4)
        pu, pv, pz = project_points(torch.nan_to_num(pos).reshape(b * t, n_obj, 3), k, w2c)
        pu, pv = pu.reshape(b, t, n_obj), pv.reshape(b, t, n_obj)
        jj = torch.arange(w, device=dev, dtype=frames.dtype) + 0.5
        ii = torch.arange(h, device=dev, dtype=frames.dtype) + 0.5
        half = self.window * w
        diag = math.hypot(h, w)
        worst = math.sqrt(2.0) * half / diag
        presence = torch.zeros(b, t, n_obj, device=dev)
        cerr = torch.zeros(b, t, n_obj, device=dev)
        for i in range(n_obj):
            dist = (frames - colors[:, None, None, None, i]).norm(dim=-1)  # (B, T, H, W)
            match = (dist < self.color_threshold).to(frames.dtype)
            inside = (seg == i + 1).to(frames.dtype)
            presence[..., i] = (match * inside).sum(dim=(2, 3)) / inside.sum(dim=(2, 3)).clamp(min=1)
            wu = ((jj.view(1, 1, 1, w) - pu[..., i, None, None]).abs() <= half).to(frames.dtype)  # (B,T,1,W)
            wv = ((ii.view(1, 1, h, 1) - pv[..., i, None, None]).abs() <= half).to(frames.dtype)  # (B,T,H,1)
            m = match * wu * wv
            cnt = m.sum(dim=(2, 3))
            cu = (m * jj.view(1, 1, 1, w)).sum(dim=(2, 3)) / cnt.clamp(min=1)
            cv = (m * ii.view(1, 1, h, 1)).sum(dim=(2, 3)) / cnt.clamp(min=1)
            e = torch.hypot(cu - pu[..., i], cv - pv[..., i]) / diag
            cerr[..., i] = torch.where(cnt > 0, e.clamp(max=worst), torch.full_like(e, worst))
        valid = vis & torch.isfinite(pos).all(dim=-1) & (pz.reshape(b, t, n_obj) > 0)
        nvis = valid.sum(dim=(1, 2))
        vf = valid.to(frames.dtype)
        mean_presence = (presence * vf).sum(dim=(1, 2)) / nvis.clamp(min=1)
        mean_cerr = (cerr * vf).sum(dim=(1, 2)) / nvis.clamp(min=1)
        any_vis = nvis > 0
        reward = torch.where(any_vis, mean_presence - self.centroid_weight * mean_cerr, torch.zeros_like(mean_cerr))
        success = any_vis & ((presence >= 0.5) | ~valid).all(dim=2).all(dim=1)
        return RewardResult(
            reward=reward,
            success=success,
            mask=any_vis,
            extras={"presence": mean_presence, "centroid_error": mean_cerr},
        )


@register_reward("object_presence")
class ObjectPresence(Reward):
    """Objects are drawn where the simulator has them: per generated frame, the mean over visible
    objects of the share of the object's interior pixels (true segmentation mask eroded by
    ``erode`` pixels) whose RGB distance to the TRUE frame is under ``threshold``
    (``metrics.object_presence``, the same number `posttrain eval` reports). Frames without a
    visible object are skipped; the reward is the mean over the remaining frames (``aggregate``:
    mean, last or discounted over them), in [0, 1]. Rollouts with no visible object at all get 0
    and mask False. Unlike MSE, a blurred or mean-coloured frame scores ~0 here.
    """

    def __init__(self, threshold: float = 0.2, erode: int = 1, aggregate: str = "mean", gamma: float = 0.9):
        self.threshold, self.erode, self.aggregate, self.gamma = threshold, erode, aggregate, gamma

    def evaluate(self, rollouts: RolloutBatch, episodes: EpisodeBatch) -> RewardResult:
        truth, seg = true_frames(rollouts, episodes), true_segmentation(rollouts, episodes)
        presence = metrics.object_presence(rollouts.frames.float(), truth, seg, self.threshold, self.erode)  # (B,T,K)
        seen = ~presence.isnan()
        per_frame = torch.nan_to_num(presence).sum(-1) / seen.sum(-1).clamp_min(1)  # (B, T)
        frame_seen = seen.any(-1)  # (B, T)
        if self.aggregate == "last":
            # The last frame that shows an object.
            last = (frame_seen * torch.arange(1, frame_seen.shape[1] + 1, device=seen.device)).argmax(1)
            reward = per_frame.gather(1, last[:, None])[:, 0]
        else:
            weight = frame_seen.to(per_frame.dtype)
            if self.aggregate == "discounted":
                weight = weight * self.gamma ** torch.arange(weight.shape[1], device=weight.device, dtype=weight.dtype)
            elif self.aggregate != "mean":
                raise ValueError(f"aggregate must be 'mean', 'last' or 'discounted', got {self.aggregate!r}")
            reward = (per_frame * weight).sum(1) / weight.sum(1).clamp_min(1e-12)
        any_seen = frame_seen.any(1)
        reward = torch.where(any_seen, reward, torch.zeros_like(reward))
        dense = None
        if self.has_dense_map:
            # Each frame's map has that frame's score as its mean; frames without an object are skipped by
            # the mean over frames, so the others are scaled by T / (frames with an object).
            per_pixel = metrics.object_presence_map(rollouts.frames.float(), truth, seg, self.threshold, self.erode)
            frames_seen = frame_seen.sum(1).clamp_min(1).to(per_pixel.dtype)  # (B,)
            dense = per_pixel * (frame_seen.shape[1] / frames_seen)[:, None, None, None]
        return RewardResult(reward=reward, success=any_seen & (reward >= 0.5), mask=any_seen, dense=dense)

    @property
    def has_dense_map(self) -> bool:
        return self.aggregate == "mean"
