"""Registry, composition, failure isolation and the process pool."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from posttrain.rewards import (
    RewardFailureError,
    RewardSpec,
    UnknownRewardError,
    compose,
    get_reward,
    list_rewards,
    register_reward,
)
from posttrain.rewards.synthetic import make_episodes, noise_frames, truth_rollouts


@register_reward("test_fails_on_seed")
def fails_on_seed(rollouts, episodes, bad_seeds=(), mode="raise"):
    """Raises (or returns NaN/inf) for samples whose episode seed is in bad_seeds."""
    out = -rollouts.frames.mean(dim=(1, 2, 3, 4))
    bad = torch.tensor([int(s) in bad_seeds for s in episodes.seed])
    if bad.any():
        if mode == "raise":
            raise RuntimeError(f"boom on seeds {episodes.seed[bad].tolist()}")
        out = torch.where(bad, torch.tensor(float("nan") if mode == "nan" else float("inf")), out)
    return out


@pytest.fixture(scope="module")
def batch():
    episodes = make_episodes(range(100, 108), num_steps=5)
    gt = truth_rollouts(episodes, num_context=1)
    rollouts = dataclasses.replace(
        gt, frames=noise_frames(gt.frames, 0.05), sample_ids=torch.arange(8) % 2
    )
    return rollouts, episodes


def test_registry_lists_and_suggests():
    names = list_rewards()
    for n in ["fidelity", "psnr", "ssim", "neg_mse", "neg_mae", "consistency_3d", "loop_closure",
              "object_permanence", "object_presence", "stability", "color_drift", "hf_noise", "frozen_frames",
              "learned"]:
        assert n in names
    with pytest.raises(UnknownRewardError, match=r"unknown reward 'consistency3d'; did you mean 'consistency_3d'"):
        get_reward("consistency3d")
    with pytest.raises(TypeError, match="'psnr': bad parameters"):
        get_reward("psnr", nonsense=1)


@pytest.mark.parametrize("mode", ["raise", "nan", "inf"])
def test_failure_isolated_and_logged(batch, mode, caplog):
    rollouts, episodes = batch
    comp = compose(
        [RewardSpec("psnr", 0.5), RewardSpec("test_fails_on_seed", 2.0, {"bad_seeds": (103,), "mode": mode})],
        chunk_size=8,
    )
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        out = comp(rollouts, episodes)
    assert out.valid.tolist() == [i != 3 for i in range(8)]
    assert torch.isnan(out.total[3])  # masked, not silently zeroed
    good = out.valid
    psnr = get_reward("psnr")(rollouts, episodes)
    other = -rollouts.frames.mean(dim=(1, 2, 3, 4))
    assert torch.allclose(out.total[good], (0.5 * psnr + 2.0 * other)[good], rtol=1e-5)
    assert torch.allclose(out.components["psnr"], psnr, rtol=1e-5)  # the healthy reward is kept whole
    [f] = out.failures
    assert (f.sample_index, f.prompt_id, f.sample_id, f.reward_name) == (3, 103, 1, "test_fails_on_seed")
    assert ("boom" in f.reason) if mode == "raise" else (mode in f.reason)
    assert "sample 3 (prompt seed 103" in caplog.text


def test_threshold_raises(batch):
    rollouts, episodes = batch
    comp = compose([RewardSpec("test_fails_on_seed", params={"bad_seeds": (100, 101, 102)})],
                   max_failure_fraction=0.25)
    with pytest.raises(RewardFailureError, match="3/8 samples failed") as info:
        comp(rollouts, episodes)
    assert info.value.output.valid.sum() == 5
    # Two of eight is within the threshold.
    out = compose([RewardSpec("test_fails_on_seed", params={"bad_seeds": (100, 101)})])(rollouts, episodes)
    assert out.valid.sum() == 6


def test_duplicate_keys_need_key(batch):
    with pytest.raises(ValueError, match="duplicate"):
        compose([RewardSpec("psnr"), RewardSpec("psnr")])
    rollouts, episodes = batch
    out = compose([RewardSpec("fidelity", params={"metric": "mae"}, key="mae"),
                   RewardSpec("fidelity", params={"metric": "ssim"}, key="ssim")])(rollouts, episodes)
    assert set(out.components) == {"mae", "ssim"}


def test_workers_byte_identical(batch):
    rollouts, episodes = batch
    specs = [RewardSpec("ssim"), RewardSpec("consistency_3d", 0.5), RewardSpec("stability", 0.1),
             RewardSpec("object_permanence"), RewardSpec("test_fails_on_seed", params={"bad_seeds": (105,)})]
    one = compose(specs, workers=1, chunk_size=4)(rollouts, episodes)
    with compose(specs, workers=2, chunk_size=4) as comp:
        two = comp(rollouts, episodes)
    assert np.array_equal(one.total.numpy(), two.total.numpy(), equal_nan=True)
    for k in one.components:
        assert one.components[k].numpy().tobytes() == two.components[k].numpy().tobytes(), k
    assert [dataclasses.astuple(f) for f in one.failures] == [dataclasses.astuple(f) for f in two.failures]
