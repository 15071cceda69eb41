"""DPO-family post-training of a world model on pairs of rollouts of the same prompt.

    posttrain run recipes/dpo_tabletop.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m posttrain run recipes/dpo_tabletop.yaml

A prompt is an envs3d episode's context frames and action sequence; a "response" is a
rollout of `horizon` frames x N tokens. Pairs come from one of three sources (`pairs.source`):

- online: every step, `group_size` rollouts per prompt are sampled from the CURRENT policy
  (seeds derived from (seed, step, prompt, sample) as in GRPO), scored with the recipe's
  rewards against the simulator; chosen = best, rejected = worst. Groups with fewer than
  two valid rewards, or whose best and worst tie, give no pair (counted, never guessed).
- offline: the same, done once before training from the BASE model over every prompt in
  `data`; the pairs are saved to `offline_pairs.safetensors` in the run folder and reused.
- jsonl: a person's preferences, one line per pair:
  `{"prompt_id": <episode seed in data.seeds>, "chosen": "a.npy", "rejected": "b.npy"}`
  (paths relative to the JSONL's folder). Each .npy is either (horizon, N) integer token ids
  of the model's tokenizer, or (horizon, h, w, 3) uint8 frames, which are encoded with the
  tokenizer. The prompt's context frames and actions are the episode's own.

Loss (`loss_type`), with h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
- sigmoid (DPO): -logsigmoid(beta * h), with sequence log-probs SUMMED over the H*N tokens;
  `label_smoothing` eps gives conservative DPO: -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h).
- ipo (IPO, Eq. 17): (h - 1/(2 beta))^2 with log-probs AVERAGED over tokens, as TRL does.

Reference log-probs are computed once per pair and cached in `reference_cache/rank<k>.safetensors`
in the run folder, keyed by pair id (source, episode seed and a hash of both token sequences and
the actions), so a resumed run never recomputes them (TRL's `precompute_ref_log_probs` idea).
Online pairs get theirs when the pair is made. Under LoRA the reference is the policy with the
adapter disabled (no second copy in memory); under full fine-tuning a frozen copy of the base.

Where this departs from the papers: DPO/IPO assume a fixed offline preference dataset; `online`
is on-policy iterative DPO with a verifier as the annotator (best-vs-worst of a group, as in
RLHF-style "online DPO"). Responses all have the same length, so IPO's token averaging is a
constant rescaling of beta here, kept for parity with TRL.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.adapters import LoraSettings
from posttrain.data import EpisodeDataConfig
from posttrain.evaluate import EvalConfig, rollout_seed
from posttrain.rewards import RewardSpec
from posttrain.trainer_utils import Trainer, TrainerSettings, prompt_schedule

OFFLINE_STEP = -1
"""The `step` mixed into the rollout seeds of offline pairs (no training step is negative)."""


@dataclass
class PairSettings:
    """Where preference pairs come from."""

    source: str = "online"
    """online (sampled from the current policy each step) | offline (from the base, once) | jsonl."""
    path: str = ""
    """For source=jsonl: the preference JSONL file (see the module docstring for its format)."""


@dataclass
class DPOConfig:
    """DPO recipe: model, data, pairs, loss, optimisation, rewards, logging, evaluation."""

    method: str = "dpo"
    """Recipe kind (fixed)."""
    out: str = "runs/dpo"
    """Run folder (metrics.jsonl, checkpoints/, reference_cache/, adapter/, report/)."""
    model: str = "default"
    """Base model: 'default' (embedded) or a save_pretrained folder."""
    seed: int = 0
    """Seed for the pair order and every rollout's sampling seed."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="10000:10512", frames=14))
    """Training episodes (prompts); frames must equal num_context + horizon."""
    num_context: int = 2
    """True context frames per prompt."""
    horizon: int = 12
    """Frames per rollout (the response)."""
    pairs: PairSettings = field(default_factory=PairSettings)
    """Pair source: online, offline or jsonl."""
    group_size: int = 2
    """Rollouts sampled per prompt to make one pair (best vs worst); online and offline."""
    prompts_per_step: int = 8
    """Prompts per step (online: each gives at most one pair); offline/jsonl: pairs per step."""
    steps: int = 100
    """Optimizer steps."""
    sample_temperature: float = 1.0
    """Temperature for sampling pair rollouts (log-probs in the loss are always at temperature 1)."""
    top_k: int | None = None
    """Optional top-k truncation while sampling."""
    top_p: float | None = None
    """Optional top-p truncation while sampling."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | ipo."""
    beta: float = 0.1
    """DPO inverse temperature / IPO regularisation (tau in the IPO paper)."""
    label_smoothing: float = 0.0
    """sigmoid only: probability that a label is flipped (conservative DPO), in [0, 0.5)."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="psnr", weight=1.0)])
    """Weighted rewards that rank sampled rollouts (online/offline); unused for jsonl."""
    max_failure_fraction: float = 0.25
    """Stop the run when more than this share of a batch's samples fail reward evaluation."""
    reward_workers: int = 1
    """Processes scoring rewards (1 is fastest on 2 cores)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (enabled=False trains the full dynamics transformer against a frozen copy)."""
    train: TrainerSettings = field(default_factory=TrainerSettings)
    """Optimiser, precision, micro-batching (pairs are never split), checkpoints and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of base vs post-trained at the end."""
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

        require(self, positive=("num_context", "horizon", "group_size", "prompts_per_step", "steps",
                                "reward_workers", "top_k"),
                non_negative=("sample_temperature",), unit=("max_failure_fraction", "top_p"))
        if any(not t >= 0 for t in self.eval_temperatures):
            raise ValueError(f"eval_temperatures={self.eval_temperatures} must be >= 0")
        check_held_out(self.data, self.eval.data)
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type={self.loss_type!r}; choose sigmoid or ipo")
        if self.pairs.source not in ("online", "offline", "jsonl"):
            raise ValueError(f"pairs.source={self.pairs.source!r}; choose online, offline or jsonl")
        if self.pairs.source == "jsonl" and not self.pairs.path:
            raise ValueError("pairs.source=jsonl needs pairs.path")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")
        if self.data.frames != self.num_context + self.horizon:
            raise ValueError(f"data.frames={self.data.frames} must equal num_context + horizon = "
                             f"{self.num_context + self.horizon}")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2 (a pair needs two rollouts)")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, num_tokens: int = 1):
    """Per-pair loss and implicit rewards from SEQUENCE log-probs (sums over tokens), each (P,).

    Mirrors TRL 1.16 `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py, lines 1387-1404):
    sigmoid: `-F.logsigmoid(self.beta * delta_score)`; ipo: the log-ratios are divided by the
    number of completion tokens ("average per token", confirmed with the IPO authors per TRL's
    comment), then `(ipo_delta - 1 / (2 * self.beta)) ** 2`. TRL 1.16's sigmoid has no label
    smoothing; ours is the cDPO form TRL uses for its `aot` loss and older TRLs used for sigmoid.
    Returns (loss (P,), chosen_rewards (P,), rejected_rewards (P,)); rewards are
    beta * (log pi - log ref), summed over tokens, for logging.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = beta * (chosen_logratio - rejected_logratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        # Token averaging: every response here has num_tokens = horizon * N tokens.
        h = (chosen_logratio - rejected_logratio) / num_tokens
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# --- pairs ------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """P preference pairs over the same prompts; T = num_context + horizon frames of N tokens."""

    chosen: torch.Tensor
    """(P, T, N) context + chosen rollout token ids."""
    rejected: torch.Tensor
    """(P, T, N) context + rejected rollout token ids."""
    episode_index: torch.Tensor
    """(P,) index into the trainer's episodes (gives the actions and the prompt seed)."""
    ids: list[str]
    """Pair ids (reference-cache keys)."""
    chosen_reward: torch.Tensor | None = None
    """(P,) verifier reward of the chosen rollout (None for jsonl)."""
    rejected_reward: torch.Tensor | None = None
    """(P,) verifier reward of the rejected rollout (None for jsonl)."""

    def select(self, index: torch.Tensor) -> Pairs:
        pick = lambda t: None if t is None else t[index]
        return Pairs(self.chosen[index], self.rejected[index], self.episode_index[index],
                     [self.ids[i] for i in index.tolist()], pick(self.chosen_reward), pick(self.rejected_reward))


