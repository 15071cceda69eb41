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
from conftest import base_state, split_changes, tiny_grpo_overrides
from safetensors.torch import load_file
from tolerances import assert_close_reordered

from posttrain.grpo import group_advantages, policy_loss
from posttrain.logging_utils import read_metrics
from posttrain.rollouts import prompt_schedule
from posttrain.runner import run_recipe

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


# Per-frame rewards of the 2 prompts x 3 samples x 4 frames handed to grpo_step by the test below.
FRAME_REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                 [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, -2.0]]


class _TRLGRPOStub:
    """The state TRL 1.16's `GRPOTrainer._compute_loss` reads, for calling it without a trainer:
    one process, no gradient accumulation, no vLLM, no entropy bonus/mask, no off-policy mask.
    Its model call is replaced by the given per-token log-probs (what the method computes them from
    is not the point: the loss on top of them is)."""

    def __init__(self, loss_type, epsilon_low, epsilon_high, beta, level, new_logp, completion_length):
        from collections import defaultdict
        from types import SimpleNamespace

        self.loss_type, self.epsilon_low, self.epsilon_high, self.beta = loss_type, epsilon_low, epsilon_high, beta
        self.importance_sampling_level = level
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm, self._entropy_bonus_enabled, self.aux_loss_enabled = False, False, False
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = completion_length
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                           reduce=lambda x, reduction: x, sync_gradients=True)
        self._metrics = defaultdict(lambda: defaultdict(list))
        self._new_logp = new_logp

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._new_logp, torch.zeros_like(self._new_logp), None


TRL_GRPO_CASES = [  # (our loss_type, TRL loss_type, TRL importance_sampling_level, eps low, eps high, kl coef)
    ("grpo", "grpo", "token", 0.2, 0.28, 0.0),
    ("dr_grpo", "dr_grpo", "token", 0.2, 0.28, 0.0),
    ("dapo", "dapo", "token", 0.2, 0.28, 0.0),
    ("grpo", "grpo", "token", 0.1, 0.15, 0.04),
    ("gspo", "grpo", "sequence", 3e-4, 4e-4, 0.0),  # GSPO: TRL's sequence-level ratio, grpo normalisation
]


