"""Supervised fine-tuning of a world model: teacher-forced next-frame token cross-entropy.

    posttrain run recipes/sft_tabletop.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m posttrain run recipes/sft_tabletop.yaml

Data (`data`, an EpisodeDataConfig) is either envs3d episodes (generated and cached) or a
footage folder: `data.path` pointing at a `datasets.save_to_disk` folder whose rows have
`frames` (T, H, W, 3) uint8 and `actions` (T - 1,) int64, all with the same T. Footage has
no simulator ground truth, so only those two columns are loaded and the rollout report
(PSNR/SSIM/3D consistency against the simulator) is skipped; the held-out teacher-forced
loss is always reported.

One step: `batch_size` random clips of `clip_frames` frames (a pure function of (seed, step),
so a resumed run sees the same clips), tokenised once up front with the frozen tokenizer; the
loss is the mean cross-entropy of every token of frames num_context.. given earlier frames and
actions, accumulated over micro-batches. LoRA trains only the adapter; full fine-tuning
trains the dynamics transformer (the tokenizer stays frozen: rewards and reports decode with it).

Held-out evaluation: `eval.data` clips (their first `clip_frames` frames) or, with `heldout_fraction`,
the last clips of the training dataset kept out of training; teacher-forced loss
of the base and of the fine-tuned model in `report/heldout_loss.json`, and every `eval_every`
steps in metrics.jsonl; plus, with `train.eval_at_end`, for envs3d data the shared rollout
report (report/metrics.json, index.html), for footage report/rollout.gif (greedy base and
fine-tuned rollouts from the first held-out clip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from posttrain.adapters import LoraSettings
from posttrain.data import EpisodeDataConfig, dataset_path, load_episodes
from posttrain.evaluate import EPISODE_FIELDS, EvalConfig
from posttrain.trainer_utils import Trainer, TrainerSettings

FOOTAGE_COLUMNS = ("frames", "actions")


@dataclass
class SFTConfig:
    """SFT recipe: model, data, clips, optimisation, held-out evaluation."""

    method: str = "sft"
    """Recipe kind (fixed)."""
    out: str = "runs/sft"
    """Run folder (metrics.jsonl, checkpoints/, adapter/ or model/, report/)."""
    model: str = "default"
    """Base model: 'default' (embedded) or a save_pretrained folder."""
    seed: int = 0
    """Seed for the clip sampling order."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="30000:30256", frames=16))
    """Training episodes: envs3d seeds, or a footage folder in `path` (frames + actions columns)."""
    clip_frames: int = 8
    """Frames per training clip (<= data.frames)."""
    num_context: int = 1
    """Frames at the start of a clip with no loss (1: every later frame is a target, as in pre-training)."""
    batch_size: int = 16
    """Clips per optimizer step (accumulated over train.micro_batch_size)."""
    steps: int = 200
    """Optimizer steps."""
    eval_every: int = 0
    """Steps between held-out teacher-forced losses in metrics.jsonl (0: only before and after)."""
    heldout_fraction: float = 0.0
    """Share of the training dataset's clips kept out of training as the held-out set instead of eval.data
    (0: eval.data); the last clips, i.e. the last sources of footage sorted by path (one may straddle the split)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (enabled=False: full fine-tuning of the dynamics transformer)."""
    train: TrainerSettings = field(default_factory=TrainerSettings)
    """Optimiser, precision, micro-batching, checkpoints and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out clips (teacher-forced loss) and, for envs3d data, the rollout report."""
    eval_temperatures: list[float] = field(default_factory=lambda: [1.0, 0.0])
    """Temperatures for the final base-vs-fine-tuned rollout comparison (0 = greedy)."""
    resume: bool = False
    """Continue from the newest checkpoint in `out` (set by `posttrain run --resume`)."""
    overwrite: bool = False
    """Replace a finished or failed run in `out` (set by `posttrain run --overwrite`; only a folder
    holding this toolkit's run marker is ever deleted)."""

    def __post_init__(self) -> None:
        from posttrain.config import require
        from posttrain.data import check_held_out

        require(self, positive=("clip_frames", "batch_size", "steps"), non_negative=("eval_every",))
        if any(not t >= 0 for t in self.eval_temperatures):
            raise ValueError(f"eval_temperatures={self.eval_temperatures} must be >= 0")
        if not self.heldout_fraction:
            check_held_out(self.data, self.eval.data)
        if not 1 <= self.num_context < self.clip_frames:
            raise ValueError(f"need 1 <= num_context ({self.num_context}) < clip_frames ({self.clip_frames})")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} is outside [0, 1)")
        if self.clip_frames > self.data.frames and not self.data.path:
            raise ValueError(f"clip_frames={self.clip_frames} exceeds data.frames={self.data.frames}")