def pair_id(source: str, prompt_seed: int, chosen: torch.Tensor, rejected: torch.Tensor,
            actions: torch.Tensor) -> str:
    """A readable, content-derived key: the same tokens and actions always map to the same id."""
    digest = hashlib.sha256()
    for tensor in (chosen, rejected, actions):
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return f"{source}-{int(prompt_seed)}-{digest.hexdigest()[:16]}"


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


def rollout_in_chunks(model, context, actions, horizon, seeds, config: DPOConfig, chunk: int):
    """(tokens (B, H, N), frames (B, H, h, w, 3)) from `model`, `chunk` rollouts per forward pass."""
    tokens, frames = [], []
    for i in range(0, len(context), chunk):
        out = model.rollout(context[i: i + chunk], actions[i: i + chunk], horizon,
                            temperature=config.sample_temperature, top_k=config.top_k, top_p=config.top_p,
                            seeds=seeds[i: i + chunk])
        tokens.append(out.tokens)
        frames.append(out.frames)
    return torch.cat(tokens), torch.cat(frames)


@torch.no_grad()
def sample_pairs(trainer: Trainer, config: DPOConfig, model, prompts: torch.Tensor, step: int, source: str):
    """Sample group_size rollouts per prompt from `model`, score, keep best vs worst. Returns (Pairs, stats)."""
    group = config.group_size
    episode_index = prompts.repeat_interleave(group)
    sample_ids = torch.arange(group).repeat(len(prompts))
    context = trainer.prompt_tokens[episode_index, : config.num_context]
    actions = trainer.prompt_actions[episode_index]
    seeds = [rollout_seed(config.seed, step, int(p), int(g))
             for p, g in zip(episode_index.tolist(), sample_ids.tolist())]
    was_training = model.training
    model.eval()
    tokens, frames = rollout_in_chunks(model, context, actions, config.horizon, seeds, config,
                                       trainer.settings.rollout_batch_size)
    model.train(was_training)
    scores = trainer.score_rewards(frames, episode_index, sample_ids)
    rewards = scores.total.view(len(prompts), group)
    valid = scores.valid.view(len(prompts), group)
    keep, best, worst, ties, invalid = best_and_worst(rewards, valid)
    rows = torch.arange(len(prompts))[keep]
    full = torch.cat([context, tokens], 1).view(len(prompts), group, config.num_context + config.horizon, -1)
    # full: (P, G, T, N) context + rollout tokens per prompt and sample
    chosen, rejected = full[rows, best[rows]], full[rows, worst[rows]]
    kept_prompts = prompts[rows]
    seeds_of = trainer.episodes["seed"]
    ids = [pair_id(source, int(seeds_of[p]), c, r, trainer.prompt_actions[p])
           for p, c, r in zip(kept_prompts.tolist(), chosen, rejected)]
    pairs = Pairs(chosen, rejected, kept_prompts, ids, rewards[rows, best[rows]], rewards[rows, worst[rows]])
    stats = {"skipped_ties": ties, "skipped_invalid": invalid, "scores": scores, "valid": scores.valid,
             "frames": frames, "episode_index": episode_index}
    return pairs, stats


