"""Run reports: held-out evaluation of base vs post-trained, plots, rollout GIFs, metrics.json, index.html."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from posttrain.logging_utils import json_safe


def _uint8(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dtype != torch.uint8:
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return frames.numpy()
    return np.asarray(frames)


def save_rollout_gif(path, context, predictions: dict, truth, scale: int = 2, fps: int = 4) -> Path:
    """GIF with panels side by side per frame: context (held on its last frame) | each prediction | truth."""
    import imageio.v2 as imageio

    context, truth = _uint8(context), _uint8(truth)
    panels = {name: _uint8(frames) for name, frames in predictions.items()}
    frames = []
    for t in range(len(context) + len(truth)):
        if t < len(context):
            row = [context[t]] * (len(panels) + 2)
        else:
            k = t - len(context)
            row = [context[-1]] + [p[k] for p in panels.values()] + [truth[k]]
        gap = np.full((row[0].shape[0], 2, 3), 255, np.uint8)
        image = np.concatenate([part for img in row for part in (img, gap)][:-1], 1)
        frames.append(np.kron(image, np.ones((scale, scale, 1), np.uint8)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    return path


def improvement(base: float, post: float) -> float:
    """Relative reduction of an error metric (positive = post-trained is better)."""
    return (base - post) / base if base else float("nan")


def save_step_video(out: Path, step: int, episode_frames: torch.Tensor, num_context: int,
                    predicted: torch.Tensor) -> Path:
    """videos/step-NNNNNN.gif in run folder `out`: one training rollout (H, h, w, 3) beside its episode's
    context and true future (episode_frames (T, h, w, 3) uint8)."""
    truth = episode_frames[num_context: num_context + predicted.shape[0]]
    return save_rollout_gif(Path(out) / "videos" / f"step-{step:06d}.gif", episode_frames[:num_context],
                            {"prediction": predicted}, truth)


@torch.no_grad()
def greedy_pair(policy, base, context: torch.Tensor, actions: torch.Tensor, horizon: int, seed: int,
                reference: torch.Tensor | None = None):
    """Greedy rollouts (1, horizon, h, w, 3) of the base and the post-trained policy from one context
    (1, C, N): `base` is the frozen base copy, or None for the policy with its adapter disabled. `reference`
    (1, H, W, 3): the last true context frame, for a model whose decoder draws beside it (as eval decodes)."""
    from posttrain.rollouts import generate, reference_policy

    with reference_policy(policy, base) as model:
        before = generate(model, context, actions, horizon, [seed], temperature=0.0, chunk=1, reference=reference)
    after = generate(policy, context, actions, horizon, [seed], temperature=0.0, chunk=1, reference=reference)
    return before.frames, after.frames


def write_report(policy, base, *, out: Path, base_name: str, eval_config, temperatures, history: list,
                 episodes: dict | None = None, mean_frame=None, mean_frame_source: str = "",
                 held_out: str | None = None, held_out_public: str | None = None) -> Path:
    """Evaluate the base (`base`: a frozen copy, or None for the policy with its adapter disabled) and the
    post-trained `policy` on held-out episodes at each temperature; write run folder `out`'s report/.
    The episodes are `eval_config.data`'s envs3d seeds, or `episodes` given by the caller (footage clips:
    frames, actions, seed) with their mean-image baseline and a description `held_out` of where they come from
    (`held_out_public`: the same without local paths, for model cards)."""
    from posttrain.data import load_episodes
    from posttrain.evaluate import evaluate_model, mean_frame_for
    from posttrain.rollouts import EPISODE_FIELDS, reference_policy, rollout_seed

    run_dir = Path(out)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    if episodes is None:
        episodes = load_episodes(eval_config.data, EPISODE_FIELDS)
        mean_frame, mean_frame_source = mean_frame_for(base_name, episodes)
        held_out = eval_config.data.seeds
    results: dict = {"eval_seeds": held_out, "horizon": eval_config.horizon, "temperatures": {}}
    if held_out_public is not None:
        results["eval_clips_public"] = held_out_public
    for temperature in temperatures:
        config = _replace(eval_config, temperature=temperature)
        with reference_policy(policy, base) as model:
            base_report = evaluate_model(model, episodes, config, description=f"base T={temperature}",
                                         mean_frame=mean_frame, mean_frame_source=mean_frame_source)
        post_report = evaluate_model(policy, episodes, config, description=f"post T={temperature}",
                                     mean_frame=mean_frame, mean_frame_source=mean_frame_source)
        entry = {"base": base_report, "post": post_report,
                 "mse_reduction": improvement(base_report["mse_mean"], post_report["mse_mean"])}
        if "consistency_3d_mean" in base_report:
            entry["consistency_3d_error_reduction"] = improvement(base_report["consistency_3d_mean"],
                                                                  post_report["consistency_3d_mean"])
        results["temperatures"][str(temperature)] = entry
    results["training"] = history
    (out / "metrics.json").write_text(json.dumps(json_safe(results), indent=2))
    _plot_rewards(run_dir / "metrics.jsonl", out / "reward_curve.png")
    _plot_per_step(results, out / "per_step_mse.png")
    _plot_against_baselines(results, out / "per_step_ssim_objects.png")
    # One before/after/truth rollout on a held-out episode (greedy, so it is representative).
    num_context, horizon = eval_config.num_context, eval_config.horizon
    frames = episodes["frames"][:1]
    actions = episodes["actions"][:1, : num_context + horizon - 1]
    seed = rollout_seed(eval_config.seed, int(episodes["seed"][0]))
    with torch.no_grad():
        context = policy.encode(frames[:, :num_context])
    # Decoded as the metrics above were: beside the last true context frame where the model's decoder uses one.
    before, after = greedy_pair(policy, base, context, actions, horizon, seed, reference=frames[:, num_context - 1])
    save_rollout_gif(out / "rollout.gif", frames[0, :num_context], {"base": before[0], "post-trained": after[0]},
                     frames[0, num_context: num_context + horizon])
    write_index_html(out, results)
    _print_summary(results)
    return out


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def _plot_rewards(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.logging_utils import read_metrics

    records = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    if not records:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in records]
    axes[0].plot(steps, [r["reward_mean"] for r in records], label="total")
    axes[0].set_title("reward (train rollouts)")
    axes[0].set_xlabel("step")
    for key in sorted(k for k in records[0] if k.startswith("reward/") and k.endswith("_mean")):
        axes[1].plot(steps, [r.get(key) for r in records], label=key[7:-5])
    axes[1].set_title("reward components")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_per_step(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = results["temperatures"]
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps), 3.5), squeeze=False)
    for axis, (temperature, pair) in zip(axes[0], temps.items()):
        for name in ("base", "post"):
            values = pair[name]["mse_per_step"]
            axis.plot(range(1, len(values) + 1), values, marker="o", label=name)
        axis.set_title(f"held-out MSE per step, T={temperature}")
        axis.set_xlabel("predicted frame")
        axis.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_against_baselines(results: dict, out: Path) -> None:
    """Per-step SSIM and object presence of base and post-trained, with the trivial baselines drawn on
    the same axes (a model below a dashed line is worse than doing nothing clever)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = results["temperatures"]
    metrics = [("ssim", "SSIM"), ("object_presence", "object presence"), ("psnr", "PSNR (dB)")]
    first = next(iter(temps.values()))["base"]
    metrics = [m for m in metrics if f"{m[0]}_per_step" in first][:2]  # footage: SSIM and PSNR
    fig, axes = plt.subplots(2, len(temps), figsize=(5 * len(temps), 6.5), squeeze=False)
    for column, (temperature, pair) in enumerate(temps.items()):
        for row, (metric, title) in enumerate(metrics):
            axis = axes[row][column]
            for name in ("base", "post"):
                values = pair[name][f"{metric}_per_step"]
                axis.plot(range(1, len(values) + 1), values, marker="o", label=name)
            for name, style in (("persistence", "--"), ("mean_image", ":")):
                values = pair["base"]["baselines"][name][f"{metric}_per_step"]
                axis.plot(range(1, len(values) + 1), values, style, color="grey", label=name.replace("_", " "))
            if "tokenizer_ceiling" in pair["base"]:  # footage: the best the tokenizer can draw the truth
                values = pair["base"]["tokenizer_ceiling"][f"{metric}_per_step"]
                axis.plot(range(1, len(values) + 1), values, "-.", color="black", label="tokenizer ceiling")
            axis.set_title(f"held-out {title} per step, T={temperature}")
            axis.set_xlabel("predicted frame")
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_index_html(folder: Path, results: dict) -> Path:
    """A self-contained page (relative links only, no network) with plots, the GIF and the metrics table."""
    rows = []
    for temperature, pair in results["temperatures"].items():
        for metric in ("mse_mean", "psnr_mean", "ssim_mean", "object_presence_mean", "useful_horizon",
                       "consistency_3d_mean", "loop_closure_error_mean"):
            if metric not in pair["base"]:
                continue  # a simulator metric of a footage report
            base, post = pair["base"].get(metric), pair["post"].get(metric)
            fmt = (lambda v: "n/a" if v is None else f"{v:.5g}")
            rows.append(f"<tr><td>{html.escape(temperature)}</td><td>{metric}</td><td>{fmt(base)}</td>"
                        f"<td>{fmt(post)}</td></tr>")
    images = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                     for name in ("reward_curve.png", "per_step_ssim_objects.png", "per_step_mse.png", "rollout.gif")
                     if (folder / name).exists())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>posttrain report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px}}figure{{display:inline-block;margin:1em}}img{{image-rendering:pixelated;max-width:100%}}</style>
