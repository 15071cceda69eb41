"""GRPO-family post-training of a world model with simulator-verified rewards.

    posttrain run recipes/grpo_tabletop.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m posttrain run recipes/grpo_tabletop.yaml

One step: take `prompts_per_step` prompts (context frames + action sequence of an envs3d
episode), sample `group_size` rollouts each from the current policy, score them with the
recipe's rewards against the simulator, normalise rewards within each group, and take
`num_updates` clipped policy-gradient passes over the batch (gradient accumulation over
micro-batches), optionally with a k3 KL penalty to the reference (the same network with
the LoRA adapter disabled: no second copy in memory).

Where this departs from the papers:
- A "completion" is a rollout of `horizon` frames x N tokens, all of fixed length. So the
  grpo (per-sequence mean), dapo (token-level) and dr_grpo (constant normaliser) loss
  normalisations coincide here; the variants differ in advantage scaling
  (`scale_rewards`: "group" std for grpo/dapo, "none" for Dr. GRPO) and in gspo's
  sequence-level ratio exp(mean_t(log pi - log pi_old)) clipped per sequence.
- Old log-probs are the ones returned at sampling time (exactly what `score` gives for
  the same tokens), so no extra forward pass is spent on them.
- Samples whose reward failed are masked out of the update and counted (never zeroed).
- The entropy logged is a Monte-Carlo estimate: minus the mean log-prob of sampled tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from posttrain.adapters import LoraSettings
from posttrain.data import EpisodeDataConfig
from posttrain.evaluate import EvalConfig, rollout_seed
from posttrain.rewards import RewardSpec
from posttrain.trainer_utils import (
    Trainer,
    TrainerSettings,
    group_advantages,
    prompt_schedule,
)


@dataclass
class GRPOConfig:
    """GRPO recipe: model, data, sampling, loss, optimisation, rewards, logging, evaluation."""

    method: str = "grpo"
    """Recipe kind (fixed)."""
    out: str = "runs/grpo"
    """Run folder (metrics.jsonl, checkpoints/, adapter/, report/)."""
    model: str = "default"
    """Base model: 'default' (embedded) or a save_pretrained folder."""
    seed: int = 0
    """Seed for the prompt order and every rollout's sampling seed."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="10000:10512", frames=14))
    """Training episodes (prompts); frames must equal num_context + horizon."""
    num_context: int = 2
    """True context frames per prompt."""
    horizon: int = 12
    """Frames generated per rollout."""
    group_size: int = 4
    """Rollouts per prompt (G)."""
    prompts_per_step: int = 8
    """Prompts per step (split across processes)."""
    steps: int = 100
    """Optimizer steps (each with num_updates passes over fresh rollouts)."""
    temperature: float = 1.0
    """Sampling temperature for rollouts (and for the log-probs in the loss)."""
    top_k: int | None = None
    """Optional top-k truncation while sampling."""
    top_p: float | None = None
    """Optional top-p truncation while sampling."""
    loss_type: str = "grpo"
    """grpo | dr_grpo | dapo | gspo."""
    scale_rewards: str = "group"
    """Advantage scaling: group (divide by the group's std, GRPO) | none (mean only, Dr. GRPO)."""
    epsilon_low: float = 0.2
    """Lower clip: ratios below 1 - epsilon_low stop the gradient for negative advantages."""
    epsilon_high: float = 0.28
    """Upper clip (DAPO's clip-higher); gspo uses sequence ratios and wants ~3e-4/4e-4."""
    kl_coef: float = 0.0
    """k3 KL penalty to the reference; 0 skips the reference pass entirely."""
    num_updates: int = 1
    """Policy passes per batch of rollouts (with stored old log-probs)."""
    credit: str = "rollout"
    """rollout: one reward per rollout, one advantage for all its tokens (GRPO) | frame: per-frame
    rewards, and each frame's tokens get the group-normalised return-to-go from that frame on."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="psnr", weight=1.0)])
    """Weighted rewards (see `posttrain.rewards.list_rewards()`)."""
    max_failure_fraction: float = 0.25
    """Stop the run when more than this share of a batch's samples fail reward evaluation."""
    reward_workers: int = 1
    """Processes scoring rewards (1 is fastest on 2 cores; see benchmarks/results/rewards_cpu.json)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (enabled=False trains the full dynamics transformer)."""
    train: TrainerSettings = field(default_factory=TrainerSettings)
    """Optimiser, precision, micro-batching, checkpoints and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of base vs post-trained at the end (temperatures in `eval_temperatures`)."""
    eval_temperatures: list[float] = field(default_factory=lambda: [1.0, 0.0])
    """Temperatures for the final base-vs-post-trained comparison (0 = greedy)."""
    resume: bool = False
    """Continue from the newest checkpoint in `out` (set by `posttrain run --resume`)."""
    overwrite: bool = False
    """Replace a finished or failed run in `out` (set by `posttrain run --overwrite`; only a folder
    holding this toolkit's run marker is ever deleted)."""

    def __post_init__(self) -> None:
        from posttrain.config import require
        from posttrain.data import check_held_out

        require(self, positive=("num_context", "horizon", "prompts_per_step", "steps", "num_updates",
                                "reward_workers", "top_k"),
                non_negative=("temperature", "epsilon_low", "epsilon_high", "kl_coef"),
                unit=("max_failure_fraction", "top_p"))
        if any(not t >= 0 for t in self.eval_temperatures):
            raise ValueError(f"eval_temperatures={self.eval_temperatures} must be >= 0")
        check_held_out(self.data, self.eval.data)
        if self.loss_type not in ("grpo", "dr_grpo", "dapo", "gspo"):
            raise ValueError(f"loss_type={self.loss_type!r}; choose grpo, dr_grpo, dapo or gspo")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; choose group or none")
        if self.data.frames != self.num_context + self.horizon:
            raise ValueError(f"data.frames={self.data.frames} must equal num_context + horizon = "
                             f"{self.num_context + self.horizon}")
        if self.credit not in ("rollout", "frame"):
            raise ValueError(f"credit={self.credit!r}; choose rollout or frame")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2 (advantages are relative within a group)")