def load_jsonl_pairs(trainer: Trainer, config: DPOConfig, path: str | Path) -> Pairs:
    """A person's preferences -> Pairs (see the module docstring for the line format)."""
    path = Path(path)
    seeds = trainer.episodes["seed"].tolist()
    where = {int(s): i for i, s in enumerate(seeds)}
    n = trainer.episode_tokens.shape[-1]  # tokens per frame
    chosen, rejected, index, ids = [], [], [], []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"prompt_id", "chosen", "rejected"} - set(record)
        if missing:
            raise ValueError(f"{path}:{line_number}: missing keys {sorted(missing)}")
        seed = int(record["prompt_id"])
        if seed not in where:
            raise ValueError(f"{path}:{line_number}: prompt_id {seed} is not an episode seed of data.seeds="
                             f"{config.data.seeds!r}")
        episode = where[seed]
        context = trainer.prompt_tokens[episode, : config.num_context]
        sides = []
        for key in ("chosen", "rejected"):
            rollout = _load_rollout_tokens(trainer, path.parent / record[key], config.horizon, n,
                                           f"{path}:{line_number} {key}")
            sides.append(torch.cat([context, rollout]))
        chosen.append(sides[0])
        rejected.append(sides[1])
        index.append(episode)
        ids.append(pair_id("jsonl", seed, sides[0], sides[1], trainer.prompt_actions[episode]))
    if not chosen:
        raise ValueError(f"{path}: no pairs")
    return Pairs(torch.stack(chosen), torch.stack(rejected), torch.tensor(index), ids)


