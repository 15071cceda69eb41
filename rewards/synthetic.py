"""Analytic scenes that follow the envs3d episode contract, plus frame corruptions.

Used by the tests, the benchmark and the reward-model smoke runs: a textured
floor (world plane z = 0) with coloured spheres on it, seen by a pinhole camera
at a fixed height and pitch that moves on the floor with discrete actions.
Everything is ray-cast in numpy, so depth, segmentation and poses are exact and
the warping code has an analytic check. Not a replacement for envs3d.

Conventions are the ones in ``posttrain.rewards.types``: OpenCV camera
(x right, y down, z forward), ``u = fx X / Z + cx`` and pixel (i, j) centred at
(u, v) = (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .types import N_MAX_OBJECTS, EpisodeBatch, RolloutBatch

__all__ = [
    "ACTIONS",
    "make_episode",
    "make_episodes",
    "camera_pose",
    "truth_rollouts",
    "shift_frames",
    "blur_frames",
    "noise_frames",
    "freeze_frames",
]

# action id -> (forward metres, left metres, yaw degrees)
ACTIONS = {
    0: (0.0, 0.0, 0.0),  # noop
    1: (0.15, 0.0, 0.0),  # forward
    2: (-0.15, 0.0, 0.0),  # back
    3: (0.0, 0.0, 10.0),  # turn left
    4: (0.0, 0.0, -10.0),  # turn right
    5: (0.0, 0.12, 0.0),  # strafe left
    6: (0.0, -0.12, 0.0),  # strafe right
}
_INVERSE = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5}
_PALETTE = np.array(
    [[220, 40, 40], [40, 190, 60], [50, 80, 230], [235, 210, 40], [200, 60, 200], [40, 200, 210]], dtype=np.uint8
)
_HEIGHT = 1.4
_PITCH = math.radians(-38.0)
_RADIUS = 0.22


def camera_pose(x: float, y: float, yaw: float) -> np.ndarray:
    """World-to-camera (4, 4) for a camera at (x, y, height) with the given yaw (radians)."""
    cp, sp = math.cos(_PITCH), math.sin(_PITCH)
    f = np.array([math.cos(yaw) * cp, math.sin(yaw) * cp, sp])
    r = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    d = np.cross(f, r)  # x right, y down, z forward: r x d = f
    rot = np.stack([r, d, f])  # rows: camera axes in world coordinates
    c = np.array([x, y, _HEIGHT])
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = -rot @ c
    return m


def _floor_color(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Smooth checker-and-waves texture on the floor, (...,) -> (..., 3) in [0, 1]."""
    sq = 1.0
    checker = 0.5 + 0.5 * np.tanh(2.0 * np.sin(math.pi * px / sq) * np.sin(math.pi * py / sq))
    wave = 0.5 + 0.5 * np.sin(0.9 * px + 0.4) * np.cos(0.7 * py - 0.3)
    r = 0.25 + 0.45 * checker + 0.2 * wave
    g = 0.3 + 0.3 * checker + 0.3 * (1 - wave)
    b = 0.35 + 0.2 * (1 - checker) + 0.35 * wave
    return np.stack([r, g, b], axis=-1)


def _render(poses: np.ndarray, k: np.ndarray, h: int, w: int, centres: np.ndarray, colors: np.ndarray):
    """Ray-cast frames (T, H, W, 3) uint8, depth (T, H, W), segmentation (T, H, W)."""
    t = poses.shape[0]
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    dirs_c = np.stack([(jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1], np.ones_like(jj)], -1)  # (H, W, 3)
    rot = poses[:, :3, :3]  # (T, 3, 3) camera_from_world
    origin = -np.einsum("tji,tj->ti", rot, poses[:, :3, 3])  # camera centres (T, 3)
    dirs = np.einsum("tji,hwj->thwi", rot, dirs_c)  # world ray directions with unit z-depth
    o = origin[:, None, None, :]
    # Ray parameter s equals the camera z-depth because dirs_c has z = 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        s_floor = np.where(dirs[..., 2] < -1e-9, -o[..., 2] / dirs[..., 2], np.inf)
    depth = s_floor.copy()
    seg = np.zeros((t, h, w), dtype=np.int32)
    for n, c in enumerate(centres):
        oc = o - c
        bq = np.einsum("thwi,thwi->thw", dirs, oc)
        aq = np.einsum("thwi,thwi->thw", dirs, dirs)
        cq = np.einsum("thwi,thwi->thw", oc, oc) - _RADIUS**2
        disc = bq * bq - aq * cq
        with np.errstate(invalid="ignore"):
            s = (-bq - np.sqrt(disc)) / aq
        hit = (disc >= 0) & (s > 0) & (s < depth)
        depth = np.where(hit, s, depth)
        seg = np.where(hit, n + 1, seg)
    hitp = o + depth[..., None] * dirs
    rgb = _floor_color(hitp[..., 0], hitp[..., 1])
    for n in range(len(centres)):
        rgb = np.where((seg == n + 1)[..., None], colors[n] / 255.0, rgb)
    frames = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return frames, depth.astype(np.float32), seg


