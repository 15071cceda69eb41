"""`posttrain eval`: roll a world model out on envs3d episodes and score it against the simulator.

    posttrain eval --model default --seeds 900000:900032 --horizon 12 --temperature 0 --json runs/eval.json
    posttrain eval --model default --adapter runs/grpo/adapter --seeds 900000:900032 --horizon 12 --json e.json

Temperature 0 means greedy. Each rollout's sampling seed is derived from its episode
seed, so two models evaluated on the same seeds see the same noise (common random
numbers: their difference is measured with less variance). The metric code is the
rewards' own (`posttrain.rewards.metrics`, `consistency_3d`, `loop_closure`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.logging_utils import progress_bar
from posttrain.rewards import EpisodeBatch, RolloutBatch, get_reward
from posttrain.rewards import metrics as M

EPISODE_FIELDS = ("seed", "frames", "depth", "segmentation", "intrinsics", "world_to_camera", "actions",
                  "object_positions", "object_visible", "num_objects", "object_colors", "is_loop")


@dataclass
class EvalConfig:
    """How a model is evaluated on held-out envs3d episodes."""

    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="2000000:2000048", frames=14))
    """Held-out episodes (never used for training); frames must be >= num_context + horizon."""
    num_context: int = 2
    """True frames the model sees before predicting."""
    horizon: int = 12
    """Frames predicted per rollout."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_k: int | None = None
    """Optional top-k truncation."""
    top_p: float | None = None
    """Optional top-p truncation."""
    batch_size: int = 16
    """Rollouts per forward pass."""
    seed: int = 1234
    """Mixed into each episode's rollout seed."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("num_context", "horizon", "batch_size", "top_k"), non_negative=("temperature",))
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def rollout_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms (splitmix64 chain)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def episode_batch(episodes: dict, index) -> EpisodeBatch:
    index = torch.as_tensor(index, dtype=torch.long)
    return EpisodeBatch(**{name: episodes[name][index] for name in EPISODE_FIELDS})


@torch.no_grad()
def evaluate_model(model, episodes: dict, config: EvalConfig, description: str = "eval", progress: bool = True) -> dict:
    """Per-step and mean metrics of `model` rolled out on `episodes` (a `load_episodes` dict)."""
    count, length = episodes["frames"].shape[:2]
    context_len, horizon = config.num_context, config.horizon
    if context_len + horizon > length:
        raise ValueError(f"episodes have {length} frames; need num_context + horizon = {context_len + horizon}")
    was_training = model.training
    model.eval()
    per_step: dict[str, list] = {"mse": [], "psnr": [], "ssim": [], "consistency_3d": []}
    loop_errors: list[float] = []
    consistency = get_reward("consistency_3d")
    loop = get_reward("loop_closure")
    with progress_bar(count, description, enabled=progress) as update:
        for start in range(0, count, config.batch_size):
            index = list(range(start, min(start + config.batch_size, count)))
            frames = episodes["frames"][index]
            context_tokens = model.encode(frames[:, :context_len])
            actions = episodes["actions"][index][:, : context_len + horizon - 1]
            seeds = [rollout_seed(config.seed, int(s)) for s in episodes["seed"][index]]
            out = model.rollout(context_tokens, actions, horizon, temperature=config.temperature,
                                top_k=config.top_k, top_p=config.top_p, seeds=seeds)
            predicted = out.frames.float()  # (B, H, h, w, 3) in [0, 1]
            truth = frames[:, context_len: context_len + horizon].float() / 255
            per_step["mse"].append(M.mse(predicted, truth))
            per_step["psnr"].append(M.psnr(predicted, truth).clamp(max=60.0))
            per_step["ssim"].append(M.ssim(predicted, truth))
            batch = episode_batch(episodes, index)
            truncated = EpisodeBatch(**{**batch.__dict__, **{k: getattr(batch, k)[:, : context_len + horizon]
                                        for k in ("frames", "depth", "segmentation", "world_to_camera",
                                                  "object_positions", "object_visible")},
                                        "actions": batch.actions[:, : context_len + horizon - 1]})
            context = frames[:, :context_len].float() / 255
            steps = []
            for t in range(horizon):
                pair = predicted[:, t - 1: t + 1] if t else torch.cat([context[:, -1:], predicted[:, :1]], 1)
                rollouts = RolloutBatch(frames=pair, num_context=context_len + t - 1)
                steps.append(-consistency(rollouts, truncated))
            per_step["consistency_3d"].append(torch.stack(steps, 1))
            full = RolloutBatch(frames=predicted, num_context=context_len, context=context)
            result = loop.evaluate(full, truncated)
            if result.mask is not None and result.mask.any():
                loop_errors.extend((-result.reward[result.mask]).tolist())
            update(len(index))
    model.train(was_training)
    report: dict = {"episodes": count, "num_context": context_len, "horizon": horizon,
                    "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
    for name, chunks in per_step.items():
        values = torch.cat(chunks).double()  # (E, H)
        finite = torch.where(torch.isfinite(values), values, torch.nan)
        report[f"{name}_per_step"] = [round(float(v), 6) for v in torch.nanmean(finite, 0)]
        report[f"{name}_mean"] = round(float(torch.nanmean(finite)), 6)
    report["loop_closure_error_mean"] = round(float(np.mean(loop_errors)), 6) if loop_errors else None
    report["loop_episodes"] = len(loop_errors)
    return report


def filmstrip(model, episodes: dict, config: EvalConfig, path: str | Path, rows: int = 4) -> Path:
    """PNG: for a few episodes, ground truth (top) and prediction (bottom) per step."""
    from PIL import Image

    rows = min(rows, episodes["frames"].shape[0])
    frames = episodes["frames"][:rows]
    with torch.no_grad():
        tokens = model.encode(frames[:, : config.num_context])
        actions = episodes["actions"][:rows][:, : config.num_context + config.horizon - 1]
        seeds = [rollout_seed(config.seed, int(s)) for s in episodes["seed"][:rows]]
        out = model.rollout(tokens, actions, config.horizon, temperature=config.temperature, seeds=seeds)
    truth = frames[:, config.num_context: config.num_context + config.horizon].numpy()
    predicted = (out.frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    strips = [np.concatenate([np.concatenate(list(truth[i]), 1), np.concatenate(list(predicted[i]), 1)], 0)
              for i in range(rows)]
    gap = np.full((4, strips[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([part for s in strips for part in (s, gap)][:-1], 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return Path(path)


def load_with_adapter(model_name: str, adapter: str | None = None):
    """Load a model by name/path and, optionally, a PEFT adapter folder on top (merged for speed)."""
    from posttrain.models import load_model

    model = load_model(model_name)
    if adapter:
        from posttrain.adapters import load_adapter

        model = load_adapter(model, adapter, base_name=model_name, merge=True)
    return model.eval()


def run_eval_cli(args) -> int:
    from posttrain.envs3d import parse_seeds

    # Every check before any work: a bad flag must not cost minutes of episode generation first.
    parse_seeds(args.seeds)
    for flag in ("horizon", "context", "batch_size", "size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    if Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a folder; give a file path such as {Path(args.json) / 'eval.json'}")
    config = EvalConfig(
        data=EpisodeDataConfig(seeds=args.seeds, frames=args.context + args.horizon, image_size=args.size,
                               scene=dict(s.split("=", 1) if "=" in s else (s, None) for s in (args.scene or [])), cache_dir=args.cache_dir),
        num_context=args.context, horizon=args.horizon, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, batch_size=args.batch_size,
    )
    model = load_with_adapter(args.model, args.adapter)
    if getattr(model, "image_size", args.size) != args.size:
        raise ValueError(f"--size {args.size} does not match the model's {model.image_size}x{model.image_size} frames")
    episodes = load_episodes(config.data, EPISODE_FIELDS)
    report = evaluate_model(model, episodes, config, description="eval")
    report.update({"model": args.model, "adapter": args.adapter, "seeds": args.seeds})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    strip = filmstrip(model, episodes, config, out.with_suffix(".png"))
    print(f"mse {report['mse_mean']:.5f}  psnr {report['psnr_mean']:.2f} dB  ssim {report['ssim_mean']:.4f}  "
          f"consistency_3d {report['consistency_3d_mean']:.4f}  -> {out} (+ {strip.name})")
    return 0