def columns_for(data: EpisodeDataConfig) -> tuple[str, ...]:
    """EPISODE_FIELDS when the dataset has them all (envs3d), else just frames and actions (footage)."""
    from datasets import load_from_disk

    names = set(load_from_disk(str(dataset_path(data, progress=False))).column_names)
    return EPISODE_FIELDS if set(EPISODE_FIELDS) <= names else FOOTAGE_COLUMNS


def sample_clips(tokens: torch.Tensor, actions: torch.Tensor, batch_size: int, clip_frames: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clips: tokens (E, T, N), actions (E, T - 1) -> (B, clip, N) tokens, (B, clip - 1) actions."""
    episodes, frames = tokens.shape[:2]
    if clip_frames > frames:
        raise ValueError(f"clip_frames={clip_frames} exceeds the episodes' {frames} frames")
    index = torch.randint(episodes, (batch_size,), generator=generator)
    start = torch.randint(frames - clip_frames + 1, (batch_size,), generator=generator)
    offsets = start[:, None] + torch.arange(clip_frames)
    return tokens[index[:, None], offsets], actions[index[:, None], offsets[:, :-1]]


@torch.no_grad()
def teacher_forced_loss(model, tokens: torch.Tensor, actions: torch.Tensor, num_context: int,
                        batch: int = 16) -> float:
    """Mean per-token cross-entropy (nats) of frames num_context.. of `tokens` (E, T, N) under `model`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        logp = model(tokens[i: i + batch], actions[i: i + batch], num_context)  # (b, T - C, N)
        total += float(-logp.double().sum())
        count += logp.numel()
    model.train(was_training)
    return total / max(count, 1)


def heldout_clips(trainer: Trainer, config: SFTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first clip_frames frames of every held-out episode, tokenised: (E, clip, N), (E, clip - 1)."""
    episodes = load_episodes(config.eval.data, FOOTAGE_COLUMNS, progress=False)
    frames = episodes["frames"][:, : config.clip_frames]
    with torch.no_grad():
        tokens = torch.stack([trainer.world.encode(clip) for clip in frames])
    return tokens, episodes["actions"][:, : config.clip_frames - 1]


def split_heldout(trainer: Trainer, config: SFTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last `heldout_fraction` of the training episodes out of training; return them as held-out clips."""
    total = trainer.episode_tokens.shape[0]
    held = max(1, round(total * config.heldout_fraction))
    if held >= total:
        raise ValueError(f"{config.data.path or config.data.seeds}: {total} clips are too few to hold out "
                         f"heldout_fraction={config.heldout_fraction} and train on the rest")
    keep = total - held
    tokens = trainer.episode_tokens[keep:, : config.clip_frames]
    actions = trainer.episodes["actions"][keep:, : config.clip_frames - 1]
    trainer.episodes = {name: values[:keep] for name, values in trainer.episodes.items()}
    trainer.episode_tokens = trainer.prompt_tokens = trainer.episode_tokens[:keep]
    trainer.prompt_actions, trainer.num_prompts = trainer.episodes["actions"], keep
    trainer.context_frames = trainer.context_frames[:keep]
    return tokens, actions


def run(config: SFTConfig):
    columns = columns_for(config.data)
    trainer = Trainer(config, method="sft", columns=columns)
    # The rollout report compares against the simulator: only when both data sets are envs3d episodes.
    trainer.write_rollout_report = (columns == EPISODE_FIELDS and not config.heldout_fraction
                                    and columns_for(config.eval.data) == EPISODE_FIELDS)
    heldout = split_heldout(trainer, config) if config.heldout_fraction else heldout_clips(trainer, config)
    from posttrain.models import load_model

    base_loss = teacher_forced_loss(load_model(config.model), *heldout, config.num_context)
    if not config.resume:  # a resumed run's log already holds the base line
        trainer.log.write({"stage": "heldout", "step": -1, "heldout_loss": base_loss})
    result = trainer.fit(lambda step: sft_step(trainer, config, step, heldout))
    post_loss = teacher_forced_loss(trainer.policy, *heldout, config.num_context)
    if trainer.accelerator.is_main_process:
        held_from = (f"last {heldout[0].shape[0]} clips of {config.data.path or config.data.seeds}"
                     if config.heldout_fraction else config.eval.data.seeds or config.eval.data.path)
        summary = {"heldout_loss_base": base_loss, "heldout_loss_post": post_loss,
                   "heldout_clips": int(heldout[0].shape[0]), "clip_frames": config.clip_frames,
                   "num_context": config.num_context, "eval_seeds": held_from}
        (trainer.out / "report").mkdir(parents=True, exist_ok=True)
        (trainer.out / "report" / "heldout_loss.json").write_text(json.dumps(summary, indent=2))
        trainer.log.write({"stage": "heldout", "step": config.steps, "heldout_loss": post_loss})
        if not trainer.write_rollout_report and config.train.eval_at_end:
            heldout_rollout_gif(trainer, config, *heldout)
        print(f"held-out teacher-forced loss: base {base_loss:.4f} -> fine-tuned {post_loss:.4f} nats/token")
    return result


@torch.no_grad()
def heldout_rollout_gif(trainer: Trainer, config: SFTConfig, tokens: torch.Tensor, actions: torch.Tensor):
    """report/rollout.gif for runs without the simulator report (footage): greedy rollouts of the base and the
    fine-tuned model from the first held-out clip's context; context and truth are tokenizer reconstructions."""
    from posttrain.report import _base_model, save_rollout_gif

    policy, num_context = trainer.policy, config.num_context
    context, horizon = tokens[:1, :num_context], tokens.shape[1] - num_context
    with _base_model(trainer) as base:
        before = base.rollout(context, actions[:1], horizon, temperature=0.0, seeds=[config.seed])
    after = policy.rollout(context, actions[:1], horizon, temperature=0.0, seeds=[config.seed])
    recon = trainer.world.decode(tokens[0])
    return save_rollout_gif(trainer.out / "report" / "rollout.gif", recon[:num_context],
                            {"base": before.frames[0], "post-trained": after.frames[0]}, recon[num_context:])


def sft_step(trainer: Trainer, config: SFTConfig, step: int, heldout=None) -> dict:
    """One optimizer step of teacher-forced cross-entropy on this step's clips."""
    acc = trainer.accelerator
    # The global batch is seeded by (seed, step) alone and each process takes every num_processes-th clip:
    # a resumed run draws the clips an unbroken run would, and N processes train on what 1 process would.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009)
    tokens, actions = sample_clips(trainer.episode_tokens, trainer.episodes["actions"], config.batch_size,
                                   config.clip_frames, generator)
    tokens, actions = tokens[acc.process_index:: acc.num_processes], actions[acc.process_index:: acc.num_processes]
    num_tokens = trainer.reduce_sum((config.clip_frames - config.num_context) * tokens.shape[-1] * len(tokens))

    def loss_fn(new_logp, index):
        total = -new_logp.sum()  # summed token cross-entropy of this micro-batch
        return total / num_tokens, {"nll": float(total.detach())}

    stats = trainer.update(tokens, actions, None, loss_fn)
    metrics = {"loss": trainer.reduce_sum(stats["nll"]) / num_tokens}
    if "grad_norm" in stats:
        metrics["grad_norm"] = stats["grad_norm"]
    metrics["skipped_nonfinite"] = stats["skipped_nonfinite"]
    if heldout is not None and config.eval_every and (step + 1) % config.eval_every == 0:
        metrics["heldout_loss"] = teacher_forced_loss(trainer.policy, *heldout, config.num_context)
    return metrics
