"""Rollouts for every method: which prompts a step uses, replayable seeds, chunked generation, the
reference policy, and scoring rollouts with the recipe's rewards.

    seeds = [rollout_seed(seed, step, prompt, sample) for ...]
    out = generate(policy, context, actions, horizon, seeds, temperature=1.0, chunk=64)  # RolloutOutput
    with reference_policy(policy, reference) as model:  # the frozen copy, or the adapter-disabled policy
        ref_logp = score_in_chunks(model, tokens, actions, num_context, chunk=8)
    scores = RolloutScorer(rewards, episodes, episode_tokens, world, num_context).score(out.frames, ...)

Everything here takes plain arguments (tensors, models, reward specs), never a recipe, and sees a
world model only through the `WorldModel` protocol (encode, decode, score, rollout).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from posttrain.models import RolloutOutput
from posttrain.rewards import EpisodeBatch, RewardOutput, RewardSpec, RolloutBatch, compose

EPISODE_FIELDS = ("seed", "frames", "depth", "segmentation", "intrinsics", "world_to_camera", "actions",
                  "object_positions", "object_visible", "num_objects", "object_colors", "is_loop")
"""The envs3d episode columns rewards read (an `EpisodeBatch`'s fields)."""


# --- prompts and seeds ------------------------------------------------------------------------------
def rollout_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms (splitmix64 chain)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def prompt_schedule(num_prompts: int, per_step: int, step: int, seed: int) -> torch.Tensor:
    """Prompt indices for `step`: epochs of seeded permutations, a pure function of (step, seed),
    so a resumed run sees exactly the prompts an unbroken run would."""
    start = step * per_step
    indices = []
    while len(indices) < per_step:
        epoch, offset = divmod(start + len(indices), num_prompts)
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(per_step - len(indices), num_prompts - offset)
        indices.extend(order[offset: offset + take].tolist())
    return torch.tensor(indices, dtype=torch.long)


def group_seeds(seed: int, step: int, episode_index: torch.Tensor, sample_ids: torch.Tensor) -> list[int]:
    """One seed per rollout, derived from (seed, step, prompt, sample): any rollout can be replayed."""
    return [rollout_seed(seed, step, int(p), int(g)) for p, g in zip(episode_index.tolist(), sample_ids.tolist())]


def episode_batch(episodes: dict, index) -> EpisodeBatch:
    """The rows `index` of a `load_episodes` dict as the `EpisodeBatch` rewards read."""
    index = torch.as_tensor(index, dtype=torch.long)
    return EpisodeBatch(**{name: episodes[name][index] for name in EPISODE_FIELDS})


@torch.no_grad()
def encode_episodes(world, frames: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Every frame of every episode, tokenised once: (E, T, H, W, 3) uint8 -> (E, T, N) token ids."""
    flat = frames.reshape(-1, *frames.shape[2:])
    tokens = torch.cat([world.encode(flat[i: i + chunk]) for i in range(0, len(flat), chunk)])
    return tokens.view(*frames.shape[:2], -1)


# --- generation and scoring under a model -----------------------------------------------------------
@torch.no_grad()
def decode_frames(model, tokens: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """`model.decode(tokens)`, with `reference` (the last true frame before `tokens`, (B, H, W, 3)) for a model
    that decodes with one (`decodes_with_reference`); other models never see it."""
    if reference is not None and getattr(model, "decodes_with_reference", False):
        return model.decode(tokens, reference=reference)
    return model.decode(tokens)


@torch.no_grad()
def generate(model, context: torch.Tensor, actions: torch.Tensor, horizon: int, seeds: list[int], *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             chunk: int, reference: torch.Tensor | None = None) -> RolloutOutput:
    """`model.rollout` over `chunk` rollouts per forward pass; one RolloutOutput for the whole batch.
    context (B, C, N) tokens, actions (B, >= C + horizon - 1). Each rollout has its own seed, so the
    result does not depend on `chunk`. `reference` (B, H, W, 3): the last true context frames, for a model that
    decodes with one (`decode_frames`)."""
    with_reference = reference is not None and getattr(model, "decodes_with_reference", False)
    parts = [model.rollout(context[i: i + chunk], actions[i: i + chunk], horizon, temperature=temperature,
                           top_k=top_k, top_p=top_p, seeds=seeds[i: i + chunk], **({"decode": False}
                                                                                   if with_reference else {}))
             for i in range(0, len(context), chunk)]
    if with_reference:
        frames = torch.cat([decode_frames(model, p.tokens, reference[i: i + chunk])
                            for p, i in zip(parts, range(0, len(context), chunk))])
    else:
        frames = None if parts[0].frames is None else torch.cat([p.frames for p in parts])
    return RolloutOutput(tokens=torch.cat([p.tokens for p in parts]), logprobs=torch.cat([p.logprobs for p in parts]),
                         frames=frames)


@torch.no_grad()
def score_in_chunks(model, tokens: torch.Tensor, actions: torch.Tensor, num_context: int,
                    temperature: float = 1.0, *, chunk: int, forward_kwargs: dict | None = None) -> torch.Tensor:
    """Log-probs (B, (T - num_context) * N) of `tokens` (B, T, N) under `model`, `chunk` rows at a time.
    Calls the model (its forward is `score`), so a DDP/DeepSpeed wrapper or a PEFT model works too.
    `forward_kwargs`: more forward arguments (tensor values are per row, chunked with the rows)."""
    def kwargs(rows: slice) -> dict:
        return {k: v[rows] if torch.is_tensor(v) else v for k, v in (forward_kwargs or {}).items()}

    return torch.cat([model(tokens[i: i + chunk], actions[i: i + chunk], num_context, temperature,
                            **kwargs(slice(i, i + chunk))).float()
                      for i in range(0, len(tokens), chunk)]).flatten(1)


@contextmanager
def reference_policy(policy, reference=None):
    """The model to score the reference policy with: `reference` (a separate frozen copy, used under
    full fine-tuning) if given, else `policy` with its LoRA adapter disabled (no second copy in memory)."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("a policy without a LoRA adapter needs a frozen reference copy")
    with policy.disable_adapter():
        yield policy


def reference_logprobs(policy, reference, tokens: torch.Tensor, actions: torch.Tensor, num_context: int,
                       temperature: float = 1.0, *, chunk: int, forward_kwargs: dict | None = None) -> torch.Tensor:
    """Log-probs (B, (T - num_context) * N) of `tokens` under the reference policy (see `reference_policy`)."""
    with reference_policy(policy, reference) as model:
        return score_in_chunks(model, tokens, actions, num_context, temperature, chunk=chunk,
                               forward_kwargs=forward_kwargs)


# --- scoring with rewards ---------------------------------------------------------------------------
class RolloutScorer:
    """Scores rollouts of the training episodes with the recipe's rewards against the simulator.

    episodes: a `load_episodes` dict with `EPISODE_FIELDS`; episode_tokens: (E, T, N), every frame
    tokenised by `world`, whose decoder also gives each rollout its reference frames (the tokenizer's
    reconstruction of the true future, cached per episode). Rollouts start after `num_context` frames.
    reconstructions: a cache {episode row: reference frames} to share with another scorer of the same
    episodes and world (see `with_rewards`); a fresh one by default.
    """

    def __init__(self, rewards: list[RewardSpec], episodes: dict, episode_tokens: torch.Tensor, world,
                 num_context: int, *, max_failure_fraction: float, workers: int = 1,
                 reconstructions: dict[int, torch.Tensor] | None = None):
        self.specs, self.episodes, self.episode_tokens = list(rewards), episodes, episode_tokens
        self.world, self.num_context = world, num_context
        self.max_failure_fraction, self.workers = max_failure_fraction, workers
        self.reward = compose(self.specs, max_failure_fraction=max_failure_fraction, workers=workers)
        self._frame_rewards: dict[bool, object] = {}  # per-frame composites (plain, dense), built on first use
        self._reconstructions: dict[int, torch.Tensor] = {} if reconstructions is None else reconstructions

    def with_rewards(self, rewards: list[RewardSpec], *, workers: int = 1) -> RolloutScorer:
        """Another scorer of the same episodes with other rewards (e.g. GRPO's monitored ones), sharing
        this one's cache of reference frames, so each episode's true future is decoded once."""
        return RolloutScorer(rewards, self.episodes, self.episode_tokens, self.world, self.num_context,
                             max_failure_fraction=self.max_failure_fraction, workers=workers,
                             reconstructions=self._reconstructions)

    def score(self, frames: torch.Tensor, episode_index: torch.Tensor, sample_ids: torch.Tensor,
              tokens: torch.Tensor | None = None, context: torch.Tensor | None = None) -> RewardOutput:
        """One composite reward per rollout. frames (B, H, h, w, 3) in [0, 1]; episode_index (B,) rows of
        the episodes; sample_ids (B,) each rollout's index within its group; tokens (B, H, N) if rewards
        read them; context (B, num_context, h, w, 3): what the model saw before `frames` when that was not
        the true frames (a self-generated prefix), else None."""
        context = self.context(episode_index) if context is None else context
        rollouts = RolloutBatch(frames=frames.float(), num_context=self.num_context, context=context,
                                tokens=tokens, reference_frames=self.reference_frames(episode_index),
                                prompt_ids=self.episodes["seed"][episode_index], sample_ids=sample_ids)
        return self.reward(rollouts, episode_batch(self.episodes, episode_index))

    def score_frames(self, frames: torch.Tensor, episode_index: torch.Tensor, sample_ids: torch.Tensor,
                     tokens: torch.Tensor | None = None, context: torch.Tensor | None = None):
        """Per-frame rewards (B, H): the composite scored on each generated frame alone, with the
        true context followed by the rollout's own earlier frames as its context (so
        `consistency_3d` compares frame t with frame t-1; it is built with include_context=True).
        Returns (totals (B, H), components {name: (B, H)}, valid (B,), failures)."""
        return self._per_frame(frames, episode_index, sample_ids, tokens, context, dense=False)[:4]

    def score_frames_dense(self, frames: torch.Tensor, episode_index: torch.Tensor, sample_ids: torch.Tensor,
                           tokens: torch.Tensor | None = None, context: torch.Tensor | None = None):
        """`score_frames` plus the weighted per-pixel maps of the rewards (every one must have a map):
        (totals (B, H), components, valid (B,), failures, maps (B, H, h, w)); each frame's map mean is its total."""
        return self._per_frame(frames, episode_index, sample_ids, tokens, context, dense=True)

    def _per_frame(self, frames, episode_index, sample_ids, tokens, context, dense: bool):
        if dense not in self._frame_rewards:
            specs = [RewardSpec(s.name, s.weight, {**s.params, "include_context": True}
                                if s.name == "consistency_3d" else dict(s.params), s.key) for s in self.specs]
            self._frame_rewards[dense] = compose(specs, max_failure_fraction=self.max_failure_fraction,
                                                 workers=self.workers, dense=dense)
        frame_reward = self._frame_rewards[dense]
        true_context = self.context(episode_index) if context is None else context
        reference = self.reference_frames(episode_index)
        episodes = episode_batch(self.episodes, episode_index)
        frames = frames.float()
        totals, components, valid, failures, maps = [], {}, torch.ones(len(frames), dtype=torch.bool), [], []
        for t in range(frames.shape[1]):
            rollouts = RolloutBatch(
                frames=frames[:, t: t + 1], num_context=self.num_context + t,
                context=torch.cat([true_context, frames[:, :t]], 1), reference_frames=reference[:, t: t + 1],
                tokens=None if tokens is None else tokens[:, t: t + 1],
                prompt_ids=self.episodes["seed"][episode_index], sample_ids=sample_ids)
            out = frame_reward(rollouts, episodes)
            totals.append(out.total)
            valid &= out.valid.cpu()
            failures.extend(out.failures)
            for name, values in out.components.items():
                components.setdefault(name, []).append(values)
            if dense:
                maps.append(out.dense[:, 0])
        return (torch.stack(totals, 1), {k: torch.stack(v, 1) for k, v in components.items()}, valid, failures,
                torch.stack(maps, 1) if dense else None)

    def context(self, episode_index: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w, 3) the true context frames in [0, 1]."""
        return self.episodes["frames"][episode_index, : self.num_context].float() / 255

    @torch.no_grad()
    def reference_frames(self, episode_index: torch.Tensor) -> torch.Tensor:
        """The tokenizer's reconstruction of the true future frames (cached per episode)."""
        missing = sorted({int(i) for i in episode_index} - set(self._reconstructions))
        if missing:
            recon = self.world.decode(self.episode_tokens[missing, self.num_context:])
            for i, frames in zip(missing, recon):
                self._reconstructions[i] = frames
        return torch.stack([self._reconstructions[int(i)] for i in episode_index])

    def close(self) -> None:
        """Stop the reward worker processes (if any)."""
        for reward in (self.reward, *self._frame_rewards.values()):
            reward.close()


def best_and_worst(rewards: torch.Tensor, valid: torch.Tensor):
    """(P, G) rewards and validity -> (keep (P,) bool, best (P,), worst (P,), ties, invalid).

    A group needs two valid samples (else it counts as invalid) whose best and worst
    rewards differ (else it counts as a tie)."""
    masked_max = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf))
    masked_min = torch.where(valid, rewards, torch.full_like(rewards, torch.inf))
    best, worst = masked_max.argmax(1), masked_min.argmin(1)
    enough = valid.sum(1) >= 2
    differ = masked_max.max(1).values > masked_min.min(1).values
    keep = enough & differ
    return keep, best, worst, int((enough & ~differ).sum()), int((~enough).sum())
