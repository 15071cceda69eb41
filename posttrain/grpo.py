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
- `credit: dense` (posttrain/credit.py) gives each token, beside its frame's advantage, the group-centred
  return of its own patch from the rewards' per-pixel maps: per-token credit from the simulator's truth,
  as PXPO / SpatialFlow-GRPO do with region rewards for images.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from posttrain import credit, rollouts, training
from posttrain.config import to_dict
from posttrain.credit import DenseCredit
from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.report import save_step_video
from posttrain.rewards import RewardOutput, RewardSpec, check_reward_specs, compose


@dataclass
class GRPOConfig(training.RunConfig):
    """GRPO recipe: model, data, sampling, loss, optimisation, rewards, logging, evaluation."""

    method: str = "grpo"
    """Recipe kind (fixed)."""
    out: str = "runs/grpo"
    """Run folder (metrics.jsonl, checkpoints/, adapter/, report/)."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="10000:10512", frames=14))
    """Training episodes (prompts); frames must equal num_context + prefix_frames + horizon."""
    num_context: int = 2
    """True context frames per prompt."""
    prefix_frames: int = 0
    """Branching (aimed at drift): the policy first generates this many frames ONCE per prompt, and the
    group's rollouts all continue from that shared self-generated prefix (PersistWorld, arXiv 2603.25685),
    so advantages compare continuations of the same drifted state. Only the continuations are scored
    and trained. 0: every rollout starts from the true context (plain GRPO)."""
    prefix_temperature: float | None = None
    """Sampling temperature of the shared prefix (None: `temperature`; 0: greedy, the drift a greedy user sees)."""
    horizon: int = 12
    """Frames generated per rollout (after the prefix, if any)."""
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
    """grpo | dr_grpo | dapo | gspo | nft (DiffusionNFT, flow models only: see `nft_loss`)."""
    nft_beta: float = 1.0
    """loss_type nft: DiffusionNFT's beta, how far the implicit positive and negative policies sit from the
    sampling policy."""
    nft_adv_clip: float = 5.0
    """loss_type nft: advantages are clipped to [-c, c] and mapped to optimality probabilities 0.5 + A / (2 c)."""
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
    rewards, and each frame's tokens get the group-normalised return-to-go from that frame on | dense:
    frame credit plus each token's own patch return from the rewards' per-pixel maps (`dense` section;
    posttrain/credit.py says what is exact and what approximate)."""
    dense: DenseCredit = field(default_factory=DenseCredit)
    """credit: dense settings: patch_weight, frame_weight, patch_return (none | same_cell | flow)."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="psnr", weight=1.0)])
    """Weighted rewards (see `posttrain.rewards.list_rewards()`)."""
    monitor_rewards: list[RewardSpec] = field(default_factory=list)
    """Rewards scored on every step's rollouts and logged (`monitor_mean`, `monitor/<name>_mean`) but never
    trained on. With a learned reward in `rewards`, put the simulator's reward here to watch for reward-model
    over-optimisation (Gao et al. 2022): the learned reward climbing while the true one stalls or falls."""
    max_failure_fraction: float = 0.25
    """Stop the run when more than this share of a batch's samples fail reward evaluation."""
    reward_workers: int = 1
    """Processes scoring rewards (1 is fastest on 2 cores; see benchmarks/results/rewards_cpu.json)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from posttrain.config import require

        require(self, positive=("num_context", "horizon", "prompts_per_step", "steps", "num_updates",
                                "reward_workers", "top_k"),
                non_negative=("temperature", "epsilon_low", "epsilon_high", "kl_coef", "prefix_frames",
                              "prefix_temperature"),
                unit=("max_failure_fraction",), open_unit=("top_p",))
        if self.loss_type not in ("grpo", "dr_grpo", "dapo", "gspo", "nft"):
            raise ValueError(f"loss_type={self.loss_type!r}; choose grpo, dr_grpo, dapo, gspo or nft")
        if self.loss_type == "nft":
            if self.credit == "dense":
                raise ValueError("loss_type=nft weights whole frames or rollouts: use credit=rollout or frame")
            if self.kl_coef:
                raise ValueError("loss_type=nft has no KL term here: set kl_coef=0")
            if not (self.nft_beta > 0 and self.nft_adv_clip > 0):
                raise ValueError(f"nft_beta={self.nft_beta} and nft_adv_clip={self.nft_adv_clip} must be > 0")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; choose group or none")
        if self.data.frames != self.num_context + self.prefix_frames + self.horizon:
            raise ValueError(f"data.frames={self.data.frames} must equal num_context + prefix_frames + horizon = "
                             f"{self.num_context + self.prefix_frames + self.horizon}")
        if self.credit not in ("rollout", "frame", "dense"):
            raise ValueError(f"credit={self.credit!r}; choose rollout, frame or dense")
        if self.credit == "dense" and self.loss_type == "gspo":
            raise ValueError("loss_type=gspo uses one sequence-level ratio: it needs credit=rollout, not dense")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2 (advantages are relative within a group)")
        if self.temperature == 0:
            raise ValueError("temperature=0 makes every rollout of a group the same (greedy): no advantage, "
                             "nothing trained; sample with temperature > 0 (greedy prefixes: prefix_temperature)")


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, scale: str = "group", eps: float = 1e-4):
    """(P, G) rewards -> (P, G) advantages: r - group mean, divided by the group's std if scale == 'group'.

    Means and (unbiased, as TRL computes it) stds are taken over the valid samples of each
    group only; invalid samples get advantage 0 and are also masked out of the loss.
    """
    weight = valid.to(torch.float64)
    values = torch.where(valid, rewards.double(), torch.zeros_like(rewards, dtype=torch.float64))
    count = weight.sum(1, keepdim=True)
    mean = values.sum(1, keepdim=True) / count.clamp_min(1)
    centred = (values - mean) * weight
    advantages = centred
    if scale == "group":
        variance = (centred**2).sum(1, keepdim=True) / (count - 1).clamp_min(1)
        advantages = centred / (variance.sqrt() + eps)
    return advantages.float()


def frame_advantages(frame_rewards: torch.Tensor, valid: torch.Tensor, scale: str) -> torch.Tensor:
    """(P*G, H) per-frame rewards -> (P*G, H) advantages: each frame's return-to-go (the sum of the
    rewards from that frame on), group-normalised frame by frame. valid: (P, G)."""
    prompts, group = valid.shape
    returns = frame_rewards.flip(1).cumsum(1).flip(1)  # (B, H) return-to-go from each frame
    horizon = returns.shape[1]
    per_frame = returns.view(prompts, group, horizon).permute(2, 0, 1)  # (H, P, G)
    advantages = torch.stack([group_advantages(r, valid, scale) for r in per_frame], -1)  # (P, G, H)
    return advantages.reshape(-1, horizon)


def dense_token_advantages(config: GRPOConfig, grid, frame_totals, maps, valid, episodes, episode_index, start,
                           acc=None) -> torch.Tensor:
    """credit: dense. (B, H) per-frame rewards and (B, H, h, w) per-pixel maps of B = P * G rollouts of
    episode rows `episode_index`, whose frames are episode steps start..start + H - 1 -> (B, H * N)
    per-token advantages (`posttrain.credit.dense_advantages`); the patch scale is reduced over processes."""
    frame_adv = frame_advantages(frame_totals, valid, config.scale_rewards)  # (B, H)
    patch = credit.pool_to_tokens(torch.nan_to_num(maps.float()), grid)  # (B, H, N); failed rows are masked
    flow = None
    if config.dense.patch_return == "flow":
        steps = slice(start, start + maps.shape[1])
        flow = credit.cell_flow(episodes["depth"][episode_index, steps], episodes["world_to_camera"][episode_index, steps],
                                episodes["intrinsics"][episode_index], grid)  # (B, H - 1, N)
    returns = credit.patch_returns(patch, config.dense.patch_return, flow)
    reduce = None if acc is None else functools.partial(training.reduce_sum, acc)
    return credit.dense_advantages(frame_adv, returns, valid, config.dense, reduce_sum=reduce)  # (B, H * N)


def policy_loss(new_logp, old_logp, advantages, valid, loss_type, epsilon_low, epsilon_high,
                ref_logp=None, kl_coef=0.0, num_sequences=None):
    """Clipped policy-gradient loss (and stats) for a micro-batch of fixed-length rollouts.

    new_logp, old_logp, ref_logp: (B, L) per-token log-probs; advantages: (B,) per sequence,
    (B, F) per frame (each frame's L/F tokens share it) or (B, L) per token (dense credit); not with gspo
    unless (B,); valid: (B,) bool.
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


def nft_loss(new_residual, old_residual, advantages, valid, beta: float, adv_clip: float, num_sequences=None):
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) on (B, L) velocity residuals v - (eps - x_0) of the
    rollouts' own clean frames, noised by the forward process: the current policy's (`new_residual`) and the
    sampling policy's (`old_residual`, fixed) at the same (t, eps). With r = 0.5 + clip(A, -c, c) / (2 c) the
    optimality probability from the (B,) or (B, F) advantages, the implicit positive and negative velocities
    v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v give the per-element loss
    c [r |v+ - u|^2 + (1 - r) |v- - u|^2] / beta, averaged per sequence, summed over valid ones / num_sequences.
    No likelihoods; positives pull the model toward their frames, negatives push it away."""
    num_sequences = num_sequences if num_sequences is not None else max(int(valid.sum()), 1)
    weight = valid.to(new_residual.dtype)
    r = 0.5 + advantages.to(new_residual.dtype).clamp(-adv_clip, adv_clip) / (2 * adv_clip)
    if r.dim() == 1:
        r = r[:, None]
    else:  # (B, F) per frame -> (B, L) per element
        r = r.repeat_interleave(new_residual.shape[1] // r.shape[1], dim=1)
    old = old_residual.to(new_residual.dtype)
    positive = beta * new_residual + (1 - beta) * old
    negative = (1 + beta) * old - beta * new_residual
    per_element = adv_clip * (r * positive.square() + (1 - r) * negative.square()) / beta
    loss = (per_element.mean(-1) * weight).sum() / num_sequences
    stats = {"clip_fraction": 0.0, "kl": 0.0, "valid": weight.sum().item(),
             "nft_positive_share": ((r.mean(-1) > 0.5).float() * weight).sum().item()}
    return loss, stats


NFT_SEED_OFFSET = 0x5DEECE66D
"""Chained onto each rollout's seed for DiffusionNFT's (t, eps) draws, so they are not the rollout's own noise."""


