"""KV-cached vs full-recompute rollouts of the world model: frames/s and peak memory; writes JSON.

    python benchmarks/bench_rollout.py --out benchmarks/results/rollout_cpu.json

Both modes run in the same invocation on the same model and prompts (each in a fresh
subprocess so peak RSS is attributable), horizon 16, batch 8. The full-recompute baseline
re-runs the transformer over every frame so far for each new frame.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def measure(mode: str, model_name: str, horizon: int, batch: int, repeats: int) -> dict:
    import torch

    from posttrain.models import DynamicsConfig, TokenizerConfig, TokenWorldModel, load_model

    torch.manual_seed(0)
    try:
        model = load_model(model_name)
    except FileNotFoundError:
        model = TokenWorldModel(TokenizerConfig(), DynamicsConfig())  # same shape as the default
    model.eval()
    context = torch.randint(0, model.dynamics.config.vocab_size, (batch, 2, model.tokens_per_frame))
    actions = torch.randint(0, 11, (batch, 2 + horizon - 1))
    use_cache = mode == "kv_cache"
    model.rollout(context, actions, 2, seeds=list(range(batch)), decode=False, use_cache=use_cache)  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.rollout(context, actions, horizon, seeds=list(range(batch)), decode=False, use_cache=use_cache)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"mode": mode, "seconds_best": round(best, 4), "seconds_all": [round(t, 4) for t in times],
            "frames_per_second": round(batch * horizon / best, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/rollout_cpu.json")
    parser.add_argument("--model", default="default")
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.horizon, args.batch, args.repeats)))
        return
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": args.model,
               "horizon": args.horizon, "batch": args.batch, "runs": {}}
    for mode in ("kv_cache", "full_recompute"):
        output = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model,
                                 "--horizon", str(args.horizon), "--batch", str(args.batch),
                                 "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        results["runs"][mode] = json.loads(output.stdout.strip().splitlines()[-1])
        print(mode, results["runs"][mode], flush=True)
    results["speedup_kv_cache"] = round(results["runs"]["kv_cache"]["frames_per_second"]
                                        / results["runs"]["full_recompute"]["frames_per_second"], 2)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print("speedup", results["speedup_kv_cache"], "->", args.out)


if __name__ == "__main__":
    main()