def make_episode(
    seed: int,
    num_steps: int = 8,
    height: int = 64,
    width: int = 64,
    num_objects: int = 3,
    loop: bool = False,
    actions: list[int] | None = None,
    supersample: int = 1,
) -> dict[str, Any]:
    """One episode dict in the envs3d contract. ``loop=True`` plays random actions then
    their inverses in reverse, so the camera returns exactly to its start pose.
    ``supersample`` (odd) renders colour at that many samples per pixel side and box
    filters it (anti-aliasing); depth and segmentation are taken at pixel centres."""
    rng = np.random.default_rng(seed)
    if actions is None:
        if loop:
            if (num_steps - 1) % 2:
                raise ValueError("a loop episode needs an even number of actions (num_steps odd)")
            half = list(rng.choice([1, 2, 3, 4, 5, 6], size=(num_steps - 1) // 2))
            actions = half + [_INVERSE[a] for a in reversed(half)]
        else:
            actions = list(rng.choice([1, 3, 4, 5, 6], size=num_steps - 1))
    if len(actions) != num_steps - 1:
        raise ValueError(f"need {num_steps - 1} actions, got {len(actions)}")
    # Integer bookkeeping of the yaw so that a loop returns bit-exactly to its start.
    yaw_steps = 0
    x0, y0, yaw0 = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-math.pi, math.pi)
    px, py = 0.0, 0.0
    poses = []
    for a in [None] + list(actions):
        if a is not None:
            df, dl, dyaw = ACTIONS[int(a)]
            yaw_steps += int(round(dyaw / 10.0))
            yaw = yaw0 + math.radians(10.0 * yaw_steps)
            px += df * math.cos(yaw) - dl * math.sin(yaw)
            py += df * math.sin(yaw) + dl * math.cos(yaw)
        poses.append((px, py, yaw_steps))
    mats = []
    for qx, qy, ys in poses:
        # Snap to exact start when the integer-tracked state is back at the origin.
        if abs(qx) < 1e-9 and abs(qy) < 1e-9 and ys == 0:
            qx, qy = 0.0, 0.0
        mats.append(camera_pose(x0 + qx, y0 + qy, yaw0 + math.radians(10.0 * ys)))
    poses_arr = np.stack(mats).astype(np.float64)
    # Objects in front of the start camera, on the floor.
    cam_c = np.array([x0, y0])
    fwd_dir = np.array([math.cos(yaw0), math.sin(yaw0)])
    side = np.array([-fwd_dir[1], fwd_dir[0]])
    centres = np.full((N_MAX_OBJECTS, 3), np.nan, dtype=np.float64)
    colors = np.zeros((N_MAX_OBJECTS, 3), dtype=np.uint8)
    for n in range(num_objects):
        dist, lat = rng.uniform(1.4, 2.8), rng.uniform(-0.9, 0.9)
        xy = cam_c + dist * fwd_dir + lat * side
        centres[n] = [xy[0], xy[1], _RADIUS]
        colors[n] = _PALETTE[n % len(_PALETTE)]
    fx = 0.9 * width
    k = np.array([[fx, 0, width / 2.0], [0, fx, height / 2.0], [0, 0, 1]], dtype=np.float64)
    if supersample % 2 == 0:
        raise ValueError("supersample must be odd so that a sub-pixel sits at each pixel centre")
    ss = supersample
    k_ss = k.copy()
    k_ss[:2] *= ss  # pixel j at res 1 covers hi-res pixels ss*j .. ss*j + ss - 1
    frames, depth, seg = _render(poses_arr, k_ss, height * ss, width * ss, centres[:num_objects], colors)
    if ss > 1:
        frames = frames.reshape(num_steps, height, ss, width, ss, 3).astype(np.float64).mean(axis=(2, 4))
        frames = np.clip(np.round(frames), 0, 255).astype(np.uint8)
        depth = np.ascontiguousarray(depth[:, ss // 2 :: ss, ss // 2 :: ss])
        seg = np.ascontiguousarray(seg[:, ss // 2 :: ss, ss // 2 :: ss])
    visible = np.zeros((num_steps, N_MAX_OBJECTS), dtype=bool)
    for n in range(num_objects):
        visible[:, n] = (seg == n + 1).any(axis=(1, 2))
    return {
        "seed": int(seed),
        "frames": frames,
        "depth": depth,
        "segmentation": seg,
        "intrinsics": k.astype(np.float32),
        "world_to_camera": poses_arr.astype(np.float32),
        "actions": np.asarray(actions, dtype=np.int64),
        "object_positions": np.repeat(centres[None], num_steps, 0).astype(np.float32),
        "object_visible": visible,
        "num_objects": int(num_objects),
        "object_colors": colors,
        "is_loop": bool(loop),
    }


def make_episodes(seeds, **kwargs) -> EpisodeBatch:
    """Stack ``make_episode(seed, **kwargs)`` for each seed into an ``EpisodeBatch``."""
    return EpisodeBatch.from_episodes([make_episode(int(s), **kwargs) for s in seeds])


def truth_rollouts(episodes: EpisodeBatch, num_context: int = 1, horizon: int | None = None) -> RolloutBatch:
    """Rollouts that are exactly the true frames (the best any model can do)."""
    e = episodes.frames.shape[1]
    horizon = e - num_context if horizon is None else horizon
    frames = episodes.frames[:, num_context : num_context + horizon].float() / 255.0
    context = episodes.frames[:, :num_context].float() / 255.0 if num_context else None
    return RolloutBatch(
        frames=frames,
        num_context=num_context,
        context=context,
        prompt_ids=episodes.seed.clone(),
        sample_ids=torch.zeros_like(episodes.seed),
    )


def shift_frames(frames: torch.Tensor, dx: int, dy: int = 0) -> torch.Tensor:
    """Translate (..., H, W, 3) frames by (dx, dy) pixels, replicating the edge."""
    if dx == 0 and dy == 0:
        return frames.clone()
    lead = frames.shape[:-3]
    h, w, c = frames.shape[-3:]
    x = frames.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    x = F.pad(x, pad, mode="replicate")
    x = x[:, :, max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
    return x.permute(0, 2, 3, 1).reshape(*lead, h, w, c).contiguous()


def blur_frames(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (..., H, W, 3) frames (reflect padding)."""
    if sigma <= 0:
        return frames.clone()
    r = max(1, int(math.ceil(3 * sigma)))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=frames.dtype) / sigma) ** 2)
    g = g / g.sum()
    lead = frames.shape[:-3]
    h, w, c = frames.shape[-3:]
    x = frames.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.permute(0, 2, 3, 1).reshape(*lead, h, w, c).contiguous()


def noise_frames(frames: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Add per-pixel, per-channel Gaussian colour noise, clipped to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return (frames + std * torch.randn(frames.shape, generator=gen, dtype=frames.dtype)).clamp(0, 1)


def freeze_frames(frames: torch.Tensor, start: int) -> torch.Tensor:
    """Repeat frame ``start - 1`` over steps ``start ..`` of (B, T, H, W, 3) rollouts
    (``start = T`` leaves them unchanged; smaller is more frozen)."""
    out = frames.clone()
    if start < frames.shape[1]:
        out[:, start:] = frames[:, max(start - 1, 0) : max(start, 1)]
    return out