@pytest.mark.parametrize("ours, trl_type, level, eps_low, eps_high, kl_coef, per_frame", [
    (*case, per_frame) for case in TRL_GRPO_CASES for per_frame in (False, True)
    if not (per_frame and case[0] == "gspo")  # gspo takes one advantage per rollout
], ids=lambda v: v if isinstance(v, str) else None)
def test_policy_loss_matches_trl_compute_loss(ours, trl_type, level, eps_low, eps_high, kl_coef, per_frame):
    """`policy_loss` against TRL 1.16's own `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py),
    called on a stub trainer (`_TRLGRPOStub`) with the same per-token log-probs: loss value, gradient
    with respect to the new log-probs, and the clipped-region fraction (TRL's clip_ratio/region_mean).
    Log-ratios are spread wide (std 0.4), so many tokens fall outside [1 - eps_low, 1 + eps_high] on
    the side of their advantage's sign: there the gradient must be exactly zero. All sequences are
    valid and have the same length, where grpo, dr_grpo and dapo normalisations coincide (grpo.py)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    generator = torch.Generator().manual_seed(0)
    batch, frames, per_frame_tokens = 6, 3, 4
    length = frames * per_frame_tokens
    old = -3 * torch.rand(batch, length, generator=generator, dtype=torch.float64)
    new_leaf = (old + 0.4 * torch.randn(batch, length, generator=generator, dtype=torch.float64)).requires_grad_()
    ref = old + 0.1 * torch.randn(batch, length, generator=generator, dtype=torch.float64)
    if per_frame:
        advantages = torch.randn(batch, frames, generator=generator, dtype=torch.float64)
        token_advantages = advantages.repeat_interleave(per_frame_tokens, dim=1)  # (B, L): what TRL takes
    else:
        advantages = torch.tensor([1.5, -1.0, 0.7, -0.3, 2.0, -2.0], dtype=torch.float64)
        token_advantages = advantages
    valid = torch.ones(batch, dtype=torch.bool)
    loss, stats = policy_loss(new_leaf, old, advantages, valid, ours, eps_low, eps_high, ref_logp=ref, kl_coef=kl_coef)
    (grad,) = torch.autograd.grad(loss, new_leaf)

    trl_leaf = new_leaf.detach().clone().requires_grad_()
    stub = _TRLGRPOStub(trl_type, eps_low, eps_high, kl_coef, level, trl_leaf, length)
    mask = torch.ones(batch, length)
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask,
              "advantages": token_advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    trl_loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_leaf)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-12)
    region = stub._metrics["train"]["clip_ratio/region_mean"][0]
    assert stats["clip_fraction"] / batch == pytest.approx(region, abs=1e-6)
    assert 0.05 < region < 0.95, region  # clipping really happens, and not everywhere
    # Clipped tokens (ratio past the bound on the advantage's side) get no gradient; others do.
    if ours == "gspo":
        ratio = (new_leaf - old).mean(-1, keepdim=True).exp().detach().expand(batch, length)
    else:
        ratio = (new_leaf - old).exp().detach()
    token_advantages = token_advantages if per_frame else token_advantages[:, None].expand(batch, length)
    clipped = ((ratio < 1 - eps_low) & (token_advantages < 0)) | ((ratio > 1 + eps_high) & (token_advantages > 0))
    assert clipped.any() and (~clipped).any()
    if kl_coef == 0:
        assert torch.all(grad[clipped] == 0)
        assert torch.all(grad[~clipped] != 0)


@pytest.mark.parametrize("scale", ["group", "none"])
def test_frame_credit_returns_to_go_and_group_advantages_by_hand(tiny_model_dir, data_cache, tmp_path, monkeypatch,
                                                                 scale):
    """credit=frame through grpo_step, with the per-frame rewards replaced by FRAME_REWARDS.

    Returns-to-go (sum of the rewards from frame f to the end):
      prompt 0: [1,0,0,1] -> [2,1,1,1];  [0,0,1,0] -> [1,1,1,0];  [0,1,0,0] -> [1,1,0,0]
      prompt 1: [0,0,0,0] -> [0,0,0,0];  [0,0,0,2] -> [2,2,2,2];  [0,0,0,-2] -> [-2,-2,-2,-2]
    Per frame, across each prompt's 3 samples: centred = rtg - group mean ("none" stops here),
    "group" divides by (unbiased std + 1e-4):
      prompt 0, frame 0: [2,1,1]: mean 4/3, centred [2/3,-1/3,-1/3], std sqrt((4+1+1)/9/2) = 0.57735
                         -> [1.15450, -0.57725, -0.57725]
                frame 1: [1,1,1]: centred 0 -> 0 (0 / (0 + 1e-4))
                frame 2: [1,1,0]: centred [1/3,1/3,-2/3], std 0.57735 -> [0.57725, 0.57725, -1.15450]
                frame 3: [1,0,0]: like frame 0 -> [1.15450, -0.57725, -0.57725]
      prompt 1, every frame: [0,2,-2]: mean 0, std 2 -> [0, 0.99995, -0.99995]; "none": [0, 2, -2].
    """
    import posttrain.grpo as grpo
    from posttrain.rollouts import RolloutScorer

    totals = torch.tensor(FRAME_REWARDS)

    def hand_rewards(self, frames, episode_index, sample_ids, tokens=None, context=None):
        assert frames.shape[:2] == totals.shape and context is None  # no shared prefix: the true context
        return totals.clone(), {"hand": totals.clone()}, torch.ones(len(totals), dtype=torch.bool), []

    seen = []
    original = grpo.policy_loss

    def recording_loss(new_logp, old_logp, advantages, *args, **kwargs):
        seen.append(advantages.clone())
        return original(new_logp, old_logp, advantages, *args, **kwargs)

    monkeypatch.setattr(RolloutScorer, "score_frames", hand_rewards)
    monkeypatch.setattr(grpo, "policy_loss", recording_loss)
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "frame", steps=1, extra=[
        "credit=frame", f"scale_rewards={scale}", "train.micro_batch_size=6", "train.eval_at_end=false",
        "train.checkpoint_every=0"]))
    assert len(seen) == 1 and seen[0].shape == (6, 4)  # one micro-batch of 6 rollouts x 4 frames
    if scale == "none":
        third = 1 / 3
        expected = [[2 / 3, 0, third, 2 / 3], [-third, 0, third, -third], [-third, 0, -2 / 3, -third],
                    [0, 0, 0, 0], [2, 2, 2, 2], [-2, -2, -2, -2]]
    else:
        big, small, one = 2 / 3 / (0.57735027 + 1e-4), 1 / 3 / (0.57735027 + 1e-4), 2 / (2 + 1e-4)
        expected = [[big, 0, small, big], [-small, 0, small, -small], [-small, 0, -big, -small],
                    [0, 0, 0, 0], [one] * 4, [-one] * 4]
        assert big == pytest.approx(1.15450, abs=1e-5) and small == pytest.approx(0.57725, abs=1e-5)
    torch.testing.assert_close(seen[0], torch.tensor(expected), atol=1e-5, rtol=0)


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


def test_grpo_smoke_only_adapter_changes(tiny_model_dir, data_cache, tmp_path, captured_trainer):
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
    # The base weights are untouched: the trained in-memory policy's base weights equal the file's.
    base = base_state(tiny_model_dir)
    changed, unchanged, adapter_changed = split_changes(captured_trainer["trainer"].policy, base)
    assert unchanged == set(base) and not changed and adapter_changed
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
    for key in full:  # the same batch and loss, two backward passes
        assert_close_reordered(records[0]["full_batch"][key], full[key], msg=f"full batch twice: {key}")
    for key in full:
        assert_close_reordered(one[key], full[key], msg=f"6x1 vs full batch: {key}")
        assert_close_reordered(six[key], full[key], msg=f"1x6 vs full batch: {key}")
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


# Dense credit with the simulator's cell flow: the longest path from rewards to advantages.
DENSE = ["credit=dense", "dense.patch_return=flow", "dense.frame_weight=0.5",
         "rewards=[{name: near_hit, weight: 1.0}, {name: ssim, weight: 0.2}, {name: consistency_3d, weight: 1.0}]"]


@pytest.mark.parametrize("credit", ["frame", "dense"])
def test_sigkill_and_resume_equals_unbroken_run(credit, tiny_model_dir, data_cache, tmp_path):
    unbroken = tmp_path / "unbroken"
    extra = ["train.eval_at_end=false", *(DENSE if credit == "dense" else [])]
    overrides = lambda out: tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=4,  # noqa: E731
                                                extra=extra)
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


def test_branched_groups_share_a_self_generated_prefix_exactly(tiny_model_dir, data_cache, tmp_path, monkeypatch):
    """prefix_frames=2: each prompt's group continues from ONE prefix, the policy's own greedy rollout from the
    true context (step 0: the LoRA policy equals the base), identical token for token across the group; only
    the continuations are scored and trained (num_context = context + prefix), and they differ (T = 1)."""
    from posttrain import rollouts, training
    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.models import load_model

    seen = {}
    original = training.update

    def update(session, tokens, actions, loss_fn, **kwargs):
        seen["update"] = (tokens.clone(), actions.clone(), kwargs["num_context"])
        return original(session, tokens, actions, loss_fn, **kwargs)

    monkeypatch.setattr(training, "update", update)
    out = tmp_path / "branch"
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=1, extra=[
        "prefix_frames=2", "prefix_temperature=0", "horizon=2", "train.eval_at_end=false"]))
    tokens, actions, num_context = seen["update"]
    assert num_context == 4 and tokens.shape[1] == 6
    groups = tokens.view(2, 3, *tokens.shape[1:])  # 2 prompts x group of 3
    for g in groups:
        assert all(torch.equal(g[0, :4], other[:4]) for other in g[1:]), "the group must share its prefix"
        assert not all(torch.equal(g[0, 4:], other[4:]) for other in g[1:]), "continuations are sampled"
    base = load_model(tiny_model_dir).eval()
    episodes = load_episodes(EpisodeDataConfig(seeds="0:8", frames=6, image_size=32, cache_dir=str(data_cache)),
                             ("frames",), progress=False)
    truth = rollouts.encode_episodes(base, episodes["frames"])
    firsts = groups[:, 0]
    for row, first_actions in zip(firsts, actions.view(2, 3, -1)[:, 0]):
        episode = next(e for e in range(len(truth)) if torch.equal(truth[e, :2], row[:2]))
        greedy = base.rollout(row[None, :2], first_actions[None], 2, temperature=0.0, decode=False).tokens[0]
        assert torch.equal(row[2:4], greedy), "the prefix is the policy's own greedy rollout"
        assert not torch.equal(row[2:4], truth[episode, 2:4]), "... not the true frames"
    record = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == 0][0]
    assert record["clip_fraction"] == 0.0  # old log-probs == the update's: the first ratio is exactly 1


def test_monitor_rewards_are_logged_and_never_trained_on(tiny_model_dir, data_cache, tmp_path):
    """`monitor_rewards` (the simulator's reward beside a learned one, for the over-optimisation curve):
    the monitor equal to the trained reward logs the same mean, and adding a monitor changes no weight."""
    import json

    runs = {}
    for name, monitor in (("plain", []), ("same", ["monitor_rewards=[{name: psnr, weight: 1.0}]"]),
                          ("other", ["monitor_rewards=[{name: ssim, weight: 2.0}, {name: object_presence}]"])):
        out = tmp_path / name
        run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=2, extra=[
            "rewards=[{name: psnr, weight: 1.0}]", "train.eval_at_end=false", "train.checkpoint_every=0", *monitor]))
        runs[name] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], _adapter(out))
    for record in runs["same"][0]:
        assert record["monitor_mean"] == pytest.approx(record["reward_mean"], abs=1e-6)
        assert record["monitor/psnr_mean"] == pytest.approx(record["reward/psnr_mean"], abs=1e-6)
    other = runs["other"][0][0]
    assert other["monitor_mean"] == pytest.approx(2 * other["monitor/ssim_mean"] + other["monitor/object_presence_mean"],
                                                  abs=1e-5)
    assert "monitor_mean" not in runs["plain"][0][0]
    for name in ("same", "other"):
        for key, value in runs["plain"][1].items():
            assert torch.equal(value, runs[name][1][key]), (name, key)
        assert [r["reward_mean"] for r in runs[name][0]] == [r["reward_mean"] for r in runs["plain"][0]]


def test_monitor_scorer_shares_the_reference_frame_cache():
    """`with_rewards` builds a scorer of the same episodes whose reference frames come from the first
    scorer's cache: each episode's true future is decoded once, whichever scorer asks first."""
    from posttrain.rewards import RewardSpec
    from posttrain.rollouts import RolloutScorer

    class CountingWorld:
        decoded: list[int] = []

        def decode(self, tokens):  # (E, T, N) -> (E, T, 2, 2, 3), one value per token sum
            self.decoded.append(len(tokens))
            return tokens.float().sum(-1)[..., None, None, None].expand(*tokens.shape[:2], 2, 2, 3)

    world, tokens = CountingWorld(), torch.arange(4 * 3 * 5).view(4, 3, 5)
    trained = RolloutScorer([RewardSpec("psnr")], {}, tokens, world, 1, max_failure_fraction=0.0)
    monitor = trained.with_rewards([RewardSpec("ssim")])
    first = monitor.reference_frames(torch.tensor([2, 0]))
    again = trained.reference_frames(torch.tensor([0, 2, 3]))
    assert world.decoded == [2, 1]   # episodes 0 and 2 once (by the monitor), then only episode 3
    assert torch.equal(again[:2], first.flip(0))
    assert torch.equal(again[2], tokens[3, 1:].float().sum(-1)[:, None, None, None].expand(2, 2, 2, 3))
    assert [s.name for s in monitor.specs] == ["ssim"] and [s.name for s in trained.specs] == ["psnr"]
