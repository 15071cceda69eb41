"""Verifiers: best on ground truth, monotonically worse under corruption; geometry checks."""

import dataclasses

import pytest
import torch

from posttrain.rewards import get_reward
from posttrain.rewards.geometry import project_points, reproject
from posttrain.rewards.synthetic import (
    blur_frames,
    freeze_frames,
    make_episodes,
    noise_frames,
    shift_frames,
    truth_rollouts,
)

CORRUPTIONS = {
    "shift": [lambda f, k=k: shift_frames(f, k, 0) for k in (1, 3, 6)],
    "blur": [lambda f, s=s: blur_frames(f, s) for s in (0.7, 1.5, 3.0)],
    "noise": [lambda f, s=s: noise_frames(f, s) for s in (0.05, 0.15, 0.3)],
    # freeze_frames(start): frames from `start` on repeat frame start-1 (T = 8 here).
    "freeze": [lambda f, s=s: freeze_frames(f, s) for s in (6, 3, 1)],
}
# Which corruptions each verifier must punish. Left out on purpose: consistency_3d x shift
# (a constant shift is a rigid, consistent scene) and x blur (blur is consistent across
# frames); stability-family x shift (statistics-only, shift keeps them); color_drift and
# hf_noise x freeze (frozen frames keep the statistics: frozen_frames covers that);
# frozen_frames x shift/blur/noise (frames still change).
APPLICABLE = {
    "neg_mse": ["shift", "blur", "noise", "freeze"],
    "neg_mae": ["shift", "blur", "noise", "freeze"],
    "psnr": ["shift", "blur", "noise", "freeze"],
    "ssim": ["shift", "blur", "noise", "freeze"],
    "object_permanence": ["shift", "blur", "noise", "freeze"],
    "consistency_3d": ["noise", "freeze"],
    "stability": ["blur", "noise", "freeze"],
    "color_drift": ["blur", "noise"],
    "hf_noise": ["blur", "noise"],
    "frozen_frames": ["freeze"],
}


@pytest.fixture(scope="module")
def scene():
    episodes = make_episodes(range(6), num_steps=9)
    return episodes, truth_rollouts(episodes, num_context=1)


@pytest.fixture(scope="module")
def loop_scene():
    episodes = make_episodes(range(10, 14), num_steps=9, loop=True)
    return episodes, truth_rollouts(episodes, num_context=1)


def _with(rollouts, frames):
    return dataclasses.replace(rollouts, frames=frames)


@pytest.mark.parametrize("name", sorted(APPLICABLE))
def test_best_on_truth_and_monotone(scene, name):
    episodes, gt = scene
    reward = get_reward(name)
    best = reward(gt, episodes)
    assert best.shape == (6,) and torch.isfinite(best).all()
    for corruption in APPLICABLE[name]:
        scores = [best.mean().item()]
        for fn in CORRUPTIONS[corruption]:
            got = reward(_with(gt, fn(gt.frames)), episodes)
            scores.append(got.mean().item())
        assert all(a > b for a, b in zip(scores, scores[1:])), (name, corruption, scores)
        worst = reward(_with(gt, CORRUPTIONS[corruption][-1](gt.frames)), episodes)
        assert (worst < best).all(), (name, corruption)


@pytest.mark.parametrize("corruption", ["shift", "blur", "noise"])
def test_loop_closure(loop_scene, scene, corruption):
    episodes, gt = loop_scene
    res = get_reward("loop_closure").evaluate(gt, episodes)
    assert res.mask.all() and res.success.all()
    assert torch.equal(res.reward, torch.zeros(4))  # the loop closes exactly on the truth
    scores = [0.0] + [get_reward("loop_closure")(_with(gt, f(gt.frames)), episodes).mean().item()
                      for f in CORRUPTIONS[corruption]]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    ctx = get_reward("loop_closure", target="context")(gt, episodes)
    assert torch.equal(ctx, torch.zeros(4))
    # Non-loop episodes: exactly 0, masked out, never NaN.
    other_eps, other_gt = scene
    res = get_reward("loop_closure").evaluate(_with(other_gt, noise_frames(other_gt.frames, 0.3)), other_eps)
    assert not res.mask.any() and torch.equal(res.reward, torch.zeros(6)) and not res.success.any()


def test_reproject_analytic():
    # fx = fy = 10, cx = cy = 2 on a 4x4 image, fronto-parallel plane at depth 2;
    # the camera moves 0.2 m along +x, so points move -0.2 m in x: u' = u - 10 * 0.2 / 2 = u - 1.
    k = torch.tensor([[[10.0, 0, 2], [0, 10.0, 2], [0, 0, 1]]])
    src = torch.eye(4)[None]
    dst = torch.eye(4)[None].clone()
    dst[0, 0, 3] = -0.2  # world_to_camera translation of a camera centred at x = +0.2
    u, v, z = reproject(torch.full((1, 4, 4), 2.0), k, src, dst)
    centres = torch.arange(4) + 0.5
    assert torch.allclose(u[0], (centres - 1.0).expand(4, 4))
    assert torch.allclose(v[0], centres[:, None].expand(4, 4))
    assert torch.allclose(z, torch.full((1, 4, 4), 2.0))


def test_projection_matches_renderer(scene):
    episodes, _ = scene
    # Sphere centres project onto the centroid of their segmentation blob (pixel centre j + 0.5).
    b = 0
    for t in (0, 4):
        for i in range(3):
            mask = episodes.segmentation[b, t] == i + 1
            if mask.sum() < 30 or mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
                continue
            ii, jj = torch.nonzero(mask, as_tuple=True)
            u, v, _ = project_points(
                episodes.object_positions[b : b + 1, t, i : i + 1], episodes.intrinsics[b : b + 1],
                episodes.world_to_camera[b : b + 1, t],
            )
            assert abs(u.item() - (jj.float().mean().item() + 0.5)) < 1.0
            assert abs(v.item() - (ii.float().mean().item() + 0.5)) < 1.0


