"""`posttrain eval`: roll a world model out on held-out envs3d episodes or footage clips and score it.

    posttrain eval --model default --seeds 900000:900032 --horizon 12 --temperature 0 --json runs/eval.json
    posttrain eval --model default --adapter runs/grpo/adapter --seeds 900000:900032 --horizon 12 --json e.json
    posttrain eval --data data/footage --heldout-fraction 0.1 --adapter runs/sft_lora_footage/adapter --json f.json

On envs3d episodes the simulator's truth gives every metric: MSE, PSNR, SSIM, object presence, 3D
consistency, loop closure. Footage (`--data`, a `posttrain footage ingest` folder) has no simulator, so
only the image metrics are reported; the others are absent from the JSON, not zero. With `--adapter` the
base model is evaluated on the same rollouts' seeds too (`base` in the JSON; `--no-base` skips it).

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
from posttrain.logging_utils import json_safe, progress_bar
from posttrain.rewards import EpisodeBatch, RolloutBatch, get_reward
from posttrain.rewards import metrics as M
from posttrain.rollouts import EPISODE_FIELDS, decode_frames, episode_batch, generate, rollout_seed


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

        require(self, positive=("num_context", "horizon", "batch_size", "top_k"), non_negative=("temperature",),
                open_unit=("top_p",))


BASELINES = ("persistence", "mean_image")
"""Trivial predictors every model is compared with: repeat the last context frame; the mean frame of
the training data (a constant image)."""


def mean_frame_for(model_name: str | None, episodes: dict) -> tuple[torch.Tensor, str]:
    """(H, W, 3) float mean frame and where it came from: the model folder's `mean_frame.png` (the mean
    of its training frames, written by pre-training), else the mean of the evaluated episodes' frames
    (a slightly stronger baseline than it should be: it has seen the test frames)."""
    if model_name:
        from posttrain.models.registry import resolve_model_path

        path = resolve_model_path(model_name) / MEAN_FRAME_FILE
        if path.is_file():
            from PIL import Image

            image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255
            if image.shape == episodes["frames"].shape[2:]:
                return image, str(path)
    return episodes["frames"].float().mean((0, 1)) / 255, "mean of the evaluated episodes' frames"


MEAN_FRAME_FILE = "mean_frame.png"


SIMULATOR_METRICS = ("object_presence", "consistency_3d", "loop_closure_error")
"""Metrics that need the simulator's truth (segmentation, depth, poses): absent from footage reports."""


def _frame_metrics(predicted, truth, segmentation=None) -> dict:
    """Per-episode, per-step metrics (E, H) of predicted frames (E, H, h, w, 3) in [0, 1]; object presence
    (E, H, objects) only with the true `segmentation`."""
    out = {"mse": M.mse(predicted, truth), "psnr": M.psnr(predicted, truth).clamp(max=60.0),
           "ssim": M.ssim(predicted, truth)}
    if segmentation is not None:
        out["object_presence"] = M.object_presence(predicted, truth, segmentation)  # NaN where no object
    return out


def _summarise(chunks: dict, report: dict, prefix: str = "") -> None:
    for name, parts in chunks.items():
        values = torch.cat(parts).double()
        finite = torch.where(torch.isfinite(values), values, torch.nan)
        if finite.dim() == 3:  # object presence: mean over objects that are there
            per_step = torch.nanmean(finite, (0, 2))
        else:
            per_step = torch.nanmean(finite, 0)
        report[f"{prefix}{name}_per_step"] = [None if torch.isnan(v) else round(float(v), 6) for v in per_step]
        report[f"{prefix}{name}_mean"] = round(float(torch.nanmean(finite)), 6)


def skill_scores(model: dict, baseline: dict) -> dict:
    """Skill of the model against a baseline (positive = the model is better):
    mse: 1 - MSE_model / MSE_baseline; psnr_db: PSNR_model - PSNR_baseline;
    ssim: (SSIM_model - SSIM_baseline) / (1 - SSIM_baseline), the share of the baseline's gap to a
    perfect 1 that the model closes."""
    mse_b, ssim_b = baseline["mse_mean"], baseline["ssim_mean"]
    return {"mse": round(1 - model["mse_mean"] / mse_b, 6) if mse_b else None,
            "psnr_db": round(model["psnr_mean"] - baseline["psnr_mean"], 4),
            "ssim": round((model["ssim_mean"] - ssim_b) / (1 - ssim_b), 6) if ssim_b < 1 else None}


def useful_horizon(model_ssim: list, *baseline_ssims: list) -> int:
    """Predicted steps, counted from the first, for which the model's mean SSIM beats every baseline's
    at every step so far (the first step where any baseline is at least as good ends it)."""
    horizon = 0
    for step, value in enumerate(model_ssim):
        if all(value > other[step] for other in baseline_ssims):
            horizon += 1
        else:
            break
    return horizon