def _load_rollout_tokens(trainer: Trainer, file: Path, horizon: int, tokens_per_frame: int, where: str):
    """(horizon, N) token ids from a token .npy (H, N) or a uint8 frame .npy (H, h, w, 3)."""
    array = np.load(file, allow_pickle=False)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        tokens = torch.from_numpy(array.astype(np.int64))
    elif array.ndim == 4 and array.dtype == np.uint8 and array.shape[-1] == 3:
        with torch.no_grad():
            tokens = trainer.world.encode(torch.from_numpy(array))
    else:
        raise ValueError(f"{where}: {file} must be (H, N) integer token ids or (H, h, w, 3) uint8 frames, "
                         f"got {array.dtype} {array.shape}")
    if tokens.shape != (horizon, tokens_per_frame):
        raise ValueError(f"{where}: {file} gives tokens {tuple(tokens.shape)}, expected ({horizon}, "
                         f"{tokens_per_frame}) = (horizon, tokens per frame)")
    vocab = trainer.world.vocab_size
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(f"{where}: {file} has token ids outside [0, {vocab})")
    return tokens


# --- reference log-probs, cached on disk -------------------------------------------------------------
class ReferenceCache:
    """Sequence log-probs of the reference, (ref_chosen, ref_rejected) per pair id, in a safetensors file.

    The file records the base model's weights hash; a cache made for another base is ignored."""

    def __init__(self, path: Path, base_hash: str):
        self.path, self.base_hash = Path(path), base_hash
        self.values: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as handle:
                if (handle.metadata() or {}).get("base_weights_sha256") == base_hash:
                    self.values = {key: handle.get_tensor(key) for key in handle.keys()}

    def lookup(self, ids: list[str], compute) -> tuple[torch.Tensor, int, int]:
        """(P, 2) float64 reference log-probs for `ids`; `compute(missing_positions) -> (M, 2)` fills
        the missing ones, which are then written to disk. Returns (values, hits, misses)."""
        missing = [i for i, key in enumerate(ids) if key not in self.values]
        if missing:
            computed = compute(torch.tensor(missing)).double().cpu()
            for position, value in zip(missing, computed):
                self.values[ids[position]] = value.clone()
            self.save()
        return torch.stack([self.values[key] for key in ids]), len(ids) - len(missing), len(missing)

    def save(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        save_file(self.values, str(staging), metadata={"base_weights_sha256": self.base_hash})
        os.replace(staging, self.path)  # atomic: a kill mid-write leaves the previous cache intact


@contextmanager
def reference_model(trainer: Trainer):
    """The reference policy: the frozen copy (full fine-tuning) or the policy with its adapter disabled."""
    if trainer.reference is not None:
        yield trainer.reference
    else:
        with trainer.policy.disable_adapter():
            yield trainer.policy


def reference_logprobs(trainer: Trainer, config: DPOConfig, cache: ReferenceCache, pairs: Pairs):
    """(P, 2) cached reference sequence log-probs of (chosen, rejected), plus (hits, misses)."""
    def compute(positions):
        chosen, rejected = pairs.chosen[positions], pairs.rejected[positions]
        actions = trainer.prompt_actions[pairs.episode_index[positions]]
        both = trainer.reference_logprobs(torch.cat([chosen, rejected]), torch.cat([actions, actions]),
                                          config.num_context, 1.0).double().sum(-1)  # (2M,)
        return torch.stack(both.chunk(2), 1)
    return cache.lookup(pairs.ids, compute)


# --- the loop --------------------------------------------------------------------------------------
def run(config: DPOConfig):
    trainer = Trainer(config, method="dpo")
    if not config.lora.enabled:
        from posttrain.models import load_model

        trainer.reference = load_model(config.model).eval()  # frozen base: the reference under full FT
    rank = trainer.accelerator.process_index
    cache = ReferenceCache(trainer.out / "reference_cache" / f"rank{rank}.safetensors", trainer.base_hash)
    fixed = None
    if config.pairs.source != "online":
        started = time.perf_counter()
        fixed, info = _fixed_pairs(trainer, config)
        fixed_ref, hits, misses = reference_logprobs(trainer, config, cache, fixed)
        trainer.log.write({"stage": "pairs", "source": config.pairs.source, "pairs": len(fixed.ids),
                           "reference_cache_hits": hits, "reference_cache_misses": misses,
                           "seconds": time.perf_counter() - started, **info})
        if not fixed.ids:
            raise ValueError(f"pairs.source={config.pairs.source}: no usable pairs (all ties or failures)")
        fixed_ref_by_id = dict(zip(fixed.ids, fixed_ref))
    else:
        fixed_ref_by_id = None
    return trainer.fit(lambda step: dpo_step(trainer, config, cache, step, fixed, fixed_ref_by_id))


def _fixed_pairs(trainer: Trainer, config: DPOConfig) -> tuple[Pairs, dict]:
    """Offline pairs (made once from the base and saved in the run folder) or the JSONL pairs."""
    if config.pairs.source == "jsonl":
        return load_jsonl_pairs(trainer, config, config.pairs.path), {}
    from safetensors.torch import load_file, save_file

    path = trainer.out / "offline_pairs.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        seeds = trainer.episodes["seed"]
        index = saved["episode_index"]
        ids = [pair_id("offline", int(seeds[p]), c, r, trainer.prompt_actions[p])
               for p, c, r in zip(index.tolist(), saved["chosen"], saved["rejected"])]
        return Pairs(saved["chosen"], saved["rejected"], index, ids, saved["chosen_reward"],
                     saved["rejected_reward"]), {"reused": True}
    # Every rank makes the same pairs (seeded), so no broadcast is needed; rank 0 writes them.
    with reference_model(trainer) as base:
        pairs, stats = sample_pairs(trainer, config, base, torch.arange(trainer.num_prompts), OFFLINE_STEP, "offline")
    if trainer.accelerator.is_main_process:
        trainer.out.mkdir(parents=True, exist_ok=True)
        save_file({"chosen": pairs.chosen.contiguous(), "rejected": pairs.rejected.contiguous(),
                   "episode_index": pairs.episode_index.contiguous(),
                   "chosen_reward": pairs.chosen_reward.contiguous(),
                   "rejected_reward": pairs.rejected_reward.contiguous()}, str(path))
    return pairs, {"skipped_ties": stats["skipped_ties"], "skipped_invalid": stats["skipped_invalid"]}


def dpo_step(trainer: Trainer, config: DPOConfig, cache: ReferenceCache, step: int,
             fixed: Pairs | None = None, fixed_ref: dict | None = None) -> dict:
    """Make (online) or pick (offline/jsonl) this step's pairs and take one optimizer step on them."""
    acc = trainer.accelerator
    timings, metrics = {}, {}
    started = time.perf_counter()
    if fixed is None:
        prompts = prompt_schedule(trainer.num_prompts, config.prompts_per_step, step, config.seed)
        local = prompts[acc.process_index:: acc.num_processes]
        pairs, stats = sample_pairs(trainer, config, trainer.policy, local, step, "online")
        metrics.update(trainer.reduce_reward_metrics(stats["scores"], stats["valid"]))
        metrics["skipped_ties"] = int(trainer.reduce_sum(stats["skipped_ties"]))
        metrics["skipped_invalid"] = int(trainer.reduce_sum(stats["skipped_invalid"]))
        timings["sample"] = time.perf_counter() - started
        started = time.perf_counter()
        ref, hits, misses = reference_logprobs(trainer, config, cache, pairs)
        timings["reference"] = time.perf_counter() - started
    else:
        chosen_index = prompt_schedule(len(fixed.ids), config.prompts_per_step, step, config.seed)
        pairs = fixed.select(chosen_index[acc.process_index:: acc.num_processes])
        ref = torch.stack([fixed_ref[key] for key in pairs.ids]) if pairs.ids else torch.zeros(0, 2)
        hits, misses = len(pairs.ids), 0
    metrics["reference_cache_hits"] = int(trainer.reduce_sum(hits))
    metrics["reference_cache_misses"] = int(trainer.reduce_sum(misses))
    if pairs.chosen_reward is not None and len(pairs.ids):
        metrics["verifier_gap"] = trainer.reduce_mean(float((pairs.chosen_reward - pairs.rejected_reward).mean()))

    started = time.perf_counter()
    num_pairs = int(round(trainer.reduce_sum(len(pairs.ids))))
    metrics["pairs"] = num_pairs
    if num_pairs == 0:
        # Every group tied or failed on every rank: no gradient this step (counted in skipped_*).
        metrics.update({"loss": float("nan"), "reward_accuracy": float("nan")})
        return metrics
    weight = torch.ones(len(pairs.ids))
    if not len(pairs.ids):
        # This rank has no pair but others do: a zero-weight placeholder keeps DDP's all-reduce in step.
        pairs, ref, weight = _placeholder(trainer, config), torch.zeros(1, 2), torch.zeros(1)
    # Rows interleaved [c0, r0, c1, r1, ...]; update(align=2) never splits a pair across micro-batches.
    tokens = torch.stack([pairs.chosen, pairs.rejected], 1).flatten(0, 1)  # (2P, T, N)
    actions = trainer.prompt_actions[pairs.episode_index].repeat_interleave(2, 0)  # (2P, T - 1)
    num_tokens = config.horizon * tokens.shape[-1]

    def loss_fn(new_logp, index):
        sequence = new_logp.flatten(1).sum(-1)  # (b,) summed log-probs of the response tokens
        pair_index = index[0::2] // 2
        loss, chosen_reward, rejected_reward = dpo_loss(
            sequence[0::2], sequence[1::2], ref[pair_index, 0].to(sequence), ref[pair_index, 1].to(sequence),
            config.beta, config.loss_type, config.label_smoothing, num_tokens)
        w = weight[pair_index].to(sequence)
        margin = chosen_reward - rejected_reward
        stats = {"loss": float((loss.detach() * w).sum()), "accuracy": float(((margin > 0).float() * w).sum()),
                 "chosen_reward": float((chosen_reward * w).sum()),
                 "rejected_reward": float((rejected_reward * w).sum()), "margin": float((margin * w).sum()),
                 "logp_chosen": float((sequence[0::2].detach() * w).sum()),
                 "logp_rejected": float((sequence[1::2].detach() * w).sum())}
        return (loss * w).sum() / num_pairs, stats

    stats = trainer.update(tokens, actions, None, loss_fn, align=2)
    timings["update"] = time.perf_counter() - started
    for key, name in (("loss", "loss"), ("accuracy", "reward_accuracy"), ("chosen_reward", "rewards/chosen"),
                      ("rejected_reward", "rewards/rejected"), ("margin", "rewards/margin"),
                      ("logp_chosen", "logps/chosen"), ("logp_rejected", "logps/rejected")):
        metrics[name] = trainer.reduce_sum(stats[key]) / num_pairs
    if "grad_norm" in stats:
        metrics["grad_norm"] = stats["grad_norm"]
    metrics["skipped_nonfinite"] = stats["skipped_nonfinite"]
    total_time = sum(timings.values())
    metrics.update({f"time_share_{k}": v / total_time for k, v in timings.items()})
    metrics["step_seconds"] = total_time
    if trainer.should_save_video(step) and weight[0] > 0:
        with torch.no_grad():  # the first pair's chosen rollout beside the truth
            frames = trainer.world.decode(pairs.chosen[:1, config.num_context:])
        trainer.save_video(step, pairs.chosen[:1, : config.num_context], frames, pairs.episode_index[:1])
    return metrics


def _placeholder(trainer: Trainer, config: DPOConfig) -> Pairs:
    tokens = trainer.prompt_tokens[:1, : config.num_context + config.horizon]
    return Pairs(tokens, tokens, torch.zeros(1, dtype=torch.long), ["placeholder"])
