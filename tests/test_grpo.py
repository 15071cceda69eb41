"""GRPO: the loss worked out by hand, advantages, and the trainer end to end on a tiny model."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_grpo_overrides
from safetensors.torch import load_file

from posttrain.grpo import policy_loss
from posttrain.runner import run_recipe
from posttrain.trainer_utils import group_advantages, prompt_schedule

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "grpo_tabletop.yaml"
LOG = [[math.log(1.1), math.log(0.5)], [math.log(1.5), 0.0]]


def test_clipped_loss_by_hand():
    """ratios [[1.1, 0.5], [1.5, 1.0]], advantages [1, -1], eps 0.2/0.28:
    seq 0: min(1.1, 1.1) = 1.1 and min(0.5, 0.8) = 0.5 -> loss -(1.1 + 0.5)/2 = -0.8
    seq 1: min(-1.5, -1.28) = -1.5 and -1 -> loss (1.5 + 1)/2 = 1.25;  mean = 0.225.
    No token is clipped in the gradient-stopping sense (ratio > 1.28 only where A < 0)."""
    new, old = torch.tensor(LOG), torch.zeros(2, 2)
    loss, stats = policy_loss(new, old, torch.tensor([1.0, -1.0]), torch.tensor([True, True]), "grpo", 0.2, 0.28)
    assert loss.item() == pytest.approx(0.225, abs=1e-6)
    assert stats["clip_fraction"] == 0.0


def test_k3_kl_by_hand():
    """k3 = exp(ref - new) - (ref - new) - 1 with ref = 0: new = log 1.1 -> 0.004410, log 0.5 -> 0.306853,
    log 1.5 -> 0.072132, 0 -> 0; with kl_coef 0.1 the loss grows by 0.1 * mean of per-sequence means
    = 0.1 * ((0.004410 + 0.306853) / 2 + 0.072132 / 2) / 2 = 0.009585."""
    new, old = torch.tensor(LOG), torch.zeros(2, 2)
    loss, stats = policy_loss(new, old, torch.tensor([1.0, -1.0]), torch.tensor([True, True]), "grpo", 0.2, 0.28,
                              ref_logp=torch.zeros(2, 2), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.225 + 0.009585, abs=1e-5)
    assert stats["kl"] == pytest.approx((0.155632 + 0.036066), abs=1e-5)


def test_gspo_sequence_ratio_by_hand():
    """Sequence ratios sqrt(1.1 * 0.5) = 0.74162 (A=1: min(0.74162, 0.8)) and sqrt(1.5) = 1.22474
    (A=-1: inside the clip range) -> loss (-0.74162 + 1.22474) / 2 = 0.24156."""
    new, old = torch.tensor(LOG), torch.zeros(2, 2)
    loss, _ = policy_loss(new, old, torch.tensor([1.0, -1.0]), torch.tensor([True, True]), "gspo", 0.2, 0.28)
    assert loss.item() == pytest.approx(0.24156, abs=1e-5)


def test_per_frame_advantages_by_hand():
    """One token per frame, advantages [[1, -1], [-1, 1]]:
    seq 0: A=1, r=1.1 -> -1.1;  A=-1, r=0.5 -> -min(-0.5, -0.8) = 0.8;  mean -0.15
    seq 1: A=-1, r=1.5 -> -min(-1.5, -1.28) = 1.5;  A=1, r=1 -> -1;  mean 0.25;  loss 0.05.
    Constant per-frame advantages reproduce the per-sequence loss (0.225)."""
    new, old, valid = torch.tensor(LOG), torch.zeros(2, 2), torch.tensor([True, True])
    loss, _ = policy_loss(new, old, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), valid, "grpo", 0.2, 0.28)
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    same, _ = policy_loss(new, old, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), valid, "grpo", 0.2, 0.28)
    assert same.item() == pytest.approx(0.225, abs=1e-6)
    with pytest.raises(ValueError, match="gspo"):
        policy_loss(new, old, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), valid, "gspo", 0.2, 0.28)


def test_invalid_samples_are_masked_not_zeroed():
    new, old = torch.tensor(LOG), torch.zeros(2, 2)
    loss, stats = policy_loss(new, old, torch.tensor([1.0, -1.0]), torch.tensor([True, False]), "grpo", 0.2, 0.28)
    assert loss.item() == pytest.approx(-0.8, abs=1e-6)  # only sequence 0, normalised by one sequence
    assert stats["valid"] == 1


def test_group_advantages_match_trl_formula():
    """TRL: (r - mean_g) / (std_g + 1e-4) with the unbiased std; Dr. GRPO: r - mean_g."""
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 2.0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, valid, "group"), expected)
    torch.testing.assert_close(group_advantages(rewards, valid, "none"), rewards - rewards.mean(1, keepdim=True))
    # An invalid sample is left out of its group's statistics and gets advantage 0.
    valid[0, 2] = False
    masked = group_advantages(rewards, valid, "none")
    torch.testing.assert_close(masked[0], torch.tensor([-0.5, 0.5, 0.0]))


def test_prompt_schedule_is_a_pure_function_of_step():
    a = prompt_schedule(10, 4, 2, seed=0)
    assert torch.equal(a, prompt_schedule(10, 4, 2, seed=0))
    seen = torch.cat([prompt_schedule(10, 5, step, seed=0) for step in range(2)])
    assert sorted(seen.tolist()) == list(range(10))  # one epoch covers every prompt once


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_grpo_smoke_only_adapter_changes(tiny_model_dir, data_cache, tmp_path):
    from posttrain.models import load_model

    out = tmp_path / "run"
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=2,
                                           extra=["train.eval_at_end=true", "train.video_every=1", "credit=frame"]))
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    import json

    record = json.loads(records[-1])
    for key in ("reward_mean", "reward/neg_mse_mean", "reward/consistency_3d_mean", "kl", "clip_fraction",
                "entropy_mc", "time_share_generate", "time_share_score", "time_share_update", "lr"):
        assert key in record and record[key] is not None and math.isfinite(record[key]), key
    adapter = _adapter(out)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items()), "LoRA B must have moved from 0"
    # The base weights are untouched: the adapter-disabled model equals the base on disk.
    from peft import PeftModel

    base = load_model(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir), str(out / "adapter"))
    base_params = dict(base.named_parameters())
    compared = 0
    for name, param in reloaded.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_params[name.replace(".base_layer", "")]), name
            compared += 1
    assert compared == len(base_params)
    for name in ("metrics.json", "reward_curve.png", "per_step_mse.png", "rollout.gif", "index.html"):
        assert (out / "report" / name).is_file(), name
    assert list((out / "videos").glob("*.gif"))


def test_accumulation_1x6_equals_6x1(tiny_model_dir, data_cache, tmp_path, monkeypatch):
    """Gradients, not weights: one AdamW step from LoRA B = 0 is lr * sign(grad), blind to any
    constant rescaling of the gradient (see tests/grad_capture.py). The gradient the optimizer
    receives (before clipping) must be the same with 6 micro-batches of 1 and 1 micro-batch of 6,
    and equal to ONE backward of the step's loss over the whole batch."""
    import grad_capture

    records, weights = [], []
    grad_capture.install(records, full_batch=True, patch=monkeypatch.setattr)
    for micro in (1, 6):
        out = tmp_path / f"micro{micro}"
        run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=1,
                                               extra=[f"train.micro_batch_size={micro}", "train.eval_at_end=false"]))
        weights.append(_adapter(out))
    assert len(records) == 2  # one update per run
    one, six, full = records[0]["step_grads"], records[1]["step_grads"], records[1]["full_batch"]
    assert any("lora_B" in k and v.abs().max() > 1e-4 for k, v in full.items()), "no gradient reached LoRA B"
    torch.testing.assert_close(records[0]["full_batch"], full, atol=1e-7, rtol=1e-5)  # the same batch and loss
    for key in full:
        torch.testing.assert_close(one[key], full[key], atol=1e-6, rtol=1e-4, msg=f"6x1 vs full batch: {key}")
        torch.testing.assert_close(six[key], full[key], atol=1e-6, rtol=1e-4, msg=f"1x6 vs full batch: {key}")
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=2e-6, rtol=1e-4)


