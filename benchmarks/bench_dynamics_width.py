"""Dynamics transformer shape -> parameters and teacher-forced training-step time (the base model's #11 sizing).

    python benchmarks/bench_dynamics_width.py --out benchmarks/results/dynamics_width_cpu.json

Each shape trains on the same random tokens (batch 16 clips of 8 frames, the pre-training recipe's) with
`pretrain.teacher_forced_loss`, bf16 autocast and AdamW, in this one process; the first step is a warm-up and
the median of the rest is reported, with the ratio to the first shape (v3's width 192) measured in the same
run. Random tokens time the arithmetic, not the data loading (~0.13 s a step more in a real run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

SHAPES = [(192, 4, 6), (256, 4, 8), (192, 6, 6), (320, 4, 10)]  # (width, layers, heads); the first is the baseline


def main() -> None:
    import torch

    from posttrain.models.dynamics import DynamicsConfig, DynamicsTransformer
    from posttrain.pretrain import teacher_forced_loss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per shape (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/dynamics_width_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (16, 8, 256))
    actions = torch.randint(0, 35, (16, 7))
    rows = []
    for width, layers, heads in SHAPES:
        config = DynamicsConfig(vocab_size=1000, tokens_per_frame=256, width=width, layers=layers, heads=heads,
                                context_frames=8, patch=2)
        model = DynamicsTransformer(config)
        optimizer = torch.optim.AdamW(model.parameters())
        seconds = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            loss = teacher_forced_loss(model, tokens, actions, True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
        row = {"width": width, "layers": layers, "heads": heads,
               "parameters": sum(p.numel() for p in model.parameters()),
               "step_seconds_median": round(statistics.median(seconds[1:]), 4), "step_seconds_all": seconds[1:]}
        row["relative_to_first"] = round(row["step_seconds_median"] / rows[0]["step_seconds_median"], 3) if rows else 1.0
        rows.append(row)
        print(row, flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
              "threads": args.threads, "batch_clips": 16, "clip_frames": 8, "tokens_per_frame": 256, "shapes": rows}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