def policy_loss(new_logp, old_logp, advantages, valid, loss_type, epsilon_low, epsilon_high,
                ref_logp=None, kl_coef=0.0, num_sequences=None):
    """Clipped policy-gradient loss (and stats) for a micro-batch of fixed-length rollouts.

    new_logp, old_logp, ref_logp: (B, L) per-token log-probs; advantages: (B,) per sequence or
    (B, F) per frame (each frame's L/F tokens share it; not with gspo); valid: (B,) bool.
    Returns the SUM of per-sequence losses divided by `num_sequences` (the number of valid
    sequences in the whole batch), so micro-batch losses add up to the full-batch loss.
    """
    num_sequences = num_sequences if num_sequences is not None else max(int(valid.sum()), 1)
    weight = valid.to(new_logp.dtype)
    advantages = advantages.to(new_logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): one advantage for the whole sequence
    else:  # (B, F) per frame -> (B, L) per token
        if loss_type == "gspo":
            raise ValueError("gspo uses one sequence-level ratio: it needs credit='rollout'")
        advantages = advantages.repeat_interleave(new_logp.shape[1] // advantages.shape[1], dim=1)
    log_ratio = new_logp - old_logp
    if loss_type == "gspo":
        ratio = log_ratio.mean(-1, keepdim=True).exp()  # (B, 1) sequence-level
    else:
        ratio = log_ratio.exp()  # (B, L)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)  # (B, L) or (B, 1)
    kl = torch.zeros_like(new_logp)
    if kl_coef and ref_logp is not None:
        delta = ref_logp - new_logp
        kl = delta.exp() - delta - 1  # k3 estimator, >= 0
        per_token = per_token + kl_coef * kl
    per_sequence = per_token.mean(-1)  # grpo/dapo/dr_grpo coincide for fixed-length sequences
    loss = (per_sequence * weight).sum() / num_sequences
    is_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    stats = {
        "clip_fraction": (is_clipped.float().mean(-1) * weight).sum().item(),
        "kl": (kl.mean(-1) * weight).sum().item(),
        "valid": weight.sum().item(),
    }
    return loss, stats


def _frame_scores(totals, components, valid, failures):
    """Per-frame rewards summarised per rollout (mean over frames) for logging."""
    from posttrain.rewards import RewardOutput

    return RewardOutput(total=totals.mean(1), components={k: v.mean(1) for k, v in components.items()},
                        valid=valid, failures=failures)


def run(config: GRPOConfig):
    trainer = Trainer(config, method="grpo")
    return trainer.fit(lambda step: grpo_step(trainer, config, step))


def grpo_step(trainer: Trainer, config: GRPOConfig, step: int) -> dict:
    """Generate, score and update once; returns the step's metrics (already reduced over ranks)."""
    acc = trainer.accelerator
    model = trainer.model
    timings = {}
    started = time.perf_counter()
    prompts = prompt_schedule(trainer.num_prompts, config.prompts_per_step, step, config.seed)
    local = prompts[acc.process_index:: acc.num_processes]
    group = config.group_size
    episode_index = local.repeat_interleave(group)
    sample_ids = torch.arange(group).repeat(len(local))
    context = trainer.prompt_tokens[episode_index, : config.num_context]
    actions = trainer.prompt_actions[episode_index]
    seeds = [rollout_seed(config.seed, step, int(p), int(g)) for p, g in zip(episode_index.tolist(), sample_ids.tolist())]
    model.eval()
    with torch.no_grad():
        rollouts = trainer.generate(context, actions, config.horizon, seeds, config.temperature, config.top_k,
                                    config.top_p)
    timings["generate"] = time.perf_counter() - started

    started = time.perf_counter()
    if config.credit == "frame":
        frame_totals, frame_components, frame_valid, failures = trainer.score_frame_rewards(
            rollouts.frames, episode_index, sample_ids, rollouts.tokens)
        returns = frame_totals.flip(1).cumsum(1).flip(1)  # (B, H) return-to-go from each frame
        valid = frame_valid.view(len(local), group)
        horizon = returns.shape[1]
        per_frame = returns.view(len(local), group, horizon).permute(2, 0, 1)  # (H, P, G)
        advantages = torch.stack([group_advantages(r, valid, config.scale_rewards) for r in per_frame], -1)
        advantages = advantages.reshape(-1, horizon)  # (B, H)
        scores = _frame_scores(frame_totals, frame_components, frame_valid, failures)
    else:
        scores = trainer.score_rewards(rollouts.frames, episode_index, sample_ids, rollouts.tokens)
        valid = scores.valid.view(len(local), group)
        advantages = group_advantages(scores.total.view(len(local), group), valid, config.scale_rewards).view(-1)
    timings["score"] = time.perf_counter() - started

    started = time.perf_counter()
    tokens = torch.cat([context, rollouts.tokens], 1)  # (B, C + H, N)
    old_logp = rollouts.logprobs.flatten(1)  # (B, H*N): exact in fp32 (score() == rollout log-probs)
    if trainer.settings.mixed_precision != "no":
        old_logp = trainer.policy_logprobs(tokens, actions)  # the update's own precision: first ratio == 1
    ref_logp = trainer.reference_logprobs(tokens, actions, config.num_context, config.temperature) \
        if config.kl_coef else None
    valid_flat = valid.view(-1)
    num_sequences = trainer.global_count(valid_flat)
    stats_total = {"clip_fraction": 0.0, "kl": 0.0}
    skipped = 0
    for _ in range(config.num_updates):
        stats = trainer.update(
            tokens, actions, valid_flat,
            lambda new_logp, idx: policy_loss(
                new_logp.flatten(1), old_logp[idx], advantages[idx], valid_flat[idx], config.loss_type,
                config.epsilon_low, config.epsilon_high,
                None if ref_logp is None else ref_logp[idx], config.kl_coef, num_sequences),
        )
        for key in stats_total:
            stats_total[key] += stats[key] / config.num_updates
        skipped = max(skipped, stats["skipped_nonfinite"])
    timings["update"] = time.perf_counter() - started

    metrics = trainer.reduce_reward_metrics(scores, valid_flat)
    metrics.update({
        "clip_fraction": trainer.reduce_sum(stats_total["clip_fraction"]) / num_sequences,
        "kl": trainer.reduce_sum(stats_total["kl"]) / num_sequences,
        "entropy_mc": trainer.reduce_mean(-rollouts.logprobs.mean().item()),
        "advantage_abs_mean": trainer.reduce_mean(advantages.abs().mean().item()),
        "skipped_nonfinite": skipped,
    })
    if "grad_norm" in stats:
        metrics["grad_norm"] = stats["grad_norm"]
    total_time = sum(timings.values())
    metrics.update({f"time_share_{k}": v / total_time for k, v in timings.items()})
    metrics["step_seconds"] = total_time
    if trainer.should_save_video(step):
        trainer.save_video(step, context[:1], rollouts.frames[:1], episode_index[:1])
    return metrics