def test_consistency_3d_truth_rigid_and_morph():
    # An objectless floor and a real camera move (forward, turns, strafes).
    episodes = make_episodes(range(3), num_steps=9, num_objects=0, actions=[1, 3, 5, 4, 1, 6, 3, 1], supersample=3)
    gt = truth_rollouts(episodes, num_context=1)
    reward = get_reward("consistency_3d")
    res = reward.evaluate(gt, episodes)
    assert (res.reward > -0.01).all()  # < 1% mean abs error: only resampling error is left
    assert (res.extras["covisible_fraction"] > 0.6).all()
    t = gt.horizon
    rigid = torch.stack([shift_frames(gt.frames[:, s], 3) for s in range(t)], dim=1)
    morph = torch.stack([shift_frames(gt.frames[:, s], s) for s in range(t)], dim=1)  # drifts over time
    r_rigid, r_morph = reward(_with(gt, rigid), episodes), reward(_with(gt, morph), episodes)
    assert (r_rigid > r_morph).all() and (res.reward > r_morph).all()
    with_ctx = get_reward("consistency_3d", include_context=True)(gt, episodes)
    assert (with_ctx > -0.01).all()


def test_fidelity_options(scene):
    episodes, gt = scene
    noisy = _with(gt, noise_frames(gt.frames, 0.1))
    per_mean = get_reward("fidelity", metric="mae")(noisy, episodes)
    last = get_reward("fidelity", metric="mae", aggregate="last")(noisy, episodes)
    disc = get_reward("fidelity", metric="mae", aggregate="discounted", gamma=0.5)(noisy, episodes)
    per_step = -(noisy.frames - gt.frames).abs().mean(dim=(2, 3, 4))
    w = 0.5 ** torch.arange(8.0)
    assert torch.allclose(per_mean, per_step.mean(1), atol=1e-6)
    assert torch.allclose(last, per_step[:, -1], atol=1e-6)
    assert torch.allclose(disc, (per_step * w).sum(1) / w.sum(), atol=1e-6)
    # Against the tokenizer reference: perfect when the rollout equals the reference.
    ref = _with(noisy, noisy.frames)
    ref.reference_frames = noisy.frames.clone()
    assert torch.equal(get_reward("ssim", target="reference")(ref, episodes), torch.ones(6))
    with pytest.raises(ValueError, match="reference_frames"):
        get_reward("ssim", target="reference")(gt, episodes)


def test_object_weighted_mse_by_hand():
    """`object_weight` w: a weighted mean of the squared error in which object pixels count w times.
    Hand-worked on one 2x2 frame: object pixel error 0.5 (squared 0.25), background errors 0, 0.1, 0."""
    episodes = make_episodes(range(1), num_steps=2)
    gt = truth_rollouts(episodes, num_context=1)
    seg = torch.zeros_like(episodes.segmentation)
    seg[0, 1, 0, 0] = 3   # step 1 (the rollout's only frame): one object pixel at (0, 0)
    small = dataclasses.replace(episodes, segmentation=seg[:, :, :2, :2], frames=episodes.frames[:, :, :2, :2])
    truth = small.frames[:, 1:].float() / 255
    pred = truth.clone()
    pred[0, 0, 0, 0] += 0.5    # the object pixel, every channel: squared error 0.25
    pred[0, 0, 1, 0] += 0.1    # one background pixel: 0.01
    rollouts = _with(dataclasses.replace(gt, frames=gt.frames[:, :, :2, :2]), pred)
    plain = get_reward("neg_mse")(rollouts, small)
    weighted = get_reward("neg_mse", object_weight=5.0)(rollouts, small)
    mae = get_reward("neg_mae", object_weight=5.0)(rollouts, small)
    assert plain.item() == pytest.approx(-(0.25 + 0.01) / 4, abs=1e-6)
    assert weighted.item() == pytest.approx(-(5 * 0.25 + 0.01) / (5 + 3), abs=1e-6)
    assert mae.item() == pytest.approx(-(5 * 0.5 + 0.1) / (5 + 3), abs=1e-6)
    # The decision it changes: unsure where the object is (right or one pixel off, 50/50), drawing it
    # scores the same as erasing it under plain MSE, and better once object pixels weigh 5.
    truth = torch.zeros(1, 1, 2, 2, 3)
    truth[0, 0, 0, 0] = 1.0                       # a white object pixel on black
    small.frames[:, 1:] = (truth * 255).to(small.frames.dtype)
    misplaced, erased = torch.zeros_like(truth), torch.zeros_like(truth)
    misplaced[0, 0, 1, 1] = 1.0
    for weight, drawing_wins in ((1.0, False), (5.0, True)):
        reward = get_reward("neg_mse", object_weight=weight)
        draw = (reward(_with(rollouts, truth), small) + reward(_with(rollouts, misplaced), small)) / 2
        erase = reward(_with(rollouts, erased), small)
        assert (draw.item() > erase.item() + 1e-6) == drawing_wins, weight
        if not drawing_wins:
            assert draw.item() == pytest.approx(erase.item())
    with pytest.raises(ValueError, match="object_weight is for metric"):
        get_reward("ssim", object_weight=2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        get_reward("neg_mse", object_weight=0.0)
