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

On a flow model (`FlowWorldModel`) `flow_score` picks what log pi is: `paths`, the exact log-density of the
SDE paths the rollouts took (the protocol's score); or `denoising`, Diffusion-DPO's surrogate (Wallace et al.
2023, arXiv 2311.12908; Flow-DPO for rectified flows): minus the flow-matching error of every response frame,
noised at a time and noise drawn from the pair's id, shared by chosen and rejected and by the policy and the
reference. Then h = -(err_pi(c) - err_ref(c)) + (err_pi(r) - err_ref(r)) and the sigmoid loss is exactly
Diffusion-DPO's -log sigmoid(-beta T [...]) with beta T -> beta. Offline and JSONL pairs keep one (t, eps) each
for the whole run (the reference values are cached per pair), where Diffusion-DPO redraws them every step.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from posttrain import rollouts, training
from posttrain.config import to_dict
from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.envs3d.jobs import atomic_write
from posttrain.report import save_step_video
from posttrain.rewards import RewardSpec, check_reward_specs

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
class DPOConfig(training.RunConfig):
    """DPO recipe: model, data, pairs, loss, optimisation, rewards, logging, evaluation."""

    method: str = "dpo"
    """Recipe kind (fixed)."""
    out: str = "runs/dpo"
    """Run folder (metrics.jsonl, checkpoints/, reference_cache/, adapter/, report/)."""
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
    flow_score: str = "paths"
    """Flow models only: paths (the SDE paths' exact log-probs) | denoising (Diffusion-DPO's flow-matching
    surrogate; see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.flow_score not in ("paths", "denoising"):
            raise ValueError(f"flow_score={self.flow_score!r}; choose paths or denoising")
        from posttrain.config import require

        require(self, positive=("num_context", "horizon", "group_size", "prompts_per_step", "steps",
                                "reward_workers", "top_k"),
                non_negative=("sample_temperature",), unit=("max_failure_fraction", "top_p"))
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
        if self.pairs.source != "jsonl" and self.sample_temperature == 0:
            raise ValueError("sample_temperature=0 makes every rollout of a group the same (greedy): every group "
                             "ties and no pair is made; sample with sample_temperature > 0")
        if self.pairs.source != "jsonl" and self.top_p == 0:
            raise ValueError("top_p=0 keeps no token; give a value in (0, 1]")


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
    """(P,) index into the training episodes (gives the actions and the prompt seed)."""
    ids: list[str]
    """Pair ids (reference-cache keys)."""
    chosen_reward: torch.Tensor | None = None
    """(P,) verifier reward of the chosen rollout (None for jsonl)."""
    rejected_reward: torch.Tensor | None = None
    """(P,) verifier reward of the rejected rollout (None for jsonl)."""

    def select(self, index: torch.Tensor) -> Pairs:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Pairs(self.chosen[index], self.rejected[index], self.episode_index[index],
                     [self.ids[i] for i in index.tolist()], pick(self.chosen_reward), pick(self.rejected_reward))


def pair_id(source: str, prompt_seed: int, chosen: torch.Tensor, rejected: torch.Tensor,
            actions: torch.Tensor) -> str:
    """A readable, content-derived key: the same tokens and actions always map to the same id."""
    digest = hashlib.sha256()
    for tensor in (chosen, rejected, actions):
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return f"{source}-{int(prompt_seed)}-{digest.hexdigest()[:16]}"


@torch.no_grad()
def sample_pairs(model, prompts: torch.Tensor, step: int, source: str, *, config: DPOConfig, episodes: dict,
                 episode_tokens: torch.Tensor, scorer: rollouts.RolloutScorer, chunk: int):
    """Sample group_size rollouts per prompt from `model`, score, keep best vs worst. Returns (Pairs, stats)."""
    group = config.group_size
    episode_index = prompts.repeat_interleave(group)
    sample_ids = torch.arange(group).repeat(len(prompts))
    context = episode_tokens[episode_index, : config.num_context]
    actions = episodes["actions"][episode_index]
    seeds = rollouts.group_seeds(config.seed, step, episode_index, sample_ids)
    was_training = model.training
    model.eval()
    out = rollouts.generate(model, context, actions, config.horizon, seeds, temperature=config.sample_temperature,
                            top_k=config.top_k, top_p=config.top_p, chunk=chunk)
    model.train(was_training)
    scores = scorer.score(out.frames, episode_index, sample_ids)
    rewards = scores.total.view(len(prompts), group)
    valid = scores.valid.view(len(prompts), group)
    keep, best, worst, ties, invalid = rollouts.best_and_worst(rewards, valid)
    rows = torch.arange(len(prompts))[keep]
    full = torch.cat([context, out.tokens], 1).view(len(prompts), group, config.num_context + config.horizon, -1)
    # full: (P, G, T, N) context + rollout tokens per prompt and sample
    chosen, rejected = full[rows, best[rows]], full[rows, worst[rows]]
    kept_prompts = prompts[rows]
    ids = [pair_id(source, int(episodes["seed"][p]), c, r, episodes["actions"][p])
           for p, c, r in zip(kept_prompts.tolist(), chosen, rejected)]
    pairs = Pairs(chosen, rejected, kept_prompts, ids, rewards[rows, best[rows]], rewards[rows, worst[rows]])
    return pairs, {"skipped_ties": ties, "skipped_invalid": invalid, "scores": scores}


def load_jsonl_pairs(path: str | Path, *, world, episodes: dict, episode_tokens: torch.Tensor, num_context: int,
                     horizon: int, data_seeds: str = "") -> Pairs:
    """A person's preferences -> Pairs (see the module docstring for the line format). episodes/episode_tokens:
    the training episodes, whose seeds the lines' prompt_ids name; data_seeds: how they were chosen (for errors)."""
    from posttrain.rewards.reward_model import read_pair_lines

    where = {int(s): i for i, s in enumerate(episodes["seed"].tolist())}
    n = episode_tokens.shape[-1]  # tokens per frame
    chosen, rejected, index, ids = [], [], [], []
    for line in read_pair_lines(path):
        if line.prompt_id not in where:
            raise ValueError(f"{line.where}: prompt_id {line.prompt_id} is not an episode seed of data.seeds="
                             f"{data_seeds!r}")
        episode = where[line.prompt_id]
        context = episode_tokens[episode, :num_context]
        sides = [torch.cat([context, _load_rollout_tokens(world, file, horizon, n, f"{line.where} {key}")])
                 for key, file in (("chosen", line.chosen), ("rejected", line.rejected))]
        chosen.append(sides[0])
        rejected.append(sides[1])
        index.append(episode)
        ids.append(pair_id("jsonl", line.prompt_id, sides[0], sides[1], episodes["actions"][episode]))
    return Pairs(torch.stack(chosen), torch.stack(rejected), torch.tensor(index), ids)


def _load_rollout_tokens(world, file: Path, horizon: int, tokens_per_frame: int, where: str):
    """(horizon, N) token ids from a token .npy (H, N) or a uint8 frame .npy (H, h, w, 3)."""
    from posttrain.rewards.reward_model import load_npy

    try:
        array = load_npy(file)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        tokens = torch.from_numpy(array.astype(np.int64))
    elif array.ndim == 4 and array.dtype == np.uint8 and array.shape[-1] == 3:
        size = getattr(world, "image_size", None)
        if size and array.shape[1:3] != (size, size):
            raise ValueError(f"{where}: {file} holds {array.shape[2]}x{array.shape[1]} frames; the model reads "
                             f"{size}x{size}")
        with torch.no_grad():
            tokens = world.encode(torch.from_numpy(array))
    else:
        raise ValueError(f"{where}: {file} must be (H, N) integer token ids or (H, h, w, 3) uint8 frames, "
                         f"got {array.dtype} {array.shape}")
    if tokens.shape != (horizon, tokens_per_frame):
        raise ValueError(f"{where}: {file} gives tokens {tuple(tokens.shape)}, expected ({horizon}, "
                         f"{tokens_per_frame}) = (horizon, tokens per frame)")
    vocab = world.vocab_size
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(f"{where}: {file} has token ids outside [0, {vocab})")
    return tokens


def fixed_pairs(session: training.Session, config: DPOConfig, episodes: dict, episode_tokens: torch.Tensor,
                scorer: rollouts.RolloutScorer) -> tuple[Pairs, dict]:
    """Offline pairs (made once from the base and saved in the run folder) or the JSONL pairs."""
    if config.pairs.source == "jsonl":
        return load_jsonl_pairs(config.pairs.path, world=session.world, episodes=episodes,
                                episode_tokens=episode_tokens, num_context=config.num_context,
                                horizon=config.horizon, data_seeds=config.data.seeds), {}
    from safetensors.torch import load_file, save_file

    path = session.out / "offline_pairs.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        index = saved["episode_index"]
        ids = [pair_id("offline", int(episodes["seed"][p]), c, r, episodes["actions"][p])
               for p, c, r in zip(index.tolist(), saved["chosen"], saved["rejected"])]
        return Pairs(saved["chosen"], saved["rejected"], index, ids, saved["chosen_reward"],
                     saved["rejected_reward"]), {"reused": True}
    # Every rank makes the same pairs (seeded), so no broadcast is needed; rank 0 writes them.
    with rollouts.reference_policy(session.policy, session.reference) as base:
        pairs, stats = sample_pairs(base, torch.arange(len(episode_tokens)), OFFLINE_STEP, "offline", config=config,
                                    episodes=episodes, episode_tokens=episode_tokens, scorer=scorer,
                                    chunk=config.train.rollout_batch_size)
    if session.accelerator.is_main_process:
        session.out.mkdir(parents=True, exist_ok=True)
        save_file({"chosen": pairs.chosen.contiguous(), "rejected": pairs.rejected.contiguous(),
                   "episode_index": pairs.episode_index.contiguous(),
                   "chosen_reward": pairs.chosen_reward.contiguous(),
                   "rejected_reward": pairs.rejected_reward.contiguous()}, str(path))
    return pairs, {"skipped_ties": stats["skipped_ties"], "skipped_invalid": stats["skipped_invalid"]}


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
        if not ids:  # a step whose every group tied or failed has no pair to look up
            return torch.zeros(0, 2, dtype=torch.float64), 0, 0
        missing = [i for i, key in enumerate(ids) if key not in self.values]
        if missing:
            computed = compute(torch.tensor(missing)).double().cpu()
            for position, value in zip(missing, computed):
                self.values[ids[position]] = value.clone()
            self.save()
        return torch.stack([self.values[key] for key in ids]), len(ids) - len(missing), len(missing)

    def save(self) -> None:
        from safetensors.torch import save_file

        # Atomic: a kill mid-write leaves the previous cache intact.
        atomic_write(self.path, lambda staging: save_file(self.values, str(staging),
                                                          metadata={"base_weights_sha256": self.base_hash}))


def pair_noise_seeds(ids: list[str]) -> torch.Tensor:
    """(P,) int64 seeds for the denoising score's (t, eps), one per pair id (48 bits of its sha256)."""
    return torch.tensor([int(hashlib.sha256(i.encode()).hexdigest()[:12], 16) for i in ids], dtype=torch.long)


def score_kwargs(config: DPOConfig, world, ids: list[str], rows_per_pair: int) -> dict:
    """What the model's forward takes besides the tokens for this recipe's score: nothing (its log-probs), or
    for `flow_score: denoising` the flow-matching objective with each pair's noise seed on its rows."""
    if config.flow_score == "paths":
        return {}
    if not getattr(world, "sft_objective", None):
        raise ValueError(f"flow_score=denoising is Diffusion-DPO's surrogate for a flow model; "
                         f"{type(world).__name__} has none: use flow_score=paths")
    seeds = pair_noise_seeds(ids)
    if rows_per_pair == 2:  # interleaved [c0, r0, c1, r1, ...]
        seeds = seeds.repeat_interleave(2)
    return {"objective": world.sft_objective, "noise_seeds": seeds}


def cached_reference_logprobs(session: training.Session, cache: ReferenceCache, pairs: Pairs,
                              actions: torch.Tensor, num_context: int, config: DPOConfig | None = None):
    """(P, 2) reference sequence log-probs of (chosen, rejected), from the cache or computed (at
    temperature 1) and cached; plus (hits, misses). actions: (E, T - 1) of every training episode."""
    def compute(positions):
        chosen, rejected = pairs.chosen[positions], pairs.rejected[positions]
        pair_actions = actions[pairs.episode_index[positions]]
        kwargs = {} if config is None else score_kwargs(config, session.world, [pairs.ids[i] for i in positions], 1)
        if "noise_seeds" in kwargs:  # rows [c0..cM, r0..rM]: each pair's seed on both of its rows
            kwargs["noise_seeds"] = kwargs["noise_seeds"].repeat(2)
        both = rollouts.reference_logprobs(session.policy, session.reference, torch.cat([chosen, rejected]),
                                           torch.cat([pair_actions, pair_actions]), num_context, 1.0,
                                           chunk=session.settings.micro_batch_size,
                                           forward_kwargs=kwargs).double().sum(-1)  # (2M,)
        return torch.stack(both.chunk(2), 1)
    return cache.lookup(pairs.ids, compute)


def pair_loss(config: DPOConfig, ref: torch.Tensor, weight: torch.Tensor, num_pairs: int, num_tokens: int):
    """The `loss_fn(new_logp, index)` training.update calls per micro-batch of interleaved rows
    [c0, r0, c1, r1, ...]: `dpo_loss` over its pairs, weighted (0 for a placeholder pair), divided by the
    global number of pairs; stats are weighted sums."""
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
    return loss_fn


# --- the loop --------------------------------------------------------------------------------------
def run(config: DPOConfig):
    """Set up, make the fixed pairs (offline/jsonl) once, then for each step: make (online) or pick this
    step's pairs with their reference log-probs, take one optimizer step on the DPO loss, log, checkpoint."""
    if config.pairs.source != "jsonl":  # before any work: a bad reward would otherwise fail after the rollouts
        check_reward_specs(config.rewards)
    session = training.setup("dpo", out=config.out, model=config.model, seed=config.seed, settings=config.train,
                             lora=config.lora, recipe=to_dict(config), resume=config.resume,
                             overwrite=config.overwrite, frozen_reference=True)
    acc, settings = session.accelerator, config.train
    score_kwargs(config, session.world, [], 1)  # refuses flow_score=denoising on a model without that objective
    episodes = load_episodes(config.data, rollouts.EPISODE_FIELDS, progress=acc.is_main_process)
    episode_tokens = rollouts.encode_episodes(session.world, episodes["frames"])  # (E, T, N)
    scorer = rollouts.RolloutScorer(config.rewards, episodes, episode_tokens, session.world, config.num_context,
                                    max_failure_fraction=config.max_failure_fraction, workers=config.reward_workers)
    cache = ReferenceCache(session.out / "reference_cache" / f"rank{acc.process_index}.safetensors", session.base_hash)
    fixed = fixed_ref = None
    if config.pairs.source != "online":
        started = time.perf_counter()
        fixed, info = fixed_pairs(session, config, episodes, episode_tokens, scorer)
        values, hits, misses = cached_reference_logprobs(session, cache, fixed, episodes["actions"], config.num_context,
                                                         config)
        session.metrics.write({"stage": "pairs", "source": config.pairs.source, "pairs": len(fixed.ids),
                               "reference_cache_hits": hits, "reference_cache_misses": misses,
                               "seconds": time.perf_counter() - started, **info})
        if not fixed.ids:
            raise ValueError(f"pairs.source={config.pairs.source}: no usable pairs (all ties or failures)")
        fixed_ref = dict(zip(fixed.ids, values))

    with training.Steps(session, total=config.steps, resume=config.resume) as steps:
        for step in steps:
            timings, metrics = {}, {}
            # 1. This step's pairs and their reference log-probs: sampled from the current policy and
            #    ranked by the rewards (online), or this process's share of the fixed pairs.
            started = time.perf_counter()
            if fixed is None:
                prompts = rollouts.prompt_schedule(len(episode_tokens), config.prompts_per_step, step, config.seed)
                pairs, stats = sample_pairs(session.policy, prompts[acc.process_index:: acc.num_processes], step,
                                            "online", config=config, episodes=episodes, episode_tokens=episode_tokens,
                                            scorer=scorer, chunk=settings.rollout_batch_size)
                metrics.update(training.reward_metrics(acc, stats["scores"], stats["scores"].valid))
                metrics["skipped_ties"] = int(training.reduce_sum(acc, stats["skipped_ties"]))
                metrics["skipped_invalid"] = int(training.reduce_sum(acc, stats["skipped_invalid"]))
                timings["sample"] = time.perf_counter() - started
                started = time.perf_counter()
                ref, hits, misses = cached_reference_logprobs(session, cache, pairs, episodes["actions"],
                                                              config.num_context, config)
                timings["reference"] = time.perf_counter() - started
            else:
                chosen_index = rollouts.prompt_schedule(len(fixed.ids), config.prompts_per_step, step, config.seed)
                pairs = fixed.select(chosen_index[acc.process_index:: acc.num_processes])
                ref = torch.stack([fixed_ref[key] for key in pairs.ids]) if pairs.ids else torch.zeros(0, 2)
                hits, misses = len(pairs.ids), 0
            metrics["reference_cache_hits"] = int(training.reduce_sum(acc, hits))
            metrics["reference_cache_misses"] = int(training.reduce_sum(acc, misses))
            if pairs.chosen_reward is not None and len(pairs.ids):
                gap = float((pairs.chosen_reward - pairs.rejected_reward).mean())
                metrics["verifier_gap"] = training.reduce_mean(acc, gap)
            num_pairs = int(round(training.reduce_sum(acc, len(pairs.ids))))
            metrics["pairs"] = num_pairs
            if num_pairs == 0:
                # Every group tied or failed on every rank: no gradient this step (counted in skipped_*).
                metrics.update({"loss": float("nan"), "reward_accuracy": float("nan")})
                steps.done(step, metrics)
                continue

            # 2. One optimizer step on the DPO loss.
            started = time.perf_counter()
            weight = torch.ones(len(pairs.ids))
            if not len(pairs.ids):
                # This rank has no pair but others do: a zero-weight placeholder keeps DDP's all-reduce in step.
                placeholder = episode_tokens[:1, : config.num_context + config.horizon]
                pairs = Pairs(placeholder, placeholder, torch.zeros(1, dtype=torch.long), ["placeholder"])
                ref, weight = torch.zeros(1, 2), torch.zeros(1)
            # Rows interleaved [c0, r0, c1, r1, ...]; update(align=2) never splits a pair across micro-batches.
            tokens = torch.stack([pairs.chosen, pairs.rejected], 1).flatten(0, 1)  # (2P, T, N)
            actions = episodes["actions"][pairs.episode_index].repeat_interleave(2, 0)  # (2P, T - 1)
            forward_kwargs = score_kwargs(config, session.world, pairs.ids, 2)
            per_frame = (getattr(session.world, "sft_values_per_frame", tokens.shape[-1]) if forward_kwargs
                         else getattr(session.world, "logprobs_per_frame", tokens.shape[-1]))
            loss_fn = pair_loss(config, ref, weight, num_pairs, num_tokens=config.horizon * per_frame)
            stats = training.update(session, tokens, actions, loss_fn, num_context=config.num_context, align=2,
                                    forward_kwargs=forward_kwargs)
            timings["update"] = time.perf_counter() - started

            # 3. Log (reduced over processes), video, checkpoint.
            for key, name in (("loss", "loss"), ("accuracy", "reward_accuracy"), ("chosen_reward", "rewards/chosen"),
                              ("rejected_reward", "rewards/rejected"), ("margin", "rewards/margin"),
                              ("logp_chosen", "logps/chosen"), ("logp_rejected", "logps/rejected")):
                metrics[name] = training.reduce_sum(acc, stats[key]) / num_pairs
            if "grad_norm" in stats:
                metrics["grad_norm"] = stats["grad_norm"]
            metrics["skipped_nonfinite"] = stats["skipped_nonfinite"]
            total_time = sum(timings.values())
            metrics.update({f"time_share_{k}": v / total_time for k, v in timings.items()})
            metrics["step_seconds"] = total_time
            if steps.video_due(step) and weight[0] > 0:
                with torch.no_grad():  # the first pair's chosen rollout beside the truth
                    frames = session.world.decode(pairs.chosen[:1, config.num_context:])
                save_step_video(session.out, step, episodes["frames"][int(pairs.episode_index[0])], config.num_context,
                                frames[0])
            steps.done(step, metrics)

    result = training.finish(session, steps.history, recipe=to_dict(config), eval_config=config.eval,
                             eval_temperatures=config.eval_temperatures)
    scorer.close()
    return result
