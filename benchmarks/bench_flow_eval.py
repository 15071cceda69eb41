"""Both model families on the same held-out episodes and sampling seeds, in one run; writes JSON and filmstrips.

    nice -n 5 python benchmarks/bench_flow_eval.py --flow flow --out benchmarks/results/flow_eval_cpu.json

For the token model (`--token`, default: the embedded v4) and the flow model (`--flow`): `posttrain eval`'s
evaluation (posttrain/evaluate.py: per-step MSE / PSNR / SSIM / object presence beside persistence and the
mean image, useful horizon) on held-out seeds 2000000-2000047, 2 true context frames, 32 predicted frames,
deterministic (temperature 0: the token model's argmax, the flow model's ODE) and stochastic (temperature 1),
plus three shifted scene sets at 16 frames, deterministic. The same episodes and per-episode sampling seeds
for both. Filmstrips: truth, token model, flow model (docs/images/flow_vs_token_t{0,1}.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

SHIFTS = {"min_objects=5": {"min_objects": 5, "max_objects": 6},
          "object_types=duck,teddy": {"object_types": ["duck", "teddy"]},
          "checker_size=0.4 walls=false": {"checker_size": 0.4, "walls": False}}


def compact(report: dict) -> dict:
    steps = report["ssim_per_step"]
    return {"mse": round(report["mse_mean"], 4), "psnr_db": round(report["psnr_mean"], 2),
            "ssim": round(report["ssim_mean"], 3), "objects": round(report["object_presence_mean"], 3),
            "frame1_psnr_db": round(report["psnr_per_step"][0], 2), "frame1_ssim": round(steps[0], 3),
            "frame1_objects": round(report["object_presence_per_step"][0], 3),
            "useful_horizon": report["useful_horizon"], "horizon": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", default="default")
    parser.add_argument("--flow", default="flow")
    parser.add_argument("--out", default="benchmarks/results/flow_eval_cpu.json")
    parser.add_argument("--images", default="docs/images", help="folder for the filmstrips ('' to skip)")
    parser.add_argument("--seeds", default="2000000:2000048")
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--shift-seeds", default="2100000:2100032")
    parser.add_argument("--shift-horizon", type=int, default=16)
    args = parser.parse_args()

    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.evaluate import EvalConfig, evaluate_model, filmstrip, mean_frame_for
    from posttrain.models import load_model
    from posttrain.rollouts import EPISODE_FIELDS

    torch.set_num_threads(2)
    models = {"token": (args.token, load_model(args.token).eval()), "flow": (args.flow, load_model(args.flow).eval())}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "torch": torch.__version__,
               "models": {k: name for k, (name, _) in models.items()}, "held_out": {}, "shifted": {}, "seconds": {}}
    sets = [("held_out", args.seeds, args.horizon, {}, (0.0, 1.0))]
    sets += [("shifted", args.shift_seeds, args.shift_horizon, scene, (0.0,)) for scene in SHIFTS.values()]
    for (kind, seeds, horizon, scene, temperatures), name in zip(sets, ["default", *SHIFTS]):
        data = EpisodeDataConfig(seeds=seeds, frames=2 + horizon, scene=scene)
        episodes = load_episodes(data, EPISODE_FIELDS)
        for temperature in temperatures:
            config = EvalConfig(data=data, num_context=2, horizon=horizon, temperature=temperature)
            for family, (model_name, model) in models.items():
                mean_frame, source = mean_frame_for(model_name, episodes)
                started = time.perf_counter()
                report = evaluate_model(model, episodes, config, description=f"{family} T={temperature}",
                                        mean_frame=mean_frame, mean_frame_source=source)
                results["seconds"][f"{kind}/{name}/t{temperature:g}/{family}"] = round(time.perf_counter() - started, 1)
                key = f"t{temperature:g}" if kind == "held_out" else name
                entry = results[kind].setdefault(key, {})
                entry[family] = compact(report)
                entry[f"{family}_per_step"] = {m: [round(v, 4) for v in report[f"{m}_per_step"]]
                                               for m in ("mse", "ssim", "object_presence")}
                entry.setdefault("baselines", {b: {"ssim": round(r["ssim_mean"], 3), "mse": round(r["mse_mean"], 4)}
                                               for b, r in report["baselines"].items()})
                print(kind, key, family, entry[family], flush=True)
            if kind == "held_out" and args.images:
                filmstrip(models["flow"][1], episodes, config, Path(args.images) / f"flow_vs_token_t{temperature:g}.png",
                          base=models["token"][1])
    held = results["held_out"]
    results["targets"] = {
        "onestep_psnr_at_least_24": held["t0"]["flow"]["frame1_psnr_db"] >= 24,
        "onestep_ssim_at_least_0.85": held["t0"]["flow"]["frame1_ssim"] >= 0.85,
        "onestep_objects_at_least_0.8": held["t0"]["flow"]["frame1_objects"] >= 0.8,
        "objects_above_token_both_temperatures": all(held[t]["flow"]["objects"] > held[t]["token"]["objects"]
                                                     for t in ("t0", "t1")),
        "ssim_above_token_from_frame_8": all(f > k for t in ("t0", "t1") for f, k in zip(
            held[t]["flow_per_step"]["ssim"][7:], held[t]["token_per_step"]["ssim"][7:])),
        "useful_horizon_32": held["t0"]["flow"]["useful_horizon"] == args.horizon,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["targets"]), "->", args.out)


if __name__ == "__main__":
    main()