@torch.no_grad()
def evaluate_model(model, episodes: dict, config: EvalConfig, description: str = "eval", progress: bool = True,
                   mean_frame: torch.Tensor | None = None, mean_frame_source: str = "") -> dict:
    """Per-step and mean metrics of `model` rolled out on `episodes` (a `load_episodes` dict, or footage clips:
    frames, actions and seed only), beside the trivial baselines (persistence, mean image), with skill
    scores and the useful horizon. Without simulator columns (footage) the SIMULATOR_METRICS are left out and
    `tokenizer_ceiling` holds the scores of the true frames passed through the model's own tokenizer: no
    rollout, which emits tokens, can draw the truth better than that (on footage the tokenizer may never
    have seen such images)."""
    count, length = episodes["frames"].shape[:2]
    context_len, horizon = config.num_context, config.horizon
    if context_len + horizon > length:
        raise ValueError(f"episodes have {length} frames; need num_context + horizon = {context_len + horizon}")
    simulator = "segmentation" in episodes
    if mean_frame is None:
        mean_frame, mean_frame_source = mean_frame_for(None, episodes)
    was_training = model.training
    model.eval()
    per_step: dict[str, list] = {"consistency_3d": []} if simulator else {}
    baseline_steps: dict[str, dict[str, list]] = {name: {} for name in BASELINES}
    ceiling_steps: dict[str, list] = {}
    loop_errors: list[float] = []
    with progress_bar(count, description, enabled=progress) as update:
        for start in range(0, count, config.batch_size):
            index = list(range(start, min(start + config.batch_size, count)))
            frames = episodes["frames"][index]
            context_tokens = model.encode(frames[:, :context_len])
            actions = episodes["actions"][index][:, : context_len + horizon - 1]
            seeds = [rollout_seed(config.seed, int(s)) for s in episodes["seed"][index]]
            last_true = frames[:, context_len - 1]  # what a model that decodes with a reference frame gets
            out = generate(model, context_tokens, actions, horizon, seeds, temperature=config.temperature,
                           top_k=config.top_k, top_p=config.top_p, chunk=config.batch_size, reference=last_true)
            predicted = out.frames.float()  # (B, H, h, w, 3) in [0, 1]
            truth = frames[:, context_len: context_len + horizon].float() / 255
            segmentation = (episodes["segmentation"][index][:, context_len: context_len + horizon]
                            if simulator else None)
            for name, values in _frame_metrics(predicted, truth, segmentation).items():
                per_step.setdefault(name, []).append(values)
            trivial = {"persistence": (frames[:, context_len - 1: context_len].float() / 255).expand_as(truth),
                       "mean_image": mean_frame.to(truth.dtype).expand_as(truth)}
            for name, guess in trivial.items():
                for metric, values in _frame_metrics(guess, truth, segmentation).items():
                    baseline_steps[name].setdefault(metric, []).append(values)
            if simulator:
                steps, errors = _simulator_scores(predicted, frames, episodes, index, context_len, horizon)
                per_step["consistency_3d"].append(steps)
                loop_errors.extend(errors)
            else:  # footage: how well the model's own tokenizer can draw the truth at best
                recon = decode_frames(model, model.encode(frames[:, context_len: context_len + horizon]),
                                      last_true).float()
                for metric, values in _frame_metrics(recon, truth).items():
                    ceiling_steps.setdefault(metric, []).append(values)
            update(len(index))
    model.train(was_training)
    report: dict = {"episodes": count, "num_context": context_len, "horizon": horizon,
                    "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
    _summarise(per_step, report)
    if simulator:
        report["loop_closure_error_mean"] = round(float(np.mean(loop_errors)), 6) if loop_errors else None
        report["loop_episodes"] = len(loop_errors)
    report["baselines"] = {}
    for name, chunks in baseline_steps.items():
        summary: dict = {}
        _summarise(chunks, summary)
        report["baselines"][name] = summary
    report["baselines"]["mean_image"]["source"] = mean_frame_source
    if ceiling_steps:
        report["tokenizer_ceiling"] = {}
        _summarise(ceiling_steps, report["tokenizer_ceiling"])
    report["skill"] = {name: skill_scores(report, report["baselines"][name]) for name in BASELINES}
    report["useful_horizon"] = useful_horizon(report["ssim_per_step"],
                                              *[report["baselines"][name]["ssim_per_step"] for name in BASELINES])
    return report


def _simulator_scores(predicted, frames, episodes, index, context_len, horizon):
    """3D-consistency error per step (B, horizon) and the loop-closure errors of the loop episodes in
    `index`, from the simulator's depth and poses."""
    consistency, loop = get_reward("consistency_3d"), get_reward("loop_closure")
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
    full = RolloutBatch(frames=predicted, num_context=context_len, context=context)
    result = loop.evaluate(full, truncated)
    errors = (-result.reward[result.mask]).tolist() if result.mask is not None and result.mask.any() else []
    return torch.stack(steps, 1), errors


def filmstrip(model, episodes: dict, config: EvalConfig, path: str | Path, rows: int = 4, base=None) -> Path:
    """PNG: for a few episodes, ground truth (top), then `base`'s prediction when given, then `model`'s,
    one column per predicted step."""
    from PIL import Image

    rows = min(rows, episodes["frames"].shape[0])
    frames = episodes["frames"][:rows]
    actions = episodes["actions"][:rows][:, : config.num_context + config.horizon - 1]
    seeds = [rollout_seed(config.seed, int(s)) for s in episodes["seed"][:rows]]
    predictions = []
    for world in ([base] if base is not None else []) + [model]:
        with torch.no_grad():
            tokens = world.encode(frames[:, : config.num_context])
            out = generate(world, tokens, actions, config.horizon, seeds, temperature=config.temperature, chunk=rows,
                           reference=frames[:, config.num_context - 1])
        predictions.append((out.frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    truth = frames[:, config.num_context: config.num_context + config.horizon].numpy()
    strips = [np.concatenate([np.concatenate(list(images[i]), 1) for images in (truth, *predictions)], 0)
              for i in range(rows)]
    gap = np.full((4, strips[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([part for s in strips for part in (s, gap)][:-1], 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return Path(path)


def format_eval_summary(report: dict) -> str:
    """A few lines: the model (and the base, when evaluated) beside the baselines, skill and useful horizon.
    Object presence and 3D consistency appear only where the simulator measured them."""
    objects = "object_presence_mean" in report
    rows = ([("base", report["base"])] if "base" in report else []) + [("model", report)]
    rows += [(name, report["baselines"][name]) for name in BASELINES]
    if "tokenizer_ceiling" in report:
        rows.append(("tokenizer*", report["tokenizer_ceiling"]))
    lines = [f"{'':12} {'MSE':>8} {'PSNR dB':>8} {'SSIM':>7}" + (f" {'objects':>8}" if objects else "")]
    for name, values in rows:
        lines.append(f"{name:12} {values['mse_mean']:8.5f} {values['psnr_mean']:8.2f} {values['ssim_mean']:7.4f}"
                     + (f" {values['object_presence_mean']:8.3f}" if objects else ""))
    for name in BASELINES:
        skill = {k: "n/a" if v is None else f"{v:+.3f}" for k, v in report["skill"][name].items()}
        lines.append(f"skill vs {name}: MSE {skill['mse']}, PSNR {skill['psnr_db']} dB, SSIM {skill['ssim']} "
                     f"(positive = better than the baseline; n/a where the baseline is exact)")
    horizons = (f"base {report['base']['useful_horizon']}, model " if "base" in report else "")
    line = (f"useful horizon: {horizons}{report['useful_horizon']} of {report['horizon']} steps (model SSIM above "
            f"both baselines at every step so far)")
    if "consistency_3d_mean" in report:
        line += f"; consistency_3d {report['consistency_3d_mean']:.4f}"
    lines.append(line)
    if "tokenizer_ceiling" in report:
        lines.append("tokenizer*: the true frames encoded and decoded by the model's tokenizer, the best any rollout "
                     "can score")
    return "\n".join(lines)


def load_with_adapter(model_name: str, adapter: str | None = None, force: bool = False):
    """Load a model by name/path and, optionally, a PEFT adapter folder on top (merged for speed).
    `force` applies an adapter that lacks posttrain_adapter.json (its base cannot be checked)."""
    from posttrain.models import load_model

    model = load_model(model_name)
    if adapter:
        from posttrain.adapters import load_adapter

        model = load_adapter(model, adapter, base_name=model_name, merge=True, force=force)
    return model.eval()


def apply_sample_steps(model, steps: int | None, name: str):
    """`--sample-steps`: a flow model samples each frame in `steps` Euler steps (None: its own setting). A model
    without the setting (a token model draws a frame in one pass) is a clear error naming it."""
    if steps is None:
        return model
    setter = getattr(model, "set_sample_steps", None)
    if setter is None:
        raise ValueError(f"--sample-steps is for flow models; --model {name} ({type(model).__name__}) draws each "
                         "frame in one pass")
    setter(steps)
    return model


DEFAULT_SEEDS = "2000000:2000048"


def run_eval_cli(args) -> int:
    from posttrain.envs3d import parse_seeds

    # Every check before any work: a bad flag must not cost minutes of episode generation first.
    footage = getattr(args, "data", None)
    if footage:
        for flag, value in (("--seeds", args.seeds), ("--scene", args.scene)):
            if value:
                raise ValueError(f"{flag} picks envs3d episodes; --data {footage} evaluates footage clips instead. "
                                 f"Give one of them")
    else:
        for flag in ("clips", "heldout_fraction"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} selects footage clips; it needs --data FOOTAGE_DATASET")
        args.seeds = args.seeds or DEFAULT_SEEDS
        parse_seeds(args.seeds)
    for flag in ("horizon", "context", "batch_size", "size", "sample_steps"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    out = Path(args.json)
    if out.is_dir():
        raise ValueError(f"--json {args.json} is a folder; give a file path such as {out / 'eval.json'}")
    if out.suffix.lower() == ".png":
        raise ValueError(f"--json {args.json} ends in .png, the filmstrip's name (it is written beside the JSON as "
                         f"{out.with_suffix('.png').name}); give a .json path")
    from posttrain.models.registry import resolve_model_path
    from posttrain.runfolder import check_not_overlapping

    # The report and its filmstrip may not land on or inside an input (a model's config.json, its mean frame).
    inputs = {"model": resolve_model_path(args.model), "adapter": args.adapter,
              **({"footage dataset": footage} if footage else {"episode cache": args.cache_dir})}
    for written in (out, out.with_suffix(".png")):
        check_not_overlapping(written, inputs)
    needed = args.context + args.horizon
    clips = None
    if footage:
        from posttrain.footage_clips import FootageClips

        clips = FootageClips.open(footage, needed_frames=needed)
        if clips.image_size != args.size:
            raise ValueError(f"--data {footage} holds {clips.image_size}x{clips.image_size} frames but --size is "
                             f"{args.size}; ingest at the model's size (posttrain footage ingest --size {args.size})")
        held, rest = clips.split(args.clips, args.heldout_fraction)
    config = EvalConfig(
        data=EpisodeDataConfig(seeds=args.seeds or DEFAULT_SEEDS, frames=needed, image_size=args.size,
                               scene=dict(s.split("=", 1) if "=" in s else (s, None) for s in (args.scene or [])),
                               cache_dir=args.cache_dir, path=footage or ""),
        num_context=args.context, horizon=args.horizon, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, batch_size=args.batch_size,
    )
    steps = getattr(args, "sample_steps", None)
    model = load_with_adapter(args.model, args.adapter, force=getattr(args, "force_adapter", False))
    apply_sample_steps(model, steps, args.model)
    if getattr(model, "image_size", args.size) != args.size:
        raise ValueError(f"--size {args.size} does not match the model's {model.image_size}x{model.image_size} frames")
    base = load_with_adapter(args.model) if args.adapter and not getattr(args, "no_base", False) else None
    if base is not None:
        apply_sample_steps(base, steps, args.model)
    if clips is not None:
        episodes = clips.load(held, needed)
        if rest:
            mean_frame, source = clips.mean_frame(rest), f"mean of the other {clips.describe(rest)}"
        else:
            mean_frame, source = mean_frame_for(None, episodes)
        selection = clips.describe(held)
    else:
        episodes = load_episodes(config.data, EPISODE_FIELDS)
        mean_frame, source = mean_frame_for(args.model, episodes)
        selection = args.seeds
    report = evaluate_model(model, episodes, config, description="eval", mean_frame=mean_frame,
                            mean_frame_source=source)
    if base is not None:
        base_report = evaluate_model(base, episodes, config, description="base", mean_frame=mean_frame,
                                     mean_frame_source=source)
        report["base"] = {k: v for k, v in base_report.items() if k not in ("baselines", "skill")}
        report["change_vs_base"] = {"mse_relative": round(report["mse_mean"] / base_report["mse_mean"] - 1, 6)
                                    if base_report["mse_mean"] else None,
                                    "psnr_db": round(report["psnr_mean"] - base_report["psnr_mean"], 4),
                                    "ssim": round(report["ssim_mean"] - base_report["ssim_mean"], 6)}
    report.update({"model": args.model, "adapter": args.adapter, **({"sample_steps": steps} if steps else {}),
                   **({"data": footage, "clips": selection} if footage else {"seeds": args.seeds})})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2))
    strip = filmstrip(model, episodes, config, out.with_suffix(".png"), base=base)
    print(format_eval_summary(report) + f"\n-> {out} (+ {strip.name}: rows truth"
          + (", base" if base is not None else "") + ", model)")
    return 0
