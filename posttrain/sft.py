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
steps in metrics.jsonl; plus, with `train.eval_at_end`, the shared rollout report (report/metrics.json,
per-step plots with the persistence and mean-image baselines, rollout.gif, index.html): base vs fine-tuned
rollouts of `eval.horizon` frames from `eval.num_context` true frames of each held-out clip. On envs3d
episodes it has every simulator metric; on footage (`posttrain eval --data`'s code) MSE, PSNR and SSIM, with
the mean image of the training clips as the mean-image baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from posttrain import rollouts, training
from posttrain.config import to_dict
from posttrain.data import EpisodeDataConfig, dataset_path, load_episodes
from posttrain.evaluate import EvalConfig
from posttrain.rollouts import EPISODE_FIELDS

FOOTAGE_COLUMNS = ("frames", "actions")


@dataclass
class SFTConfig(training.RunConfig):
    """SFT recipe: model, data, clips, optimisation, held-out evaluation."""

    method: str = "sft"
    """Recipe kind (fixed)."""
    out: str = "runs/sft"
    """Run folder (metrics.jsonl, checkpoints/, adapter/ or model/, report/)."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="30000:30256", frames=16))
    """Training episodes: envs3d seeds, or a footage folder in `path` (frames + actions columns)."""
    extra_data: list[EpisodeDataConfig] = field(default_factory=list)
    """More training episodes (envs3d sections with other scene settings, or other footage folders), with the
    same frames per episode as `data`; trained on together with it."""
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out clips (teacher-forced loss) and, for envs3d data, the rollout report."""

    def evaluates_on_eval_data(self) -> bool:
        return not self.heldout_fraction  # else the held-out clips come from `data` itself

    def __post_init__(self) -> None:
        super().__post_init__()
        from posttrain.config import require

        require(self, positive=("clip_frames", "batch_size", "steps"), non_negative=("eval_every",))
        if not 1 <= self.num_context < self.clip_frames:
            raise ValueError(f"need 1 <= num_context ({self.num_context}) < clip_frames ({self.clip_frames})")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} is outside [0, 1)")
        for key, data in [("data", self.data), *((f"extra_data[{i}]", d) for i, d in enumerate(self.extra_data))]:
            if self.clip_frames > data.frames and not data.path:
                raise ValueError(f"clip_frames={self.clip_frames} exceeds {key}.frames={data.frames}")
            if key != "data" and self.evaluates_on_eval_data():
                from posttrain.data import check_held_out

                check_held_out(data, self.eval.data)
        if self.extra_data and self.heldout_fraction:
            raise ValueError("heldout_fraction holds out the last clips of `data` alone; with extra_data, give the "
                             "held-out clips in eval.data instead")


def columns_for(data: EpisodeDataConfig) -> tuple[str, ...]:
    """EPISODE_FIELDS when the dataset has them all (envs3d), else just frames and actions (footage)."""
    from datasets import load_from_disk

    names = set(load_from_disk(str(dataset_path(data, progress=False))).column_names)
    return EPISODE_FIELDS if set(EPISODE_FIELDS) <= names else FOOTAGE_COLUMNS


def tokenise_clips(world, data: EpisodeDataConfig, progress: bool = True, rows: int = 64):
    """Every clip of `data` tokenised with the frozen tokenizer: ((E, T, N) token ids, (E, T - 1) actions).
    Frames are read from the memory-mapped dataset `rows` clips at a time and dropped once encoded, so memory
    holds the tokens and not the footage (the default model: 256 int64 per frame, 2 KB against 12 KB of 64x64
    RGB; a pixel-space flow model's "tokens" are its float states, 4x the uint8 frames)."""
    from datasets import load_from_disk

    from posttrain.logging_utils import progress_bar

    dataset = load_from_disk(str(dataset_path(data, progress=progress)))
    if len(dataset) == 0:
        raise ValueError(f"dataset {data.path or data.seeds} holds no episodes")
    missing = [c for c in FOOTAGE_COLUMNS if c not in dataset.column_names]
    if missing:
        raise KeyError(f"dataset {data.path or data.seeds} lacks columns {missing}")
    tokens, actions = [], []
    with progress_bar(len(dataset), "tokenise", enabled=progress) as update:
        for start in range(0, len(dataset), rows):
            part = dataset.select(range(start, min(start + rows, len(dataset))))
            frames = part.with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
            with torch.no_grad():
                tokens.append(rollouts.encode_episodes(world, frames))
            actions.append(part.with_format("torch", columns=["actions"])[:]["actions"].long())
            update(len(part))
    return torch.cat(tokens), torch.cat(actions)


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


def objective_kwargs(world, noise_seeds: torch.Tensor | None = None) -> dict:
    """What SFT passes to the model's forward besides the tokens: a model that trains on something other than
    its score's log-probs names it in `sft_objective` (a flow model: the flow-matching loss), and then takes
    per-row `noise_seeds` for the objective's noise (a function of (seed, step, clip): micro-batching and
    processes do not change the noise any clip gets)."""
    objective = getattr(world, "sft_objective", None)
    if not objective:
        return {}
    return {"objective": objective, **({"noise_seeds": noise_seeds} if noise_seeds is not None else {})}


