"""The reward-model recipe end to end on a tiny world model; the saved model loads as reward `learned`."""

from __future__ import annotations

import json
import math

import torch
from conftest import tiny_overrides

from posttrain.rewards import RolloutBatch, get_reward
from posttrain.runner import run_recipe


def test_recipe_writes_a_loadable_learned_reward(tiny_model, data_cache, tmp_path):
    out = tmp_path / "rm"
    path = run_recipe("recipes/reward_model.yaml", tiny_overrides(tiny_model, data_cache, out, eval_section="") + [
        "horizon=4", "group_size=3", "reward_model.steps=10", "reward_model.batch_size=8"])
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] + report["skipped_ties"] + report["skipped_invalid"] == report["prompts"] == 8
    assert report["n_train"] + report["n_heldout"] == report["pairs"] and report["n_heldout"] >= 1
    assert 0.0 <= report["heldout_accuracy"] <= 1.0 and math.isfinite(report["train_loss"])
    assert report["use_in_a_recipe"] == {"name": "learned", "params": {"path": str(path)}}
    reward = get_reward("learned", path=str(path))
    frames = torch.rand(3, 4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    scores = reward(RolloutBatch(frames=frames, num_context=2, context=frames[:, :2]), None)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert len(set(scores.tolist())) > 1  # a real model, not a constant
