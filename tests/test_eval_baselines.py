"""`posttrain eval` against trivial baselines, on a real episode whose answer is known by construction.

The "model" here replays the simulator's true future frames for the first K steps and then draws a
black frame. So its SSIM is exactly 1 up to K and ~0 after, and the useful horizon must be K;
the persistence baseline's metrics are recomputed by hand from the episode.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.evaluate import EvalConfig, evaluate_model, skill_scores, useful_horizon
from posttrain.models import RolloutOutput
from posttrain.rewards import metrics as M
from posttrain.rollouts import EPISODE_FIELDS


class ReplayThenBlack(torch.nn.Module):
    """Knows the truth: returns the episodes' next frames for `good_steps`, then black. evaluate_model
    visits episodes in order, so a cursor tells which episodes each rollout call is for."""

    tokens_per_frame = 1

    def __init__(self, frames: torch.Tensor, good_steps: int):
        super().__init__()
        self.frames, self.good_steps, self.cursor = frames, good_steps, 0  # frames: (E, T, H, W, 3) uint8

    def encode(self, frames):
        return torch.zeros(*frames.shape[:2], 1, dtype=torch.long)

    def rollout(self, context, actions, horizon, **_):
        batch, start = len(context), context.shape[1]
        frames = self.frames[self.cursor: self.cursor + batch, start: start + horizon].float() / 255
        frames[:, self.good_steps:] = 0
        self.cursor += batch
        return RolloutOutput(tokens=torch.zeros(batch, horizon, 1, dtype=torch.long),
                             logprobs=torch.zeros(batch, horizon, 1), frames=frames)


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    config = EpisodeDataConfig(seeds="0:3", frames=10, image_size=32, workers=1,
                               cache_dir=str(tmp_path_factory.mktemp("eval-episodes")))
    return load_episodes(config, EPISODE_FIELDS, progress=False)


def test_baselines_skill_and_useful_horizon_on_a_known_answer(episodes):
    good = 3
    model = ReplayThenBlack(episodes["frames"], good)
    config = EvalConfig(data=EpisodeDataConfig(seeds="0:3"), num_context=2, horizon=8, temperature=0.0)
    report = evaluate_model(model, episodes, config, progress=False)
    assert report["ssim_per_step"][:good] == [1.0] * good
    assert report["object_presence_per_step"][:good] == [1.0] * good
    assert report["useful_horizon"] == good
    # Persistence: the last context frame against each true future frame, by hand.
    truth = episodes["frames"][:, 2:10].float() / 255
    last = (episodes["frames"][:, 1:2].float() / 255).expand_as(truth)
    by_hand = M.mse(last, truth).mean(0)
    assert report["baselines"]["persistence"]["mse_per_step"] == pytest.approx(by_hand.tolist(), abs=1e-6)
    # Mean image: without a model folder, the mean of the evaluated frames (and it says so).
    mean = episodes["frames"].float().mean((0, 1)) / 255
    assert report["baselines"]["mean_image"]["mse_mean"] == pytest.approx(
        float(M.mse(mean.expand_as(truth), truth).mean()), abs=1e-6)
    assert "evaluated episodes" in report["baselines"]["mean_image"]["source"]
    skill = report["skill"]["persistence"]
    base = report["baselines"]["persistence"]
    assert skill["mse"] == pytest.approx(1 - report["mse_mean"] / base["mse_mean"], abs=1e-5)
    assert skill["ssim"] == pytest.approx((report["ssim_mean"] - base["ssim_mean"]) / (1 - base["ssim_mean"]),
                                          abs=1e-5)
    json.dumps(report)  # the report is plain JSON


def test_useful_horizon_stops_at_the_first_loss():
    assert useful_horizon([0.9, 0.8, 0.5, 0.9], [0.5, 0.5, 0.6, 0.1], [0.2, 0.2, 0.2, 0.2]) == 2
    assert useful_horizon([0.1, 0.9], [0.5, 0.5]) == 0
    assert useful_horizon([0.5, 0.5], [0.5, 0.1]) == 0, "a tie is not a win"


def test_skill_scores_by_hand():
    model = {"mse_mean": 0.01, "psnr_mean": 22.0, "ssim_mean": 0.8}
    base = {"mse_mean": 0.04, "psnr_mean": 16.0, "ssim_mean": 0.6}
    assert skill_scores(model, base) == {"mse": 0.75, "psnr_db": 6.0, "ssim": 0.5}


def test_long_horizons_roll_past_the_attention_window(tiny_model_dir, tmp_path):
    """32 predicted frames from a model whose window is 4 frames: the KV cache slides."""
    from posttrain.cli import main

    out = tmp_path / "long.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--seeds", "0:2", "--size", "32", "--horizon", "32",
                 "--temperature", "0", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["horizon"] == 32 and len(report["ssim_per_step"]) == 32
    assert len(report["baselines"]["persistence"]["ssim_per_step"]) == 32
    assert 0 <= report["useful_horizon"] <= 32