def test_trivially_learnable_reward_goes_up(tiny_model_dir, data_cache, tmp_path):
    """Reward = share of generated tokens equal to id 0: GRPO must learn to emit more of them."""
    import json

    from posttrain.rewards import register_reward

    @register_reward("test_token_zero")
    def token_zero(rollouts, episodes):
        return (rollouts.tokens == 0).float().mean(dim=(1, 2))

    out = tmp_path / "bright"
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=12, extra=[
        "rewards=[{name: test_token_zero, weight: 1.0}]", "train.lr=0.01", "train.eval_at_end=false",
        "train.checkpoint_every=0", "group_size=4", "prompts_per_step=4", "lora.r=8"]))
    rewards = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[-3:]) / 3 > 1.25 * sum(rewards[:3]) / 3, rewards  # measured: 0.072 -> 0.104


def test_sigkill_and_resume_equals_unbroken_run(tiny_model_dir, data_cache, tmp_path):
    unbroken = tmp_path / "unbroken"
    overrides = lambda out: tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=4,  # noqa: E731
                                                extra=["train.eval_at_end=false"])
    run_recipe(RECIPE, overrides(unbroken))
    killed = tmp_path / "killed"
    # Killed from inside, right after checkpoint step-000001 is committed: no timer to race.
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "POSTTRAIN_FAULT": "after_checkpoint:1"}
    command = [sys.executable, "-m", "posttrain", "run", str(RECIPE), *overrides(killed)]
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.returncode
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert not (killed / "adapter").exists(), "the run should have died before finishing"
    run_recipe(RECIPE, overrides(killed), resume=True)
    a, b = _adapter(unbroken), _adapter(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) >= 4


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, data_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "none"), resume=True)
