"""Train the learned reward model on preference pairs of world-model rollouts ranked by the verifiers.

    posttrain run recipes/reward_model.yaml
    (single process only: the reward model is tiny; `accelerate launch` would only duplicate the work)

Pairs: for each envs3d episode in `data`, `group_size` rollouts are sampled from `model`
(seeds derived from (seed, episode index, sample), as everywhere in posttrain), scored with
the recipe's `rewards` against the simulator; chosen = best, rejected = worst, ties and
failed scores dropped (counted). Or, with `pairs_path`, a person's JSONL read by
`posttrain.rewards.reward_model.load_pairs_jsonl` (frames .npy / .png strips).
The Bradley-Terry reward model (`posttrain.rewards.reward_model`) is fitted with a held-out
split by prompt, its held-out pair accuracy reported, and it is saved to `out/reward_model`,
so a recipe can use it as `rewards: [{name: learned, params: {path: OUT/reward_model}}]`.

Where this departs from RLHF reward modelling: the "annotator" is a verifier; the learned
model is useful where the verifier needs ground truth that is missing at scoring time
(footage) or is too slow to call in the loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import rollouts
from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.logging_utils import MetricsWriter, progress_bar
from posttrain.rewards import RewardSpec, check_reward_specs
from posttrain.rewards.reward_model import (
    PreferencePairs,
    RewardModelConfig,
    load_pairs_jsonl,
    save_reward_model,
    train_reward_model,
)


@dataclass
class RewardModelRecipe:
    """Reward-model recipe: where pairs come from, how they are ranked, how the model is trained."""

    method: str = "reward_model"
    """Recipe kind (fixed)."""
    out: str = "runs/reward_model"
    """Run folder: reward_model/ (the saved model), report.json, metrics.jsonl."""
    model: str = "default"
    """World model that samples the rollouts: 'default' (embedded) or a save_pretrained folder."""
    seed: int = 0
    """Seed for rollout sampling (the reward model's own seed is reward_model.seed)."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="20000:20256", frames=14))
    """Episodes used as prompts; frames must equal num_context + horizon."""
    num_context: int = 2
    """True context frames per prompt."""
    horizon: int = 12
    """Frames per rollout."""
    group_size: int = 2
    """Rollouts per prompt; the best and the worst make one pair."""
    temperature: float = 1.0
    """Sampling temperature for the rollouts."""
    top_k: int | None = None
    """Optional top-k truncation while sampling."""
    top_p: float | None = None
    """Optional top-p truncation while sampling."""
    rollout_batch_size: int = 32
    """Rollouts per forward pass while sampling."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="psnr", weight=1.0)])
    """Verifier rewards that rank the rollouts (the labels the reward model learns)."""
    max_failure_fraction: float = 0.25
    """Stop when more than this share of a batch's samples fail reward evaluation."""
    reward_workers: int = 1
    """Processes scoring rewards."""
    pairs_path: str = ""
    """A person's preference JSONL (see load_pairs_jsonl); when set, no rollouts are sampled."""
    overwrite: bool = False
    """Replace a previous reward-model run in `out` (set by `posttrain run --overwrite`)."""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Reward-model architecture and training (steps, lr, held-out fraction, seed)."""

    def __post_init__(self) -> None:
        if not self.pairs_path and self.data.frames != self.num_context + self.horizon:
            raise ValueError(f"data.frames={self.data.frames} must equal num_context + horizon = "
                             f"{self.num_context + self.horizon}")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2 (a pair needs two rollouts)")
        from posttrain.config import require

        require(self, positive=("num_context", "horizon", "rollout_batch_size", "reward_workers", "top_k"),
                non_negative=("temperature",), unit=("max_failure_fraction",), open_unit=("top_p",))


@torch.no_grad()
def sample_preference_pairs(config: RewardModelRecipe, progress: bool = True) -> tuple[PreferencePairs, dict]:
    """Roll `config.model` out on every episode, rank each group with the verifiers, keep best vs worst."""
    from posttrain.models import load_model

    model = load_model(config.model).eval()
    episodes = load_episodes(config.data, rollouts.EPISODE_FIELDS, progress=progress)
    episode_tokens = rollouts.encode_episodes(model, episodes["frames"])  # (E, T, N)
    scorer = rollouts.RolloutScorer(config.rewards, episodes, episode_tokens, model, config.num_context,
                                    max_failure_fraction=config.max_failure_fraction, workers=config.reward_workers)
    count, group = episodes["frames"].shape[0], config.group_size
    chosen, rejected, context, prompt_ids = [], [], [], []
    stats = {"prompts": count, "skipped_ties": 0, "skipped_invalid": 0, "verifier_gap_sum": 0.0}
    per_forward = max(1, config.rollout_batch_size // group)
    try:
        with progress_bar(count, "pairs", enabled=progress) as update:
            for start in range(0, count, per_forward):
                prompts = torch.arange(start, min(start + per_forward, count))
                index = prompts.repeat_interleave(group)
                samples = torch.arange(group).repeat(len(prompts))
                # Seeds from (seed, episode, sample): there is no training step here.
                seeds = [rollouts.rollout_seed(config.seed, p, g) for p, g in zip(index.tolist(), samples.tolist())]
                out = rollouts.generate(model, episode_tokens[index, : config.num_context], episodes["actions"][index],
                                        config.horizon, seeds, temperature=config.temperature, top_k=config.top_k,
                                        top_p=config.top_p, chunk=len(index))
                scores = scorer.score(out.frames, index, samples)
                totals = scores.total.view(len(prompts), group)
                keep, best, worst, ties, invalid = rollouts.best_and_worst(totals, scores.valid.view(len(prompts), group))
                stats["skipped_ties"] += ties
                stats["skipped_invalid"] += invalid
                rows = torch.arange(len(prompts))[keep]
                grouped = out.frames.view(len(prompts), group, *out.frames.shape[1:])
                chosen.append(grouped[rows, best[rows]].float())
                rejected.append(grouped[rows, worst[rows]].float())
                context.append(scorer.context(prompts[rows]))
                prompt_ids.append(episodes["seed"][prompts[rows]])
                stats["verifier_gap_sum"] += float((totals[rows, best[rows]] - totals[rows, worst[rows]]).sum())
                update(len(prompts))
    finally:
        scorer.close()
    pairs = PreferencePairs(chosen=torch.cat(chosen), rejected=torch.cat(rejected), context=torch.cat(context),
                            prompt_ids=torch.cat(prompt_ids).long())
    stats["pairs"] = int(pairs.chosen.shape[0])
    stats["verifier_gap_mean"] = stats.pop("verifier_gap_sum") / max(stats["pairs"], 1)
    return pairs, stats


def run(config: RewardModelRecipe) -> Path:
    from posttrain.config import to_dict
    from posttrain.models.registry import resolve_model_path
    from posttrain.runfolder import RunLock, input_paths, prepare_run_folder

    if not config.pairs_path:
        check_reward_specs(config.rewards)
    out = Path(config.out)
    # The same run-folder rules as every other method: a non-empty `out` needs --overwrite (and then only a
    # folder a posttrain run wrote), and `out` may not be, contain or lie inside an input.
    inputs = input_paths(to_dict(config))  # pairs_path, data.path, a learned reward's params.path
    if not config.pairs_path:
        inputs["world model"] = resolve_model_path(config.model)
    prepare_run_folder(out, resume=False, overwrite=config.overwrite, inputs=inputs)
    lock = RunLock(out, "reward_model")  # noqa: F841 (held until the process ends)
    log = MetricsWriter(out / "metrics.jsonl")
    started = time.perf_counter()
    if config.pairs_path:
        pairs = load_pairs_jsonl(config.pairs_path)
        stats = {"pairs": int(pairs.chosen.shape[0]), "source": config.pairs_path}
    else:
        pairs, stats = sample_preference_pairs(config)
    stats["pairs_seconds"] = round(time.perf_counter() - started, 2)
    if stats["pairs"] < 2:
        raise ValueError(f"only {stats['pairs']} usable pairs (ties/failures: {stats}); use more episodes")
    log.write({"stage": "pairs", **stats})
    started = time.perf_counter()
    model, report = train_reward_model(pairs, config.reward_model)
    report["train_seconds"] = round(time.perf_counter() - started, 2)
    path = save_reward_model(model, out / "reward_model", report)
    summary = {"reward_model": str(path), **stats, **report,
               "use_in_a_recipe": {"name": "learned", "params": {"path": str(path)}}}
    log.write({"stage": "reward_model", **report})
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"reward model: {stats['pairs']} pairs, held-out pair accuracy {report['heldout_accuracy']:.3f} "
          f"(train {report['train_accuracy']:.3f}) -> {path}")
    return path
