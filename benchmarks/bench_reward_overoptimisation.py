"""What a learned reward costs next to a verifiable one: the reward-model over-optimisation curve.

    python benchmarks/bench_reward_overoptimisation.py --steps 24
    python benchmarks/bench_reward_overoptimisation.py --steps 24 --reuse-reward-model   (skip step 1)

1. Fit a Bradley-Terry reward model to pairs of the base's rollouts ranked by the simulator's
   reward R* = 10 x -MSE + SSIM + object presence (`recipes/reward_model_drift.yaml`).
2. GRPO on the learned reward, R* watched beside it (`recipes/grpo_learned_reward.yaml`,
   `monitor_rewards`: logged, never trained on).
3. The same GRPO, with the same steps, prompts and sampling seeds, trained on R* itself, the
   learned reward watched beside it.

Both runs log both rewards on every step's rollouts (the policy's own samples at temperature 1),
so the plot shows, for each run, the reward it optimises and the one it does not. Gao et al.
(2022): a proxy reward keeps climbing while the true one stalls or falls. The JSON holds the
per-step curves, the reward model's held-out pair accuracy and the change of each reward between
the first and the last quarter of training. Both runs take the same number of steps (not the same
wall-clock budget, so the result does not depend on what else the CPU was doing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RM_RECIPE = "recipes/reward_model_drift.yaml"
GRPO_RECIPE = "recipes/grpo_learned_reward.yaml"
TRUE_MIX = "[{name: neg_mse, weight: 10.0}, {name: ssim, weight: 1.0}, {name: object_presence, weight: 1.0}]"


def run(command: list[str]) -> float:
    """Run a `posttrain` command in a subprocess; exit with its stderr if it fails. Returns seconds."""
    started = time.time()
    process = subprocess.run([sys.executable, "-m", "posttrain", *command], capture_output=True, text=True,
                             env={**os.environ, "POSTTRAIN_NO_PROGRESS": "1"})
    if process.returncode:
        sys.exit(f"`posttrain {' '.join(command)}` failed:\n{process.stderr[-3000:]}")
    return round(time.time() - started, 1)


def curves(out: Path, trained: str) -> dict:
    """Per-step learned and true reward means of one GRPO run; `trained` names the one it optimised."""
    from posttrain.logging_utils import read_metrics

    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward_mean" in r]
    if trained == "learned":
        learned, true = [r["reward_mean"] for r in steps], [r["monitor_mean"] for r in steps]
    else:
        true, learned = [r["reward_mean"] for r in steps], [r["monitor_mean"] for r in steps]
    return {"trained_on": trained, "steps": len(steps), "learned": learned, "true": true}


def quarter_change(values: list[float]) -> float | None:
    """Mean of the last quarter minus the mean of the first (per-step means are noisy: prompts differ)."""
    q = max(1, len(values) // 4)
    if len(values) < 2:
        return None
    return round(sum(values[-q:]) / q - sum(values[:q]) / q, 5)


def smooth(values: list[float], width: int = 5) -> list[float]:
    return [sum(values[max(0, i - width + 1): i + 1]) / len(values[max(0, i - width + 1): i + 1])
            for i in range(len(values))]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, style in (("grpo_on_learned", "-"), ("grpo_on_simulator", "--")):
        run_curves = results["runs"][name]
        for ax, key in zip(axes, ("true", "learned")):
            values = run_curves[key]
            ax.plot(range(len(values)), smooth(values), style, label=f"GRPO on {run_curves['trained_on']} reward")
    axes[0].set_title("simulator's reward R* (true)")
    axes[1].set_title("learned reward model")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("step mean, 5-step moving average")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="GRPO steps per run")
    parser.add_argument("--model", default="default")
    parser.add_argument("--work", default="runs/overoptimisation", help="folder for the three runs")
    parser.add_argument("--reuse-reward-model", action="store_true", help="keep a reward model already in --work")
    parser.add_argument("--out", default="benchmarks/results/reward_overoptimisation.json")
    parser.add_argument("--plot", default="docs/images/reward_overoptimisation.png")
    args = parser.parse_args()
    work = Path(args.work)
    rm_out = work / "reward_model"
    from posttrain.models import weights_hash
    from posttrain.models.registry import resolve_model_path

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": args.model,
                     "model_weights_sha256": weights_hash(resolve_model_path(args.model)), "steps_per_run": args.steps, "true_reward": TRUE_MIX, "runs": {}}
    if not (args.reuse_reward_model and (rm_out / "report.json").is_file()):
        seconds = run(["run", str(ROOT / RM_RECIPE), f"out={rm_out}", f"model={args.model}", "--overwrite"])
        print(f"reward model fitted in {seconds} s", flush=True)
    report = json.loads((rm_out / "report.json").read_text())
    results["reward_model"] = {k: report.get(k) for k in ("pairs", "heldout_accuracy", "train_accuracy",
                                                          "verifier_gap_mean", "pairs_seconds", "train_seconds")}
    learned = f"[{{name: learned, weight: 1.0, params: {{path: {rm_out / 'reward_model'}}}}}]"
    common = [f"model={args.model}", f"steps={args.steps}", "train.eval_at_end=false",
              "train.tensorboard=false", "train.checkpoint_every=0", "--overwrite"]
    for name, rewards, monitor, trained in (("grpo_on_learned", learned, TRUE_MIX, "learned"),
                                            ("grpo_on_simulator", TRUE_MIX, learned, "simulator")):
        out = work / name
        seconds = run(["run", str(ROOT / GRPO_RECIPE), f"out={out}", f"rewards={rewards}",
                       f"monitor_rewards={monitor}", *common])
        results["runs"][name] = {**curves(out, trained), "seconds": seconds}
        run_curves = results["runs"][name]
        run_curves["change_first_to_last_quarter"] = {k: quarter_change(run_curves[k]) for k in ("learned", "true")}
        print(f"{name}: {run_curves['steps']} steps, change first -> last quarter: "
              f"{run_curves['change_first_to_last_quarter']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
