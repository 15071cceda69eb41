"""Does a method's gain grow with its training budget? One run, evaluated at several step counts.

    python benchmarks/bench_budget_scaling.py --method grpo_branch --steps 14,28,56,112 \
        --out benchmarks/results/budget_scaling_val.json
    python benchmarks/bench_budget_scaling.py --method grpo_branch --name grpo_branch_lr1e-4 --steps 28,56,84 \
        --base-from benchmarks/results/budget_scaling_val.json --out benchmarks/results/budget_scaling_val_lr1e-4.json \
        train.lr=1e-4

The bake-off gives every method 4 minutes on this CPU (13-14 steps of the main job on v4). Whether the
-25% targets of the drift issue are a matter of compute or of method is a question this answers: the
method's recipe (`bench_methods.METHODS`) is run to the first step count, its adapter copied aside, then
the same run is resumed (`--resume steps=N`; resume == unbroken run, tested) to the next count, and so on.
Post-training runs use a constant learning rate, so the adapter at step N of the long run is the adapter a
run of N steps would give. Every adapter (and the base) is scored exactly as in the bake-off: 32 frames,
greedy and temperature 1, default and shifted scenes, MSE / SSIM / object presence / useful horizon.

The step counts, not wall-clock, set the budget, so the result does not depend on what else the CPU did;
`train_seconds` is recorded beside each point for scale. Validation seeds by default (a study, not a
final table). The JSON is rewritten after every point, so a run cut short keeps what it measured, and a rerun
with more step counts (same name, recipe and overrides) keeps the points already in it and resumes the run from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import METHODS, SHIFTS, SPLITS, evaluate, table  # noqa: E402


def run_to(recipe: str, overrides: list[str], model: str, out: Path, steps: int, resume: bool) -> float:
    """Train (or resume) `recipe` in a subprocess until `steps`; return the seconds it took."""
    command = [sys.executable, "-m", "posttrain", "run", recipe, *(["--resume"] if resume else []), f"out={out}",
               f"model={model}", f"steps={steps}", "train.eval_at_end=false", "train.tensorboard=false", *overrides]
    started = time.time()
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "POSTTRAIN_NO_PROGRESS": "1"})
    if process.returncode:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    return round(time.time() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="grpo_branch", choices=sorted(METHODS))
    parser.add_argument("--name", default=None, help="name of this variant (run folder, result keys); "
                                                      "default: the method's name")
    parser.add_argument("--steps", default="14,28,56,112", help="increasing step counts to evaluate at")
    parser.add_argument("--split", choices=sorted(SPLITS), default="val")
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", default="runs/budget_scaling", help="folder for the run and adapter copies")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results/budget_scaling_val.json")
    parser.add_argument("--base-from", default=None, metavar="JSON",
                        help="take the base's evaluation from an earlier result file of this script or of "
                             "bench_methods.py (same split, model weights and scenes)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides (KEY=VALUE)")
    args = parser.parse_args()
    try:
        counts = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps {args.steps!r}: expected comma-separated integers")
    if not counts or counts != sorted(set(counts)) or counts[0] < 1:
        parser.error(f"--steps {args.steps!r}: expected increasing positive integers")

    from posttrain.models import weights_hash
    from posttrain.models.registry import resolve_model_path

    root = Path(__file__).resolve().parent.parent
    recipe, overrides = METHODS[args.method]
    recipe, overrides = str(root / recipe), [*overrides, *args.overrides]
    split = SPLITS[args.split]
    scenes = {"default": ({}, split["seeds"]), **{k: (v, split["shifted_seeds"]) for k, v in SHIFTS.items()}}
    name = args.name or args.method
    runs = Path(args.runs) / args.split / name
    run_dir = runs / "run"
    out_json = Path(args.out)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "split": args.split,
              "method": args.method, "name": name, "recipe": recipe, "overrides": overrides, "model": args.model,
              "model_weights_sha256": weights_hash(resolve_model_path(args.model)), "horizon": 32,
              "scenes": {k: {"scene": v[0], "seeds": v[1]} for k, v in scenes.items()}, "results": {}}

    def score(adapter: str | None) -> dict:
        return {scene: {str(t): evaluate(args.model, adapter, seeds, settings, t, args.cache_dir)
                        for t in (0.0, 1.0)} for scene, (settings, seeds) in scenes.items()}

    def write() -> None:
        report["tables"] = {scene: table(report["results"], scene) for scene in scenes} if "base" in report[
            "results"] else {}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2))

    if args.base_from:
        earlier = json.loads(Path(args.base_from).read_text())
        mine = (args.split, report["model_weights_sha256"], report["scenes"])
        theirs = (earlier.get("split"), earlier.get("model_weights_sha256"), earlier.get("scenes"))
        if theirs != mine:
            parser.error(f"--base-from {args.base_from}: its split, model weights or scenes differ from this run's")
        report["results"]["base"] = {**earlier["results"]["base"], "eval_from": args.base_from}
    else:
        report["results"]["base"] = {"adapter": None, "eval": score(None)}
    done = {}
    if out_json.is_file():  # a longer study of the same run: keep the points measured, resume the run from there
        earlier = json.loads(out_json.read_text())
        if (earlier.get("name"), earlier.get("recipe"), earlier.get("overrides"), earlier.get("scenes"),
                earlier.get("model_weights_sha256")) == (name, recipe, overrides, report["scenes"],
                                                         report["model_weights_sha256"]):
            done = {k: v for k, v in earlier["results"].items() if k != "base" and Path(v["adapter"]).is_dir()}
            report["results"].update(done)
    write()
    print(f"base: {'from ' + args.base_from if args.base_from else 'evaluated'}", flush=True)
    seconds, trained = 0.0, False
    for steps in counts:
        if f"{name}@{steps}" in done:
            seconds = done[f"{name}@{steps}"]["train_seconds"]
            trained = True
            print(f"{name}@{steps}: kept from {out_json}", flush=True)
            continue
        seconds += run_to(recipe, overrides, args.model, run_dir, steps, resume=trained)
        trained = True
        adapter = runs / f"adapter-step{steps}"
        if adapter.exists():
            shutil.rmtree(adapter)
        shutil.copytree(run_dir / "adapter", adapter)
        report["results"][f"{name}@{steps}"] = {"adapter": str(adapter), "steps": steps,
                                                       "train_seconds": round(seconds, 1),
                                                       "eval": score(str(adapter))}
        write()
        print(f"{name}@{steps}: trained {seconds:.0f} s, evaluated", flush=True)
    for scene, text in report["tables"].items():
        print(f"\n### {scene} ({scenes[scene][1]})\n{text}")
    print(f"-> {out_json}")


if __name__ == "__main__":
    main()
