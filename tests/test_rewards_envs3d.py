"""consistency_3d, loop_closure and object_permanence scored on REAL envs3d episodes (PyBullet
renders, its depth, poses and segmentation), not on rewards.synthetic's hand-built scenes:
the true future frames score best, and each corruption (drifting shift, colour noise, a wrong
frame order, an object painted over with the surrounding floor colour, a loop that does not
close) scores worse on every episode.

Measured on these episodes (64x64, 7 frames, context 1): consistency_3d of the truth is
-0.01..-0.05 (texture resampling and occlusion edges), noise 0.1 gives ~-0.11, reversed
frames -0.03..-0.22; object_permanence of the truth 0.70..0.98.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from posttrain.envs3d import SceneConfig, generate_episode
from posttrain.rewards import RolloutBatch, get_reward
from posttrain.rewards.synthetic import noise_frames, shift_frames
from posttrain.rewards.types import EpisodeBatch
from posttrain.rollouts import EPISODE_FIELDS

SIZE, FRAMES, CONTEXT, SEEDS = 64, 7, 1, range(4)


def _batch(episodes: list[dict]) -> EpisodeBatch:
    """Stack envs3d episode dicts into the EpisodeBatch the rewards read (as the trainers do)."""
    fields = {}
    for name in EPISODE_FIELDS:
        values = [episode[name] for episode in episodes]
        fields[name] = torch.as_tensor(np.stack(values)) if isinstance(values[0], np.ndarray) else torch.tensor(values)
    return EpisodeBatch(**fields)


def _truth(episodes: EpisodeBatch) -> RolloutBatch:
    """The simulator's own future frames as the rollout: what a perfect world model would produce."""
    frames = episodes.frames.float() / 255
    return RolloutBatch(frames=frames[:, CONTEXT:], num_context=CONTEXT, context=frames[:, :CONTEXT])


def _with(rollouts: RolloutBatch, frames: torch.Tensor) -> RolloutBatch:
    return dataclasses.replace(rollouts, frames=frames)


def _drift(frames: torch.Tensor) -> torch.Tensor:
    """Generated frame t shifted by t + 1 pixels: content that slides against the camera motion."""
    return torch.stack([shift_frames(frames[:, t], t + 1) for t in range(frames.shape[1])], dim=1)


def _paint_over(rollouts: RolloutBatch, episodes: EpisodeBatch, obj: int) -> torch.Tensor:
    """Object `obj` (0-based) erased from every generated frame: its segmentation pixels get the
    mean colour of the non-object pixels in a 3-pixel ring around it (the floor it stands on)."""
    frames = rollouts.frames.clone()
    seg = episodes.segmentation[:, CONTEXT:]
    kernel = torch.ones(1, 1, 7, 7)
    for b in range(frames.shape[0]):
        for t in range(frames.shape[1]):
            mask = seg[b, t] == obj + 1
            if not mask.any():
                continue
            grown = torch.nn.functional.conv2d(mask[None, None].float(), kernel, padding=3)[0, 0] > 0
            ring = grown & (seg[b, t] == 0)
            frames[b, t][mask] = frames[b, t][ring].mean(0)
    return frames


@pytest.fixture(scope="module")
def walk():
    """Camera-moving episodes (random walk) with their objects; no pushes, so only the camera moves."""
    episodes = _batch([generate_episode(seed, FRAMES, SceneConfig(image_size=SIZE, policy="random_walk"))
                       for seed in SEEDS])
    return episodes, _truth(episodes)


@pytest.fixture(scope="module")
def loops():
    """Scripted exact loops: the last frame is the first one again."""
    episodes = _batch([generate_episode(seed, FRAMES, SceneConfig(image_size=SIZE, policy="loop")) for seed in SEEDS])
    return episodes, _truth(episodes)


def test_consistency_3d_truth_beats_corruptions(walk):
    episodes, truth = walk
    assert (episodes.actions != 0).any(dim=1).all(), "every episode must move the camera"
    reward = get_reward("consistency_3d")
    result = reward.evaluate(truth, episodes)
    best = result.reward
    assert torch.isfinite(best).all() and (best > -0.06).all(), best  # measured -0.013..-0.041
    assert (result.extras["covisible_fraction"] > 0.5).all()
    frames = truth.frames
    swapped = frames.clone()
    swapped[:, [1, 2]] = frames[:, [2, 1]]
    for name, corrupted in {"noise": noise_frames(frames, 0.1), "drift": _drift(frames),
                            "reversed": frames.flip(1), "two frames swapped": swapped}.items():
        worse = reward(_with(truth, corrupted), episodes)
        assert (worse < best).all(), (name, best, worse)


def test_consistency_3d_with_context_on_real_episodes(walk):
    """include_context (what credit=frame uses): pair (last true context frame, first generated) too."""
    episodes, truth = walk
    reward = get_reward("consistency_3d", include_context=True)
    best = reward(truth, episodes)
    first_wrong = truth.frames.clone()
    first_wrong[:, 0] = shift_frames(first_wrong[:, 0], 3)
    assert torch.isfinite(best).all() and (best > -0.06).all()
    assert (reward(_with(truth, first_wrong), episodes) < best).all()