def micro_batch_loss(config: GRPOConfig, old_logp, advantages, valid, ref_logp, num_sequences: int):
    """The `loss_fn(new_logp, index)` training.update calls per micro-batch: `policy_loss` on rows `index`
    of the step's (B, L) old/reference log-probs, (B,) or (B, H) advantages and (B,) validity."""
    def loss_fn(new_logp, index):
        if config.loss_type == "nft":  # here new_logp and old_logp are velocity residuals (see nft_loss)
            return nft_loss(new_logp.flatten(1), old_logp[index], advantages[index], valid[index], config.nft_beta,
                            config.nft_adv_clip, num_sequences)
        return policy_loss(new_logp.flatten(1), old_logp[index], advantages[index], valid[index], config.loss_type,
                           config.epsilon_low, config.epsilon_high, None if ref_logp is None else ref_logp[index],
                           config.kl_coef, num_sequences)
    return loss_fn


def run(config: GRPOConfig):
    """Set up, then for each step: pick prompts, generate groups, score, advantages, update, log, checkpoint."""
    check_reward_specs(config.rewards)  # before any work: a bad reward would otherwise fail after the rollouts
    if config.monitor_rewards:
        check_reward_specs(config.monitor_rewards, key="monitor_rewards")
    if config.credit == "dense":
        compose(config.rewards, dense=True).close()  # refuses, by name, a reward without a per-pixel map
    session = training.setup("grpo", out=config.out, model=config.model, seed=config.seed, settings=config.train,
                             lora=config.lora, recipe=to_dict(config), resume=config.resume,
                             overwrite=config.overwrite, frozen_reference=bool(config.kl_coef))
    acc, policy, settings = session.accelerator, session.policy, config.train
    if config.loss_type == "nft" and not getattr(session.world, "sft_objective", None):
        raise ValueError(f"loss_type=nft (DiffusionNFT) trains a flow model's flow-matching objective; "
                         f"{type(session.world).__name__} has none: use grpo, dr_grpo, dapo or gspo")
    # Dense credit: the model must say which pixels its tokens govern (before any episode or rollout).
    grid = credit.token_grid(session.world, (config.data.image_size,) * 2) if config.credit == "dense" else None
    episodes = load_episodes(config.data, rollouts.EPISODE_FIELDS, progress=acc.is_main_process)
    episode_tokens = rollouts.encode_episodes(session.world, episodes["frames"])  # (E, T, N)
    # Rollouts are scored and trained from `start` on: after the true context and the shared prefix (if any).
    start = config.num_context + config.prefix_frames
    scorer = rollouts.RolloutScorer(config.rewards, episodes, episode_tokens, session.world, start,
                                    max_failure_fraction=config.max_failure_fraction, workers=config.reward_workers)
    monitor = scorer.with_rewards(config.monitor_rewards) if config.monitor_rewards else None
    group = config.group_size
    prefix_temperature = config.temperature if config.prefix_temperature is None else config.prefix_temperature

    with training.Steps(session, total=config.steps, resume=config.resume) as steps:
        for step in steps:
            timings = {}
            # 1. Prompts: this process's share of the step's prompts, `group` samples each, seeded by
            #    (seed, step, prompt, sample).
            started = time.perf_counter()
            prompts = rollouts.prompt_schedule(len(episode_tokens), config.prompts_per_step, step, config.seed)
            local = prompts[acc.process_index:: acc.num_processes]
            episode_index = local.repeat_interleave(group)
            sample_ids = torch.arange(group).repeat(len(local))
            context = episode_tokens[episode_index, : config.num_context]  # (B, C, N)
            actions = episodes["actions"][episode_index]  # (B, T - 1)
            seeds = rollouts.group_seeds(config.seed, step, episode_index, sample_ids)

            # 2. Generate: B = P * G rollouts from the current policy. With prefix_frames, each prompt's
            #    group first shares one self-generated prefix (sample id G in the seeds) and branches after it.
            session.model.eval()
            seen = None  # what the model saw before the scored frames, for the rewards: (B, start, h, w, 3)
            if config.prefix_frames:
                prefix = rollouts.generate(policy, episode_tokens[local, : config.num_context], episodes["actions"][local],
                                           config.prefix_frames, rollouts.group_seeds(config.seed, step, local,
                                                                                      torch.full_like(local, group)),
                                           temperature=prefix_temperature, top_k=config.top_k, top_p=config.top_p,
                                           chunk=settings.rollout_batch_size)
                context = torch.cat([context, prefix.tokens.repeat_interleave(group, 0)], 1)  # (B, start, N)
                seen = torch.cat([scorer.context(episode_index)[:, : config.num_context],
                                  prefix.frames.repeat_interleave(group, 0)], 1)
            out = rollouts.generate(policy, context, actions, config.horizon, seeds, temperature=config.temperature,
                                    top_k=config.top_k, top_p=config.top_p, chunk=settings.rollout_batch_size)
            timings["generate"] = time.perf_counter() - started

            # 3. Score against the simulator; 4. group-normalised advantages.
            started = time.perf_counter()
            if config.credit == "dense":
                frame_totals, frame_components, frame_valid, failures, maps = scorer.score_frames_dense(
                    out.frames, episode_index, sample_ids, out.tokens, context=seen)
                valid = frame_valid.view(len(local), group)
                advantages = dense_token_advantages(config, grid, frame_totals, maps, valid, episodes,
                                                    episode_index, start, acc)  # (B, H * N)
                # A flow model has k log-probs per cell (each SDE step's latent channels): each takes its cell's.
                advantages = credit.expand_to_logprobs(advantages, grid, out.logprobs.shape[-1])
                scores = RewardOutput(total=frame_totals.mean(1), failures=failures, valid=frame_valid,
                                      components={k: v.mean(1) for k, v in frame_components.items()})
            elif config.credit == "frame":
                frame_totals, frame_components, frame_valid, failures = scorer.score_frames(
                    out.frames, episode_index, sample_ids, out.tokens, context=seen)
                valid = frame_valid.view(len(local), group)
                advantages = frame_advantages(frame_totals, valid, config.scale_rewards)  # (B, H)
                # Per-frame rewards summarised per rollout (mean over frames) for logging.
                scores = RewardOutput(total=frame_totals.mean(1), failures=failures, valid=frame_valid,
                                      components={k: v.mean(1) for k, v in frame_components.items()})
            else:
                scores = scorer.score(out.frames, episode_index, sample_ids, out.tokens, context=seen)
                valid = scores.valid.view(len(local), group)
                advantages = group_advantages(scores.total.view(len(local), group), valid,
                                              config.scale_rewards).view(-1)  # (B,)
            timings["score"] = time.perf_counter() - started

            # 5. Old and reference log-probs; 6. num_updates clipped policy-gradient updates.
            started = time.perf_counter()
            tokens = torch.cat([context, out.tokens], 1)  # (B, start + H, N)
            old_logp = out.logprobs.flatten(1)  # (B, H*N): exact in fp32 (score() == rollout log-probs)
            forward_kwargs = None
            if config.loss_type == "nft":
                # DiffusionNFT needs no log-probs: the sampling policy's velocity residuals on the rollouts' clean
                # frames, at (t, eps) seeded per rollout, are its fixed "old" side.
                noise_seeds = torch.tensor([rollouts.rollout_seed(s, NFT_SEED_OFFSET) for s in seeds])
                forward_kwargs = {"objective": "velocity_residual", "noise_seeds": noise_seeds}
                with torch.no_grad():
                    old_logp = rollouts.score_in_chunks(session.model, tokens, actions, start, config.temperature,
                                                        chunk=settings.micro_batch_size, forward_kwargs=forward_kwargs)
            elif settings.mixed_precision != "no":  # the update's own precision: first ratio == 1
                old_logp = training.policy_logprobs(session, tokens, actions, num_context=start,
                                                    temperature=config.temperature)
            ref_logp = rollouts.reference_logprobs(policy, session.reference, tokens, actions, start,
                                                   config.temperature, chunk=settings.micro_batch_size) \
                if config.kl_coef else None
            valid = valid.view(-1)
            num_sequences = training.global_count(acc, valid)
            loss_fn = micro_batch_loss(config, old_logp, advantages, valid, ref_logp, num_sequences)
            totals, skipped = {"clip_fraction": 0.0, "kl": 0.0}, 0
            for _ in range(config.num_updates):
                stats = training.update(session, tokens, actions, loss_fn, num_context=start,
                                        temperature=config.temperature, forward_kwargs=forward_kwargs)
                for key in totals:
                    totals[key] += stats[key] / config.num_updates
                skipped = max(skipped, stats["skipped_nonfinite"])
            timings["update"] = time.perf_counter() - started

            # 7. Log (reduced over processes), video, checkpoint.
            metrics = training.reward_metrics(acc, scores, valid)
            if monitor is not None:  # watched, never trained on: rollout-level, on the samples trained on
                watched = monitor.score(out.frames, episode_index, sample_ids, out.tokens, context=seen)
                metrics.update({f"monitor{k[len('reward'):]}": v for k, v in
                                training.reward_metrics(acc, watched, valid & watched.valid.cpu()).items()
                                if k.startswith("reward")})
            metrics.update({
                "clip_fraction": training.reduce_sum(acc, totals["clip_fraction"]) / num_sequences,
                "kl": training.reduce_sum(acc, totals["kl"]) / num_sequences,
                "entropy_mc": training.reduce_mean(acc, -out.logprobs.mean().item()),
                "advantage_abs_mean": training.reduce_mean(acc, advantages.abs().mean().item()),
                "skipped_nonfinite": skipped,
            })
            if "grad_norm" in stats:
                metrics["grad_norm"] = stats["grad_norm"]
            total_time = sum(timings.values())
            metrics.update({f"time_share_{k}": v / total_time for k, v in timings.items()})
            metrics["step_seconds"] = total_time
            if steps.video_due(step):
                save_step_video(session.out, step, episodes["frames"][int(episode_index[0])], start, out.frames[0])
            steps.done(step, metrics)

    result = training.finish(session, steps.history, recipe=to_dict(config), eval_config=config.eval,
                             eval_temperatures=config.eval_temperatures)
    scorer.close()
    if monitor is not None:
        monitor.close()
    return result
