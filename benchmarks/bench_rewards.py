"""Throughput of every registered reward: rollouts/s on 64 rollouts x 8 frames at 64x64.

Each reward runs through ``compose`` (so chunking, failure checks and the process pool
are included) with 1 and 2 workers in the same run, after one warm-up call (which also
starts the pool). ``workers=1`` evaluates single-threaded by design (see compose.py).

    python benchmarks/bench_rewards.py [--out benchmarks/results/rewards_cpu.json] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from posttrain.rewards import RewardSpec, compose, list_rewards
from posttrain.rewards.reward_model import RewardModel, RewardModelConfig, save_reward_model
from posttrain.rewards.synthetic import make_episodes, noise_frames, truth_rollouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/rewards_cpu.json")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    episodes = make_episodes(range(args.batch), num_steps=args.frames + 1, height=args.size, width=args.size)
    gt = truth_rollouts(episodes, num_context=1)
    rollouts = dataclasses.replace(gt, frames=noise_frames(gt.frames, 0.05))

    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    model_path = save_reward_model(RewardModel(RewardModelConfig()), Path(tmp) / "rm")
    params = {"learned": {"path": str(model_path)}}
    names = list_rewards()
    results = []
    for name in names + ["all"]:
        specs = (
            [RewardSpec(n, params=params.get(n, {})) for n in names]
            if name == "all"
            else [RewardSpec(name, params=params[name] if name in params else {})]
        )
        row = {"reward": name}
        for w in args.workers:
            with compose(specs, workers=w, chunk_size=args.chunk_size) as reward:
                reward(rollouts, episodes)  # warm-up (starts the pool, fills caches)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = reward(rollouts, episodes)
                    times.append(time.perf_counter() - t0)
                assert out.valid.all(), out.failures[:3]
            best = min(times)
            row[f"rollouts_per_s_workers{w}"] = round(args.batch / best, 1)
            row[f"seconds_per_batch_workers{w}"] = round(best, 4)
        results.append(row)
        print(json.dumps(row))

    report = {
        "batch": args.batch,
        "frames": args.frames,
        "height": args.size,
        "width": args.size,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "timing": "best of repeats, after one warm-up call",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