def test_loop_closure_on_real_loops(loops, walk):
    episodes, truth = loops
    assert episodes.is_loop.all()
    reward = get_reward("loop_closure")
    result = reward.evaluate(truth, episodes)
    assert result.mask.all() and result.success.all()
    assert torch.equal(result.reward, torch.zeros(len(SEEDS)))  # renders are byte-identical at the loop's end
    frames = truth.frames
    late = frames.clone()
    late[:, -1] = frames[:, -2]  # the loop stops one move short
    for name, corrupted in {"noise": noise_frames(frames, 0.05), "shifted last frame": _drift(frames),
                            "reversed": frames.flip(1), "one move short": late}.items():
        got = reward.evaluate(_with(truth, corrupted), episodes)
        assert (got.reward < 0).all() and not got.success.any(), (name, got.reward)
    # A random walk is no loop: masked out, exactly 0, whatever the frames.
    other, other_truth = walk
    result = reward.evaluate(_with(other_truth, noise_frames(other_truth.frames, 0.3)), other)
    assert not result.mask.any() and torch.equal(result.reward, torch.zeros(len(SEEDS)))


def test_object_permanence_truth_beats_corruptions(walk):
    episodes, truth = walk
    reward = get_reward("object_permanence")
    result = reward.evaluate(truth, episodes)
    best = result.reward
    assert result.mask.all() and (best > 0.6).all(), best  # measured 0.70..0.98
    # The colour blob sits where K and world_to_camera project the object centre: measured 0.006..0.024
    # of the diagonal (<= 2 px); with the poses of the wrong steps (one move off) it is 0.04..0.07.
    assert (result.extras["centroid_error"] < 0.03).all(), result.extras["centroid_error"]
    frames = truth.frames
    for name, corrupted in {"noise": noise_frames(frames, 0.1), "drift": _drift(frames),
                            "reversed": frames.flip(1)}.items():
        worse = reward(_with(truth, corrupted), episodes)
        assert (worse < best).all(), (name, best, worse)


def test_object_permanence_notices_an_object_painted_over_with_the_floor(walk):
    episodes, truth = walk
    reward = get_reward("object_permanence")
    before = reward.evaluate(truth, episodes)
    generated_visible = episodes.object_visible[:, CONTEXT:]  # (B, T, 6)
    for obj in range(3):
        seen = generated_visible[:, :, obj].any(dim=1)  # episodes where object `obj` shows at all
        if not seen.any():
            continue
        after = reward.evaluate(_with(truth, _paint_over(truth, episodes, obj)), episodes)
        assert (after.extras["presence"][seen] < before.extras["presence"][seen]).all(), obj
        assert (after.reward[seen] < before.reward[seen]).all(), obj
        # Episodes where it never shows are unaffected.
        assert torch.equal(after.reward[~seen], before.reward[~seen])
    # Erasing every object leaves no colour-matching pixel: presence collapses.
    erased = truth
    for obj in range(6):
        erased = _with(erased, _paint_over(erased, episodes, obj))
    result = reward.evaluate(erased, episodes)
    assert (result.extras["presence"] < 0.25).all() and not result.success.any(), result.extras["presence"]


def test_object_presence_is_one_for_the_truth_and_zero_for_blur_toward_the_floor(walk):
    """The eval's object-presence metric as a reward: the truth keeps every interior pixel (1.0
    exactly), an object painted over with its floor colour drops out of the per-frame mean, and the
    mean image of a frame (the limit of blur) keeps almost nothing - unlike -MSE, which it beats."""
    episodes, truth = walk
    reward = get_reward("object_presence")
    result = reward.evaluate(truth, episodes)
    seen = result.mask
    assert seen.any()
    assert torch.equal(result.reward[seen], torch.ones(int(seen.sum())))
    assert torch.equal(result.reward[~seen], torch.zeros(int((~seen).sum())))
    # With object 1 erased, the score drops below 1 exactly on the episodes where object 1 shows.
    erased = _with(truth, _paint_over(truth, episodes, 0))
    after = reward.evaluate(erased, episodes).reward
    shows = (episodes.segmentation[:, CONTEXT:] == 1).flatten(1).any(1)
    assert (after[shows & seen] < 1).all() and torch.equal(after[~shows & seen], result.reward[~shows & seen])
    flat = truth.frames.mean(dim=(2, 3), keepdim=True).expand_as(truth.frames)  # each frame's mean colour
    blurred = reward.evaluate(_with(truth, flat), episodes).reward
    assert (blurred[seen] < 0.3).all(), blurred
    # Aggregates: 'last' scores the last frame that shows an object; 'discounted' stays in [0, 1].
    assert torch.equal(get_reward("object_presence", aggregate="last").evaluate(truth, episodes).reward, result.reward)
    with pytest.raises(ValueError, match="aggregate"):
        get_reward("object_presence", aggregate="median").evaluate(truth, episodes)
