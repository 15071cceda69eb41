"""GRPO step time split into generate / score / update, and peak memory, with LoRA and full fine-tuning.

    python benchmarks/bench_grpo.py --out benchmarks/results/grpo_cpu.json

Each variant runs the main recipe (recipes/grpo_tabletop.yaml, same prompts, rewards and
batch) for a few steps in its own subprocess, so peak RSS is attributable; the first step
(warm-up) is dropped from the averages. With --repeats N the variants alternate N times
(lora, full, lora, full, ...), so a change in the machine's load hits both alike; every timed
step is kept (`step_seconds_all`) beside the mean and the median, so the spread is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(variant: str, steps: int, out: str, extra: list[str]) -> None:
    from posttrain.logging_utils import read_metrics
    from posttrain.runner import run_recipe

    overrides = [f"out={out}", f"steps={steps}", "train.eval_at_end=false", "train.checkpoint_every=0",
                 "train.video_every=0", "train.tensorboard=false", *extra]
    if variant == "full":
        overrides.append("lora.enabled=false")
    run_recipe(ROOT / "recipes" / "grpo_tabletop.yaml", overrides)
    records = read_metrics(Path(out) / "metrics.jsonl")[1:]  # drop the warm-up step
    keys = ("step_seconds", "time_share_generate", "time_share_score", "time_share_update")
    summary = {k: round(sum(r[k] for r in records) / len(records), 4) for k in keys}
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary["steps_measured"] = len(records)
    summary["step_seconds_all"] = [round(r["step_seconds"], 3) for r in records]
    print("RESULT " + json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/grpo_cpu.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the variants this many times")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every variant")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.run_dir, args.overrides)
        return
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "recipe": "recipes/grpo_tabletop.yaml", "overrides": args.overrides, "variants": {}}
    runs: dict[str, list[dict]] = {"lora": [], "full": []}
    for repeat in range(args.repeats):
        for variant in runs:
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
                proc = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                                       "--run-dir", tmp, *args.overrides], capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(lines[-1][7:]))
            print(f"{variant} (repeat {repeat + 1}/{args.repeats})", runs[variant][-1], flush=True)
    for variant, parts in runs.items():
        steps = [t for part in parts for t in part["step_seconds_all"]]
        summary = {k: round(statistics.fmean(part[k] for part in parts), 4) for k in parts[0]
                   if k not in ("step_seconds_all", "steps_measured", "peak_rss_mb")}
        summary.update({"step_seconds": round(statistics.fmean(steps), 3),
                        "step_seconds_median": round(statistics.median(steps), 3),
                        "step_seconds_all": steps, "steps_measured": len(steps), "repeats": len(parts),
                        "peak_rss_mb": max(part["peak_rss_mb"] for part in parts)})
        results["variants"][variant] = summary
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