@torch.no_grad()
def teacher_forced_loss(model, tokens: torch.Tensor, actions: torch.Tensor, num_context: int,
                        batch: int = 16) -> float:
    """Mean per-token cross-entropy (nats) of frames num_context.. of `tokens` (E, T, N) under `model` (a flow
    model: the flow-matching loss per element)."""
    kwargs = objective_kwargs(training.unwrap(model))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        logp = model(tokens[i: i + batch], actions[i: i + batch], num_context, **kwargs)  # (b, T - C, N)
        total += float(-logp.double().sum())
        count += logp.numel()
    model.train(was_training)
    return total / max(count, 1)


def heldout_clips(world, config: SFTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first clip_frames frames of every held-out episode, tokenised: (E, clip, N), (E, clip - 1)."""
    episodes = load_episodes(config.eval.data, FOOTAGE_COLUMNS, progress=False)
    frames = episodes["frames"][:, : config.clip_frames]
    with torch.no_grad():
        tokens = torch.stack([world.encode(clip) for clip in frames])
    return tokens, episodes["actions"][:, : config.clip_frames - 1]


def split_heldout(tokens: torch.Tensor, actions: torch.Tensor, config: SFTConfig):
    """Keep the last `heldout_fraction` of the training episodes (tokens (E, T, N), actions (E, T - 1)) out of
    training. Returns ((train tokens, train actions), (held-out clips (E', clip, N), their actions))."""
    total = tokens.shape[0]
    held = max(1, round(total * config.heldout_fraction))
    if held >= total:
        raise ValueError(f"{config.data.path or config.data.seeds}: {total} clips are too few to hold out "
                         f"heldout_fraction={config.heldout_fraction} and train on the rest")
    keep = total - held
    heldout = tokens[keep:, : config.clip_frames], actions[keep:, : config.clip_frames - 1]
    return (tokens[:keep], actions[:keep]), heldout


def token_nll(num_tokens: float):
    """The `loss_fn(new_logp, index)` training.update calls per micro-batch: the summed token cross-entropy
    divided by the step's global number of target tokens."""
    def loss_fn(new_logp, index):
        total = -new_logp.sum()  # summed token cross-entropy of this micro-batch
        return total / num_tokens, {"nll": float(total.detach())}
    return loss_fn


def training_clips(world, config: SFTConfig, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`data` and every `extra_data` section tokenised and stacked: (E, T, N) tokens, (E, T - 1) actions."""
    parts = [tokenise_clips(world, data, progress=progress) for data in [config.data, *config.extra_data]]
    lengths = {part[0].shape[1] for part in parts}
    if len(lengths) > 1:
        sizes = [f"{data.path or data.seeds}: {part[0].shape[1]}" for data, part in
                 zip([config.data, *config.extra_data], parts)]
        raise ValueError(f"data and extra_data must have the same frames per episode; got {', '.join(sizes)}")
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run(config: SFTConfig, initial_model: torch.nn.Module | None = None, method: str = "sft"):
    """Set up, tokenise the clips once, then for each step: sample clips, one teacher-forced update, log,
    checkpoint; finally the held-out losses (base and fine-tuned) and the report. `initial_model`: train this
    in-memory model rather than `config.model` (pre-training from scratch: `posttrain.pretrain_flow`)."""
    columns = columns_for(config.data)
    session = training.setup(method, out=config.out, model=config.model, seed=config.seed, settings=config.train,
                             lora=config.lora, recipe=to_dict(config), resume=config.resume,
                             overwrite=config.overwrite, initial_model=initial_model)
    acc = session.accelerator
    footage_report = footage_heldout(config, columns) if config.train.eval_at_end else None
    tokens, actions = training_clips(session.world, config, progress=acc.is_main_process)
    if config.heldout_fraction:
        (tokens, actions), heldout = split_heldout(tokens, actions, config)
    else:
        heldout = heldout_clips(session.world, config)
    # The rollout report compares against the simulator: only when both data sets are envs3d episodes.
    rollout_report = (columns == EPISODE_FIELDS and not config.heldout_fraction
                      and columns_for(config.eval.data) == EPISODE_FIELDS)
    with rollouts.reference_policy(session.policy, training.frozen_base(session)) as base:
        base_loss = teacher_forced_loss(base, *heldout, config.num_context)
    if not config.resume:  # a resumed run's log already holds the base line
        session.metrics.write({"stage": "heldout", "step": -1, "heldout_loss": base_loss})

    with training.Steps(session, total=config.steps, resume=config.resume) as steps:
        for step in steps:
            # The global batch is seeded by (seed, step) alone and each process takes every num_processes-th
            # clip: a resumed run draws the clips an unbroken run would, and N processes train on what 1 would.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009)
            clips, clip_actions = sample_clips(tokens, actions, config.batch_size, config.clip_frames, generator)
            noise_seeds = (config.seed * 1_000_003 + step * 1_009) * 4_096 + torch.arange(config.batch_size)
            noise_seeds = noise_seeds[acc.process_index:: acc.num_processes]
            clips = clips[acc.process_index:: acc.num_processes]  # (b, clip, N)
            clip_actions = clip_actions[acc.process_index:: acc.num_processes]  # (b, clip - 1)
            per_frame = getattr(session.world, "sft_values_per_frame", clips.shape[-1])  # loss terms per frame
            targets = (config.clip_frames - config.num_context) * per_frame * len(clips)
            num_tokens = training.reduce_sum(acc, targets)
            stats = training.update(session, clips, clip_actions, token_nll(num_tokens), num_context=config.num_context,
                                    forward_kwargs=objective_kwargs(session.world, noise_seeds))
            metrics = {"loss": training.reduce_sum(acc, stats["nll"]) / num_tokens}
            if "grad_norm" in stats:
                metrics["grad_norm"] = stats["grad_norm"]
            metrics["skipped_nonfinite"] = stats["skipped_nonfinite"]
            evaluated = bool(config.eval_every) and (step + 1) % config.eval_every == 0
            if evaluated:
                metrics["heldout_loss"] = teacher_forced_loss(session.policy, *heldout, config.num_context)
            steps.done(step, metrics, force_log=evaluated)  # a held-out loss is never dropped by log_every

    post_loss = teacher_forced_loss(session.policy, *heldout, config.num_context)
    if acc.is_main_process:
        held_from = (f"last {heldout[0].shape[0]} clips of {config.data.path or config.data.seeds}"
                     if config.heldout_fraction else config.eval.data.seeds or config.eval.data.path)
        summary = {"heldout_loss_base": base_loss, "heldout_loss_post": post_loss,
                   "heldout_clips": int(heldout[0].shape[0]), "clip_frames": config.clip_frames,
                   "num_context": config.num_context, "eval_seeds": held_from}
        (session.out / "report").mkdir(parents=True, exist_ok=True)
        (session.out / "report" / "heldout_loss.json").write_text(json.dumps(summary, indent=2))
        session.metrics.write({"stage": "heldout", "step": config.steps, "heldout_loss": post_loss})
        if not rollout_report and footage_report is None and config.train.eval_at_end:
            heldout_rollout_gif(session, config, *heldout)
        unit = "per element (flow matching)" if hasattr(session.world, "score_paths") else "nats/token"
        print(f"held-out teacher-forced loss: base {base_loss:.4f} -> fine-tuned {post_loss:.4f} {unit}")
    if footage_report is not None:
        return training.finish(session, steps.history, recipe=to_dict(config), eval_config=config.eval,
                               eval_temperatures=config.eval_temperatures, report_data=footage_report)
    return training.finish(session, steps.history, recipe=to_dict(config),
                           eval_config=config.eval if rollout_report else None,
                           eval_temperatures=config.eval_temperatures)


def footage_heldout(config: SFTConfig, columns: tuple[str, ...]) -> dict | None:
    """For footage runs, the held-out rollout report's clips, checked before training: the last
    `heldout_fraction` of `data` (with the rest's mean frame as the mean-image baseline), or every clip of a
    footage `eval.data.path` (with `data`'s mean frame). None for envs3d runs (the simulator report)."""
    from posttrain.footage_clips import FootageClips

    needed = config.eval.num_context + config.eval.horizon
    if columns != FOOTAGE_COLUMNS or not (config.heldout_fraction or config.eval.data.path):
        return None
    if config.heldout_fraction:
        clips = FootageClips.open(config.data.path, needed, where="data.path", horizon_key="eval.horizon")
        held, rest = clips.split(heldout_fraction=config.heldout_fraction)
        train_clips = clips
    else:
        clips = FootageClips.open(config.eval.data.path, needed, where="eval.data.path", horizon_key="eval.horizon")
        held, _ = clips.split()
        train_clips = FootageClips.open(config.data.path, where="data.path")
        rest = list(range(len(train_clips)))
    episodes = clips.load(held, needed)
    return {"episodes": episodes, "mean_frame": train_clips.mean_frame(rest),
            "mean_frame_source": f"mean of the training {train_clips.describe(rest)}",
            "held_out": clips.describe(held), "held_out_public": clips.describe(held, name=clips.path.name)}


@torch.no_grad()
def heldout_rollout_gif(session: training.Session, config: SFTConfig, tokens: torch.Tensor, actions: torch.Tensor):
    """report/rollout.gif for runs without the simulator report (footage): greedy rollouts of the base and the
    fine-tuned model from the first held-out clip's context; context and truth are tokenizer reconstructions."""
    from posttrain.report import greedy_pair, save_rollout_gif

    num_context = config.num_context
    context, horizon = tokens[:1, :num_context], tokens.shape[1] - num_context
    before, after = greedy_pair(session.policy, training.frozen_base(session), context, actions[:1], horizon,
                                config.seed)
    recon = session.world.decode(tokens[0])
    return save_rollout_gif(session.out / "report" / "rollout.gif", recon[:num_context],
                            {"base": before[0], "post-trained": after[0]}, recon[num_context:])
