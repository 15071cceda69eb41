"""GRPO step time split into generate / score / update, and peak memory, with LoRA and full fine-tuning.

    python benchmarks/bench_grpo.py --out benchmarks/results/grpo_cpu.json

Each variant runs the main recipe (recipes/grpo_tabletop.yaml, same prompts, rewards and
batch) for a few steps in its own subprocess, so peak RSS is attributable; the first step
(warm-up) is dropped from the averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
    print("RESULT " + json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/grpo_cpu.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every variant")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.run_dir, args.overrides)
        return
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "recipe": "recipes/grpo_tabletop.yaml", "overrides": args.overrides, "variants": {}}
    for variant in ("lora", "full"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                                   "--run-dir", tmp, *args.overrides], capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results["variants"][variant] = json.loads(lines[-1][7:])
            print(variant, results["variants"][variant], flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
