"""Simulator-forcing: train next-frame prediction on the model's OWN rollouts, with the simulator's
true next frames as targets.

    posttrain run recipes/forcing_tabletop.yaml

One step: take `clips_per_step` training episodes; from each one's `num_context` true frames, roll
the current model out for R frames (no gradient, KV cache, `context_temperature`; 0 = greedy);
then train the cross-entropy of the TRUE frames num_context .. num_context + R under the model,
with the context made of the true context frames followed by the model's own frames:

    inputs   true_0 .. true_{C-1}  own_1 .. own_R
    targets                 true_C  true_{C+1} .. true_{C+R}

Target frame C is predicted from the true context alone (teacher forcing); every later one from
the model's own earlier frames. Because the actions are the episode's, the simulator knows what
each frame should have been: the model is taught to pull back toward the truth from wherever its
own errors took it. This is scheduled sampling / DAgger with an exact oracle (Bengio et al. 2015;
Ross et al. 2011); Self Forcing (arXiv 2506.08009) trains on own rollouts too, with a teacher's
distribution instead of exact targets.

Options (what the issue's trial showed matters):
- `own_frames` R, with a linear curriculum from `own_frames_start` over `curriculum_steps`;
  R may exceed the model's window, so later targets see only generated frames.
- `context_temperature`: a noisy (T = 1) context with exact targets teaches the model to ignore
  its context; greedy or low-temperature own frames are the default.
- `teacher_forced_fraction`: that share of each step's clips uses the true frames as context (an
  anchor to the base's teacher-forced skill).
- `own_anchor` (lambda): also train, with weight lambda, each own-context position toward the frame the
  model itself predicted there (the own frame that follows it in the context). Cross-entropy toward
  a truth the drifted context cannot pin down spreads the next-frame distribution (hedging), which
  sampling at temperature 1 turns into noise; the anchor keeps mass on the model's own mode, so the
  per-position target is a two-point mixture (truth, own prediction) rather than the truth alone.
  It is self-distillation toward the greedy rollout, so it needs `context_temperature` 0.
- LoRA (the default) or full fine-tuning, as every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from posttrain import rollouts, training
from posttrain.config import to_dict
from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.report import save_step_video
from posttrain.sft import token_nll


@dataclass
class ForcingConfig(training.RunConfig):
    """Simulator-forcing recipe: model, data, own-rollout context, optimisation, evaluation."""

    method: str = "forcing"
    """Recipe kind (fixed)."""
    out: str = "runs/forcing"
    """Run folder (metrics.jsonl, checkpoints/, adapter/ or model/, report/)."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="40000:40512", frames=12))
    """Training episodes; frames must be at least num_context + own_frames + 1."""
    num_context: int = 2
    """True context frames at the start of every clip."""
    own_frames: int = 6
    """R: the model's own frames in the context at the end of the curriculum (targets: R + 1 frames)."""
    own_frames_start: int = 1
    """R at step 0; it grows linearly to `own_frames` over `curriculum_steps`."""
    curriculum_steps: int = 0
    """Steps over which R grows (0: `own_frames` from the start)."""
    context_temperature: float = 0.0
    """Sampling temperature of the own rollouts (0 = greedy)."""
    teacher_forced_fraction: float = 0.25
    """Share of each step's clips trained with the true frames as context (plain teacher forcing)."""
    own_anchor: float = 0.0
    """Weight of the cross-entropy toward the model's own greedy next frame at own-context positions (0: off)."""
    clips_per_step: int = 16
    """Clips per optimizer step (split across processes; accumulated over train.micro_batch_size)."""
    steps: int = 100
    """Optimizer steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from posttrain.config import require

        require(self, positive=("num_context", "own_frames", "own_frames_start", "clips_per_step", "steps"),
                non_negative=("curriculum_steps", "context_temperature", "own_anchor"),
                unit=("teacher_forced_fraction",))
        if self.own_anchor and self.context_temperature:
            raise ValueError(f"own_anchor={self.own_anchor} anchors to the greedy own frames: it needs "
                             f"context_temperature=0 (got {self.context_temperature})")
        if self.own_frames_start > self.own_frames:
            raise ValueError(f"own_frames_start={self.own_frames_start} exceeds own_frames={self.own_frames}")
        if self.data.frames < self.num_context + self.own_frames + 1 and not self.data.path:
            raise ValueError(f"data.frames={self.data.frames} must be at least num_context + own_frames + 1 = "
                             f"{self.num_context + self.own_frames + 1}")


def own_frames_at(step: int, config: ForcingConfig) -> int:
    """R for `step`: linear from own_frames_start to own_frames over curriculum_steps (then constant)."""
    if not config.curriculum_steps or step >= config.curriculum_steps:
        return config.own_frames
    span = config.own_frames - config.own_frames_start
    return config.own_frames_start + math.floor(span * step / config.curriculum_steps + 0.5)


def forcing_inputs(true_tokens: torch.Tensor, own_tokens: torch.Tensor, num_context: int,
                   teacher_forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for `score(inputs, ..., targets=targets)`.

    true_tokens: (B, C + R + 1, N) the simulator's frames, tokenised; own_tokens: (B, R, N) the model's
    own rollout from the true context; teacher_forced: (B,) bool rows that keep the true frames as
    context. inputs (B, C + R + 1, N) = true context, then own (or true) frames 1..R, then a last frame
    that no prediction reads (the true one); targets (B, R + 1, N) = true frames C..C + R."""
    context, future = true_tokens[:, :num_context], true_tokens[:, num_context:]
    own = torch.where(teacher_forced[:, None, None], future[:, :-1], own_tokens)
    return torch.cat([context, own, future[:, -1:]], 1), future


