"""What every post-training loop shares: Accelerate setup, policy + LoRA, micro-batched updates,
atomic checkpoints with exact resume, logging, and the final base-vs-post-trained evaluation.

The method files (grpo.py, dpo.py, sft.py) hold their config and their loss; this module
holds the plumbing so each method stays one readable file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.adapters import apply_lora, freeze_for_full_finetune, save_adapter
from posttrain.config import to_dict
from posttrain.logging_utils import MetricsWriter, progress_bar


@dataclass
class TrainerSettings:
    """Optimisation, precision, micro-batching, checkpointing and logging."""

    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps (then constant)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; the step's batch is accumulated over micro-batches."""
    rollout_batch_size: int = 64
    """Rollouts sampled per forward pass while generating."""
    mixed_precision: str = "no"
    """Accelerate mixed precision: no | bf16 | fp16."""
    checkpoint_every: int = 25
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    log_every: int = 1
    """Steps between metrics.jsonl / TensorBoard records."""
    video_every: int = 25
    """Steps between rollout GIFs in videos/ (0 disables)."""
    tensorboard: bool = True
    """Log to TensorBoard through Accelerate's tracker when tensorboard is installed."""
    eval_at_end: bool = True
    """Evaluate base vs post-trained on held-out seeds and write report/ at the end."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default)."""
    max_nonfinite_steps: int = 3
    """Steps in a row whose loss or gradient is not finite (each is skipped and logged) before the run
    stops with an error."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("lr", "micro_batch_size", "rollout_batch_size", "log_every", "keep_checkpoints",
                                "max_nonfinite_steps"),
                non_negative=("weight_decay", "warmup_steps", "max_grad_norm", "checkpoint_every", "video_every",
                              "threads"))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose no, bf16 or fp16")


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


class Trainer:
    """Owns the accelerator, the policy (with LoRA or full), the optimizer and the run folder."""

    def __init__(self, config, method: str, columns: tuple[str, ...] | None = None):
        """`columns`: dataset columns to load (default: the envs3d episode fields rewards need;
        SFT on footage passes ("frames", "actions"))."""
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

        from posttrain.data import load_episodes
        from posttrain.evaluate import EPISODE_FIELDS
        from posttrain.models import load_model, weights_hash

        self.config, self.method = config, method
        self.settings: TrainerSettings = config.train
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.out = Path(config.out)
        use_cpu = not torch.cuda.is_available()
        trackers = "tensorboard" if self.settings.tensorboard and _has_tensorboard() else None
        self.accelerator = Accelerator(
            cpu=use_cpu, mixed_precision=self.settings.mixed_precision, log_with=trackers,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "tensorboard")),
            # gloo: DeepSpeed on CPU needs an explicit process group backend (STACK-NOTES.md).
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if use_cpu and _launched_distributed() else [],
        )
        acc = self.accelerator
        from posttrain.models.registry import resolve_model_path
        from posttrain.runfolder import RunLock, check_resume_config, prepare_run_folder

        self.lock = None
        if acc.is_main_process:
            # Before anything is written: refuse to clobber, then hold the folder for the run's life.
            data = getattr(config, "data", None)
            prepare_run_folder(self.out, resume=config.resume, overwrite=getattr(config, "overwrite", False),
                               inputs={"model folder": resolve_model_path(config.model),
                                       "dataset": getattr(data, "path", None)})
            self.lock = RunLock(self.out, method)
            if config.resume:
                check_resume_config(self.out, to_dict(config))
        acc.wait_for_everyone()
        plugin = acc.state.deepspeed_plugin
        self.deepspeed = plugin is not None
        if plugin is not None:
            # No dataloader goes through prepare(), so DeepSpeed cannot infer its batch size.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
            plugin.deepspeed_config["gradient_accumulation_steps"] = 1
            plugin.deepspeed_config["gradient_clipping"] = self.settings.max_grad_norm or 0.0
        if config.resume and not self.latest_checkpoint():
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        self.base_name = config.model
        self.base_hash = weights_hash(resolve_model_path(config.model))
        model = load_model(config.model)
        torch.manual_seed(config.seed)  # LoRA's A matrices are drawn at random: same seed, same run
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if config.lora.enabled:
            model = apply_lora(model, config.lora)
            self.reference = None  # the adapter-disabled policy is the reference
        else:
            self.reference = load_model(config.model).eval() if getattr(config, "kl_coef", 0) else None
            freeze_for_full_finetune(model)
        self.base_model = model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        warmup = self.settings.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        # accelerate's unwrap_model imports deepspeed whenever it is installed, and deepspeed's import prints
        # "Setting accelerator to CPU" on every run; only a DeepSpeed engine needs it, DDP is one .module away.
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        self.policy = acc.unwrap_model(self.model) if self.deepspeed else self.model.module if ddp else self.model
        # Trainers see the world model only through its protocol (encode, decode, score, rollout).
        self.world = self._core(self.policy)
        self.episodes = load_episodes(config.data, columns or EPISODE_FIELDS, progress=acc.is_main_process) \
            if hasattr(config, "data") else None
        # The rollout report needs simulator ground truth; a method trained on footage switches it off.
        self.write_rollout_report = True
        self._prepare_prompts()
        self.reward = None
        if getattr(config, "rewards", None):
            from posttrain.rewards import compose

            self.reward = compose(config.rewards, max_failure_fraction=config.max_failure_fraction,
                                  workers=getattr(config, "reward_workers", 1))
        self.log = MetricsWriter(self.out / "metrics.jsonl", enabled=acc.is_main_process)
        self.start_step = 0
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    # --- model helpers --------------------------------------------------------------------------
    @staticmethod
    def _core(model):
        """The TokenWorldModel inside PEFT wrappers."""
        while hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    def _prepare_prompts(self) -> None:
        if self.episodes is None:
            return
        num_context = getattr(self.config, "num_context", 2)
        with torch.no_grad():
            frames = self.episodes["frames"]
            flat = frames.reshape(-1, *frames.shape[2:])
            tokens = torch.cat([self.world.encode(flat[i: i + 256]) for i in range(0, len(flat), 256)])
        self.episode_tokens = tokens.view(*frames.shape[:2], -1)  # (E, T, N)
        self.prompt_tokens = self.episode_tokens
        self.prompt_actions = self.episodes["actions"]
        self.num_prompts = frames.shape[0]
        self.context_frames = frames[:, :num_context]

    def generate(self, context, actions, horizon, seeds, temperature, top_k, top_p):
        """Rollouts in chunks of rollout_batch_size; returns one RolloutOutput for the whole batch."""
        from posttrain.models import RolloutOutput

        chunk = self.settings.rollout_batch_size
        parts = [self.policy.rollout(context[i: i + chunk], actions[i: i + chunk], horizon, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seeds=seeds[i: i + chunk])
                 for i in range(0, len(context), chunk)]
        return RolloutOutput(tokens=torch.cat([p.tokens for p in parts]), logprobs=torch.cat([p.logprobs for p in parts]),
                             frames=torch.cat([p.frames for p in parts]))

    @torch.no_grad()
    def policy_logprobs(self, tokens, actions, align: int = 1) -> torch.Tensor:
        """Log-probs (B, L) of `tokens` under the current policy, computed exactly as `update` will
        (same wrapped model, same autocast, same micro-batches). Under mixed precision the sampler's
        fp32 log-probs differ from the update's bf16 ones by up to ~7e-2, so the first ratio would not
        be 1; these are the old log-probs to use then."""
        chunk = len(tokens) if self.deepspeed else max(align, self.settings.micro_batch_size // align * align)
        num_context = getattr(self.config, "num_context", 1)
        temperature = getattr(self.config, "temperature", 1.0)
        return torch.cat([self.model(tokens[i: i + chunk], actions[i: i + chunk], num_context, temperature).float()
                          for i in range(0, len(tokens), chunk)]).flatten(1)

    @torch.no_grad()
    def reference_logprobs(self, tokens, actions, num_context, temperature):
        chunk = self.settings.micro_batch_size
        if self.reference is not None:
            model = self.reference
            return torch.cat([model.score(tokens[i: i + chunk], actions[i: i + chunk], num_context, temperature)
                              for i in range(0, len(tokens), chunk)]).flatten(1)
        with self.policy.disable_adapter():
            return torch.cat([self.policy(tokens[i: i + chunk], actions[i: i + chunk], num_context, temperature)
                              for i in range(0, len(tokens), chunk)]).flatten(1)

    def update(self, tokens, actions, valid, loss_fn, align: int = 1, targets=None) -> dict:
        """One optimizer step accumulated over micro-batches. `loss_fn(new_logp, index) -> (loss, stats)`
        must return micro-batch losses normalised by the GLOBAL batch, so their sum is the batch loss.
        `align`: micro-batches hold a multiple of this many rows (DPO: 2, so a chosen/rejected pair
        is never split across micro-batches). `targets`: frames to score instead of the inputs' own
        (`WorldModel.score(..., targets=)`, simulator-forcing)."""
        acc = self.accelerator
        self.model.train()
        chunk = max(align, self.settings.micro_batch_size // align * align)
        if self.deepspeed:
            # DeepSpeed steps its engine inside every backward: one micro-batch per step.
            chunk = len(tokens)
        starts = list(range(0, len(tokens), chunk))
        totals: dict = {}
        num_context = getattr(self.config, "num_context", 1)
        temperature = getattr(self.config, "temperature", 1.0)
        for i, start in enumerate(starts):
            index = torch.arange(start, min(start + chunk, len(tokens)))
            sync = i == len(starts) - 1
            context = acc.no_sync(self.model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
            with context:
                extra = {} if targets is None else {"targets": targets[index]}
                new_logp = self.model(tokens[index], actions[index], num_context, temperature, **extra)
                loss, stats = loss_fn(new_logp, index)
                # DDP averages gradients over processes; scale so the sum matches one process.
                acc.backward(loss * acc.num_processes)
                stats = {**stats, "loss_sum": float(loss.detach())}
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        if not self.deepspeed:  # DeepSpeed clips with its own config and skips overflowing steps itself
            # The global norm (after DDP's all-reduce the gradients are identical on every rank, so
            # every rank takes the same decision below); inf clipping only measures it.
            clip = self.settings.max_grad_norm or float("inf")
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), clip))
            totals["grad_norm"] = grad_norm
            if not math.isfinite(grad_norm) or not all(math.isfinite(float(v)) for v in totals.values()):
                # A non-finite loss or gradient would poison the weights (and Adam's moments) for good.
                self.optimizer.zero_grad(set_to_none=True)
                totals["skipped_nonfinite"] = 1
                return totals
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["skipped_nonfinite"] = 0
        return totals

    # --- rewards and reductions -----------------------------------------------------------------
    def score_rewards(self, frames, episode_index, sample_ids, tokens=None):
        from posttrain.evaluate import episode_batch
        from posttrain.rewards import RolloutBatch

        num_context = self.config.num_context
        context = self.context_frames[episode_index].float() / 255
        rollouts = RolloutBatch(frames=frames.float(), num_context=num_context, context=context, tokens=tokens,
                                reference_frames=self._reference_frames(episode_index),
                                prompt_ids=self.episodes["seed"][episode_index], sample_ids=sample_ids)
        return self.reward(rollouts, episode_batch(self.episodes, episode_index))

    def score_frame_rewards(self, frames, episode_index, sample_ids, tokens=None):
        """Per-frame rewards (B, H): the composite scored on each generated frame alone, with the
        true context followed by the rollout's own earlier frames as its context (so
        `consistency_3d` compares frame t with frame t-1; it is built with include_context=True).
        Returns (totals (B, H), components {name: (B, H)}, valid (B,), failures)."""
        from posttrain.evaluate import episode_batch
        from posttrain.rewards import RolloutBatch

        if getattr(self, "frame_reward", None) is None:
            from posttrain.rewards import RewardSpec, compose

            specs = [RewardSpec(s.name, s.weight, {**s.params, "include_context": True}
                                if s.name == "consistency_3d" else dict(s.params), s.key) for s in self.config.rewards]
            self.frame_reward = compose(specs, max_failure_fraction=self.config.max_failure_fraction,
                                        workers=getattr(self.config, "reward_workers", 1))
        num_context = self.config.num_context
        true_context = self.context_frames[episode_index].float() / 255
        reference = self._reference_frames(episode_index)
        episodes = episode_batch(self.episodes, episode_index)
        frames = frames.float()
        totals, components, valid, failures = [], {}, torch.ones(len(frames), dtype=torch.bool), []
        for t in range(frames.shape[1]):
            rollouts = RolloutBatch(
                frames=frames[:, t: t + 1], num_context=num_context + t,
                context=torch.cat([true_context, frames[:, :t]], 1), reference_frames=reference[:, t: t + 1],
                tokens=None if tokens is None else tokens[:, t: t + 1],
                prompt_ids=self.episodes["seed"][episode_index], sample_ids=sample_ids)
            out = self.frame_reward(rollouts, episodes)
            totals.append(out.total)
            valid &= out.valid.cpu()
            failures.extend(out.failures)
            for name, values in out.components.items():
                components.setdefault(name, []).append(values)
        return (torch.stack(totals, 1), {k: torch.stack(v, 1) for k, v in components.items()}, valid, failures)

    def _reference_frames(self, episode_index):
        """The tokenizer's reconstruction of the true future frames (cached per episode)."""
        if not hasattr(self, "_recon_cache"):
            self._recon_cache = {}
        num_context = self.config.num_context
        missing = sorted({int(i) for i in episode_index} - set(self._recon_cache))
        if missing:
            with torch.no_grad():
                recon = self.world.decode(self.episode_tokens[missing, num_context:])
            for i, frames in zip(missing, recon):
                self._recon_cache[i] = frames
        return torch.stack([self._recon_cache[int(i)] for i in episode_index])

    def global_count(self, mask: torch.Tensor) -> int:
        return max(int(round(self.reduce_sum(float(mask.sum())))), 1)

    def reduce_sum(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return float(value)
        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def reduce_mean(self, value: float) -> float:
        return self.reduce_sum(value) / self.accelerator.num_processes

    def reduce_reward_metrics(self, scores, valid) -> dict:
        acc = self.accelerator
        metrics = {}
        gathered_total = acc.gather(scores.total[valid].float()) if acc.num_processes > 1 else scores.total[valid]
        metrics["reward_mean"] = float(gathered_total.mean()) if gathered_total.numel() else float("nan")
        metrics["reward_std"] = float(gathered_total.std()) if gathered_total.numel() > 1 else 0.0
        for name, values in scores.components.items():
            vals = values[valid]
            vals = acc.gather(vals.float()) if acc.num_processes > 1 else vals
            metrics[f"reward/{name}_mean"] = float(vals.mean()) if vals.numel() else float("nan")
            metrics[f"reward/{name}_std"] = float(vals.std()) if vals.numel() > 1 else 0.0
        metrics["failed_samples"] = int(round(self.reduce_sum(float((~valid).sum()))))
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        pointer = self.out / "checkpoints" / "latest"
        if pointer.is_file():
            path = self.out / "checkpoints" / pointer.read_text().strip()
            if path.is_dir():
                return path
        return None

    def save_checkpoint(self, step: int, history: list) -> Path:
        """accelerate.save_state into a temporary folder, then rename, then move the `latest` pointer."""
        acc = self.accelerator
        root = self.out / "checkpoints"
        final = root / f"step-{step:06d}"
        staging = root / f".tmp-step-{step:06d}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        if acc.is_main_process:
            (staging / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            pointer_tmp = root / ".latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, root / "latest")
            kept = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in kept[: -max(1, self.settings.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        _fault_point("after_checkpoint", step)
        return final

    def load_checkpoint(self) -> list:
        path = self.latest_checkpoint()
        self.accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        self.start_step = state["step"] + 1
        if self.accelerator.is_main_process:
            from posttrain.runfolder import truncate_metrics

            # Steps logged after the checkpoint are replayed now: drop them so none appears twice.
            dropped = truncate_metrics(self.out / "metrics.jsonl", state["step"])
            if dropped:
                print(f"resume: dropped {dropped} metrics.jsonl records logged after step {state['step']}")
        return state["history"]

    # --- the loop -------------------------------------------------------------------------------
    def fit(self, step_fn):
        acc = self.accelerator
        config = self.config
        history: list = self.load_checkpoint() if config.resume else []
        nonfinite_in_a_row = 0
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("posttrain", config={"method": self.method})
        with progress_bar(config.steps - self.start_step, f"{self.method}", enabled=acc.is_main_process) as update:
            for step in range(self.start_step, config.steps):
                metrics = step_fn(step)
                metrics.update({"step": step, "lr": self.scheduler.get_last_lr()[0], "processes": acc.num_processes})
                if metrics.get("skipped_nonfinite"):
                    nonfinite_in_a_row += 1
                    print(f"step {step}: non-finite loss or gradient (grad_norm={metrics.get('grad_norm')}); "
                          f"update skipped ({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= self.settings.max_nonfinite_steps:
                        self.log.write(metrics)
                        raise TrainingDiverged(
                            f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last: step "
                            f"{step}); stopped. The last good checkpoint is in {self.out / 'checkpoints'}; lower "
                            f"train.lr or check the rewards, then --resume or start again")
                else:
                    nonfinite_in_a_row = 0
                history.append({k: v for k, v in metrics.items() if k in ("step", "reward_mean", "loss")})
                if step % self.settings.log_every == 0 or step == config.steps - 1:
                    self.log.write(metrics)
                    if acc.log_with:
                        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
                _fault_point("after_log", step)
                every = self.settings.checkpoint_every
                if (every and (step + 1) % every == 0) or step == config.steps - 1:
                    self.save_checkpoint(step, history)
                shown = {k: metrics[k] for k in ("reward_mean", "loss", "kl") if k in metrics}
                update(**shown)
        acc.wait_for_everyone()
        if acc.log_with:
            acc.end_training()
        result = self.finish(history)
        if self.reward is not None:
            self.reward.close()
        if self.lock is not None:
            self.lock.release()
        return result

    def finish(self, history: list) -> Path:
        """Save the adapter (or full model) and, on the main process, the held-out report."""
        acc = self.accelerator
        if not acc.is_main_process:
            return self.out
        if self.config.lora.enabled:
            save_adapter(self.policy, self.out / "adapter", self.base_name, self.base_hash,
                         {"method": self.method, "recipe": to_dict(self.config)})
        else:
            self._core(self.policy).save_pretrained(self.out / "model", metadata={"method": self.method,
                                                                                 "base": self.base_name})
        if self.settings.eval_at_end and hasattr(self.config, "eval") and self.write_rollout_report:
            from posttrain.report import write_report

            write_report(self, history)
        return self.out

    # --- videos ---------------------------------------------------------------------------------
    def should_save_video(self, step: int) -> bool:
        every = self.settings.video_every
        return bool(every) and self.accelerator.is_main_process and step % every == 0

    def save_video(self, step, context_tokens, predicted, episode_index) -> None:
        from posttrain.report import save_rollout_gif

        index = int(episode_index[0])
        num_context = context_tokens.shape[1]
        truth = self.episodes["frames"][index, num_context: num_context + predicted.shape[1]]
        context = self.episodes["frames"][index, :num_context]
        save_rollout_gif(self.out / "videos" / f"step-{step:06d}.gif", context, {"prediction": predicted[0]}, truth)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the CLI reports it in one line (exit code 1)."""


def _fault_point(name: str, step: int) -> None:
    """Deterministic fault injection for tests: POSTTRAIN_FAULT=after_checkpoint:3 SIGKILLs the process
    right after checkpoint step-000003 is committed, after_log:3 right after step 3's metrics are
    written (no timers, no polling). The same switch as envs3d's jobs use."""
    from posttrain.envs3d.jobs import fault_point

    fault_point(f"{name}:{step}")


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        return False