</head><body><h1>posttrain report</h1><p>Held-out {html.escape(_held_out_phrase(results))}, horizon
{results.get('horizon')}. Rollout GIF panels: context | base | post-trained | ground truth.</p>
<table><tr><th>temperature</th><th>metric</th><th>base</th><th>post-trained</th></tr>{''.join(rows)}</table>
{images}</body></html>"""
    path = folder / "index.html"
    path.write_text(page)
    return path


def _held_out_phrase(results: dict) -> str:
    """'seeds 3000000:3000032' for envs3d, the clips' description for footage."""
    held = str(results.get("eval_seeds"))
    return held if held.startswith("clips") else f"seeds {held}"


def change_phrase(name: str, base: float, post: float, lower_is_better: bool, relative: bool = True,
                  unit: str = "") -> str:
    """'MSE 0.0123 -> 0.0111 (-9.8%, better)': the change with its sign and which way it goes."""
    if base is None or post is None or not (math.isfinite(base) and math.isfinite(post)):
        return f"{name} {base} -> {post} (n/a: not measured on both)"
    delta = post - base
    amount = f"{100 * delta / base:+.1f}%" if relative and base else f"{delta:+.3g}{unit}"
    if delta == 0:
        verdict = "unchanged"
    else:
        verdict = "better" if (delta < 0) == lower_is_better else "worse"
    return f"{name} {base:.4g} -> {post:.4g} ({amount}, {verdict})"


def result_lines(results: dict) -> list[str]:
    lines = []
    for temperature, pair in results["temperatures"].items():
        base, post = pair["base"], pair["post"]
        parts = [change_phrase("MSE", base["mse_mean"], post["mse_mean"], lower_is_better=True),
                 change_phrase("SSIM", base["ssim_mean"], post["ssim_mean"], False, relative=False)]
        if "object_presence_mean" in base:  # the simulator's metrics; footage has none
            parts += [change_phrase("object presence", base["object_presence_mean"], post["object_presence_mean"],
                                    False, relative=False),
                      change_phrase("3D-consistency error", base["consistency_3d_mean"], post["consistency_3d_mean"],
                                    True)]
        else:
            parts.append(change_phrase("PSNR", base["psnr_mean"], post["psnr_mean"], False, relative=False,
                                       unit=" dB"))
        parts.append(f"useful horizon {base['useful_horizon']} -> {post['useful_horizon']} steps")
        label = "greedy" if float(temperature) == 0 else f"T={temperature}"
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


def _print_summary(results: dict) -> None:
    for line in result_lines(results):
        print(line)