def anchored_batch(inputs: torch.Tensor, targets: torch.Tensor, actions: torch.Tensor, own_rows: torch.Tensor,
                   num_context: int):
    """The `own_anchor` batch: the rows of (inputs, targets, actions) followed by a copy of the own-context
    rows whose targets are the inputs' own frames (position j, read after inputs[:C + j], is trained toward
    inputs[C + j], the model's own greedy frame there), and a (rows, R + 1) mask of the copies' positions
    that count: all but the last, whose input frame is the truth, not an own frame."""
    anchor_targets = inputs[own_rows, num_context:]
    batch = (torch.cat([inputs, inputs[own_rows]]), torch.cat([targets, anchor_targets]),
             torch.cat([actions, actions[own_rows]]))
    mask = torch.ones(len(own_rows), targets.shape[1])
    mask[:, -1] = 0
    return batch, mask


def anchored_nll(num_tokens: float, rows: int, anchor_mask: torch.Tensor, weight: float):
    """`training.update`'s loss_fn for an `anchored_batch`: the truth rows' summed token cross-entropy plus
    `weight` x the copies' (masked), both divided by the step's global number of TRUE target tokens."""
    def loss_fn(new_logp, index):  # new_logp (b, R + 1, N)
        frame_nll = -new_logp.sum(-1)  # (b, R + 1)
        truth = index < rows
        anchor = frame_nll[~truth] * anchor_mask[index[~truth] - rows]
        total, anchored = frame_nll[truth].sum(), anchor.sum()
        return (total + weight * anchored) / num_tokens, {"nll": float(total.detach()),
                                                           "anchor_nll": float(anchored.detach())}
    return loss_fn


