"""The flow model's sampling steps: rollout quality and play speed at each step count, in one run.

    python benchmarks/bench_flow_steps.py --steps 2,3,4 --out benchmarks/results/flow_steps_cpu.json

The shipped flow model was trained on continuous times t ~ U(0, 1) (rectified flow), so its Euler sampler
may take any number of steps; the checkpoint's config says 3. For each step count this loads the same weights
and sets the count (`FlowWorldModel.set_sample_steps`, what `--sample-steps` does), then measures what
bench_flow_eval measures for one model (posttrain eval's code: held-out seeds 2000000-2000047, 2 true frames,
32 predicted, greedy = the ODE and T = 1 = the SDE on step 0) and what bench_flow measures for play (one
stream, one thread, `rollout_step` + `decode`). Speeds need an idle machine; the quality numbers do not
(`--play-only` reruns just the speeds, for an idle moment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_flow import play_step  # noqa: E402
from bench_flow_eval import compact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", default="flow")
    parser.add_argument("--steps", default="2,3,4", help="step counts (one step has no SDE: see FlowConfig)")
    parser.add_argument("--seeds", default="2000000:2000048")
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--frames", type=int, default=100, help="frames per play measurement")
    parser.add_argument("--play-only", action="store_true", help="only the play speeds (a quick idle rerun)")
    parser.add_argument("--out", default="benchmarks/results/flow_steps_cpu.json")
    args = parser.parse_args()

    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.evaluate import EvalConfig, evaluate_model, mean_frame_for
    from posttrain.models import load_model
    from posttrain.models.registry import resolve_model_path
    from posttrain.rollouts import EPISODE_FIELDS

    folder = resolve_model_path(args.flow)
    data = EpisodeDataConfig(seeds=args.seeds, frames=2 + args.horizon)
    episodes = None if args.play_only else load_episodes(data, EPISODE_FIELDS)
    mean_frame, source = (None, "") if args.play_only else mean_frame_for(args.flow, episodes)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": os.getloadavg()},
               "torch": torch.__version__, "flow": args.flow, "seeds": args.seeds, "horizon": args.horizon,
               "shipped_sample_steps": json.loads((folder / "config.json").read_text())["flow"]["sample_steps"],
               "steps": {}}
    for steps in [int(s) for s in args.steps.split(",")]:
        model = load_model(args.flow).eval()
        model.set_sample_steps(steps)
        entry = {}
        torch.set_num_threads(2)
        for temperature in () if args.play_only else (0.0, 1.0):
            config = EvalConfig(data=data, num_context=2, horizon=args.horizon, temperature=temperature)
            report = evaluate_model(model, episodes, config, description=f"K={steps} T={temperature:g}",
                                    mean_frame=mean_frame, mean_frame_source=source)
            entry[f"t{temperature:g}"] = compact(report)
            entry[f"t{temperature:g}_ssim_per_step"] = [round(v, 4) for v in report["ssim_per_step"]]
        entry["play"] = play_step(model, args.frames)  # one thread, as play's server runs each panel
        results["steps"][str(steps)] = entry
        print(steps, {k: v for k, v in entry.items() if not k.endswith("per_step")}, flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("->", args.out)


if __name__ == "__main__":
    main()