def run(config: ForcingConfig):
    """Set up, tokenise the episodes once, then for each step: pick clips, roll out own frames, one
    cross-entropy update toward the true frames, log, checkpoint; then the held-out report."""
    from posttrain.rewards.metrics import psnr

    session = training.setup("forcing", out=config.out, model=config.model, seed=config.seed,
                             settings=config.train, lora=config.lora, recipe=to_dict(config), resume=config.resume,
                             overwrite=config.overwrite)
    acc, policy, settings = session.accelerator, session.policy, config.train
    episodes = load_episodes(config.data, ("seed", "frames", "actions"), progress=acc.is_main_process)
    episode_tokens = rollouts.encode_episodes(session.world, episodes["frames"])  # (E, T, N)
    c = config.num_context

    with training.Steps(session, total=config.steps, resume=config.resume) as steps:
        for step in steps:
            # 1. Clips: a global batch drawn from (seed, step) alone, each process taking every
            #    num_processes-th clip; which clips keep the true frames as context (teacher forcing).
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009)
            index = torch.randint(len(episode_tokens), (config.clips_per_step,), generator=generator)
            teacher_forced = torch.rand(config.clips_per_step, generator=generator) < config.teacher_forced_fraction
            index = index[acc.process_index:: acc.num_processes]
            teacher_forced = teacher_forced[acc.process_index:: acc.num_processes]
            own = own_frames_at(step, config)
            true_tokens = episode_tokens[index, : c + own + 1]  # (b, C + R + 1, N)
            actions = episodes["actions"][index, : c + own]

            # 2. Own frames: R frames rolled out by the current policy from the true context (no gradient),
            #    for the clips not teacher-forced only (each rollout has its own seed, so which others
            #    share its batch does not change it).
            session.model.eval()
            rows = (~teacher_forced).nonzero().squeeze(1)
            own_tokens = true_tokens[:, c: c + own].clone()
            if len(rows):
                seeds = [rollouts.rollout_seed(config.seed, step, int(e)) for e in index[rows].tolist()]
                out = rollouts.generate(policy, true_tokens[rows, :c], actions[rows], own, seeds,
                                        temperature=config.context_temperature, chunk=settings.rollout_batch_size)
                own_tokens[rows] = out.tokens

            # 3. One update: cross-entropy of the true frames C..C+R after the own (or true) context
            #    (the same per-token loss as SFT; only the inputs differ).
            inputs, targets = forcing_inputs(true_tokens, own_tokens, c, teacher_forced)
            num_tokens = training.reduce_sum(acc, targets.numel())
            batch, loss_fn = (inputs, targets, actions), token_nll(num_tokens)
            if config.own_anchor:  # + a copy of the own-context clips, trained toward their own greedy frames
                batch, mask = anchored_batch(inputs, targets, actions, rows, c)
                loss_fn = anchored_nll(num_tokens, len(index), mask, config.own_anchor)
                anchor_tokens = training.reduce_sum(acc, float(mask.sum()) * targets.shape[-1])
            stats = training.update(session, batch[0], batch[2], loss_fn, num_context=c, targets=batch[1])

            # 4. Log: the loss, and how far the own context had drifted (mean PSNR of the own frames against
            #    the truth, over every process's own-context clips).
            psnr_sum = 0.0
            if len(rows):
                truth = episodes["frames"][index[rows], c: c + own].float() / 255
                psnr_sum = float(psnr(out.frames, truth).mean(1).sum())
            own_clips = training.reduce_sum(acc, float(len(rows)))
            metrics = {"loss": training.reduce_sum(acc, stats["nll"]) / num_tokens, "own_frames": own,
                       "own_context_psnr": training.reduce_sum(acc, psnr_sum) / own_clips if own_clips else None,
                       "teacher_forced_clips": int(training.reduce_sum(acc, float(teacher_forced.sum()))),
                       "skipped_nonfinite": stats["skipped_nonfinite"]}
            if config.own_anchor:
                metrics["anchor_loss"] = (training.reduce_sum(acc, stats["anchor_nll"]) / anchor_tokens
                                          if anchor_tokens else None)
            if "grad_norm" in stats:
                metrics["grad_norm"] = stats["grad_norm"]
            if steps.video_due(step) and len(rows):
                save_step_video(session.out, step, episodes["frames"][int(index[rows[0]])], c, out.frames[0])
            steps.done(step, metrics)

    return training.finish(session, steps.history, recipe=to_dict(config), eval_config=config.eval,
                           eval_temperatures=config.eval_temperatures)
