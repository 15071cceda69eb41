"""Dense vs frame credit on the main job's recipe: several training seeds, held-out and shifted scenes.

    python benchmarks/bench_dense_credit.py --steps 12 --train-seeds 0,1 --out benchmarks/results/dense_credit_val.json

Each setting is recipes/grpo_drift.yaml with the overrides below (and `--shape`, the main job's size), trained
for the same number of steps from the same base with each training seed, then rolled out 32 frames greedy
and at T = 1 on the validation split's default and shifted scenes and scored with `posttrain eval`'s code
(bench_methods.evaluate: MSE, SSIM, object presence, useful horizon). A step of dense credit costs what a
step of frame credit does (measured here: 47-54 s vs 49-55 s at the main job's old size), so equal steps
are equal wall-clock within that spread; each run's training seconds are recorded. The JSON has every
run, and per setting the mean and the spread (min, max) over training seeds. Run it alone on the machine.
`--model` starts every setting from another base (a name or a model folder); `--shift` picks the shifted
sets (repeatable). A second call with the same `--out` keeps every finished run and scores runs and base on
scenes they have not seen yet, so a shifted set can be added later without training again.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_methods import SHIFTS, SPLITS, evaluate, train  # noqa: E402

RECIPE = "recipes/grpo_drift.yaml"
FRAME = ["credit=frame", "rewards=[{name: neg_mse, weight: 10.0}, {name: ssim, weight: 1.0}, "
                         "{name: object_presence, weight: 1.0}]"]  # the main job before 2026-12-02 (2nd session)
DENSE = ["credit=dense", "dense.patch_return=flow"]
SETTINGS = {
    "frame": FRAME,
    "dense_flow": [*DENSE, "rewards=[{name: near_hit, weight: 1.0}, {name: ssim, weight: 1.0}]"],
    **{name: [*DENSE, "rewards=[{name: near_hit, weight: 1.0}, {name: ssim, weight: 1.0}, "
                      f"{{name: object_presence, weight: {weight}}}]"]
       for name, weight in (("dense_obj", 1.0), ("dense_obj_half", 0.5), ("dense_obj2", 2.0))},
}
"""Each setting's overrides of recipes/grpo_drift.yaml. `dense_obj` is the main job's own recipe since the
2026-12-02 (second session) bake-off; `frame` restores the one before it."""


def table(data: dict) -> str:
    """Markdown: per scene and temperature, the base and each setting's mean over training seeds with the
    (min..max) spread, at 12 and 32 frames; changes are relative to the base."""
    results = data["results"]
    base = results["base"]["eval"]
    names = sorted({key.split("/")[0] for key in results if key != "base"})
    lines = []
    for scene in base:
        for temperature in ("0.0", "1.0"):
            lines += [f"\n{scene}, {'greedy' if temperature == '0.0' else 'T = 1'}:\n",
                      "| model | seeds | 32f MSE | 32f SSIM | 32f objects | 12f MSE | 12f SSIM | 12f objects | horizon |",
                      "|---|---|---|---|---|---|---|---|---|"]
            b = base[scene][temperature]
            lines.append(f"| base | | {b['32']['mse']:.4f} | {b['32']['ssim']:.3f} | {b['32']['objects']:.3f} | "
                         f"{b['12']['mse']:.4f} | {b['12']['ssim']:.3f} | {b['12']['objects']:.3f} | "
                         f"{b['32']['useful_horizon']} |")
            for name in names:
                runs = [v for k, v in results.items() if k.split("/")[0] == name and scene in v.get("eval", {})]
                if not runs:
                    continue
                cells = []
                for horizon in ("32", "12"):
                    for metric, fmt in (("mse", "{:+.1f}%"), ("ssim", "{:+.3f}"), ("objects", "{:+.3f}")):
                        ref = b[horizon][metric]
                        values = [r["eval"][scene][temperature][horizon][metric] for r in runs]
                        change = [(100 * (v / ref - 1)) if metric == "mse" else v - ref for v in values]
                        mean = sum(change) / len(change)
                        cells.append(f"{fmt.format(mean)} ({fmt.format(min(change))}..{fmt.format(max(change))})")
                horizons = [r["eval"][scene][temperature]["32"]["useful_horizon"] for r in runs]
                lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {min(horizons)}..{max(horizons)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--train-seeds", default="0,1")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--setting", action="append", default=[], metavar='"NAME=KEY=VALUE ..."',
                        help="an extra setting: NAME then its overrides of the recipe (repeatable)")
    parser.add_argument("--shape", default="", help="overrides applied to every setting (the job's size)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="val")
    parser.add_argument("--shift", action="append", choices=sorted(SHIFTS),
                        help="a shifted scene set evaluated (repeatable; default: more objects, small checkers)")
    parser.add_argument("--model", default="default", help="the base every setting starts from (name or folder)")
    parser.add_argument("--runs", default="runs/dense_credit")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    settings = {name: SETTINGS[name] for name in args.settings.split(",") if name}
    for extra in args.setting:
        name, *overrides = shlex.split(extra)
        settings[name] = overrides
    shape = shlex.split(args.shape)
    seeds = [int(s) for s in args.train_seeds.split(",")]
    split = SPLITS[args.split]
    shifts = args.shift or ["more objects, small checkers"]
    scenes = {"default": ({}, split["seeds"]), **{name: (SHIFTS[name], split["shifted_seeds"]) for name in shifts}}
    out_path = Path(args.out)
    earlier = json.loads(out_path.read_text()) if out_path.is_file() else {}  # resume: keep every run
    results = earlier.get("results", {})
    settings_run = {**earlier.get("settings", {}), **settings}  # every run's overrides, this call's and earlier ones

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "steps": args.steps,
                                        "model": args.model, "shape": shape, "settings": settings_run,
                                        "scenes": {**earlier.get("scenes", {}), **{k: v[1] for k, v in scenes.items()}},
                                        "results": results}, indent=1))

    def scored(run=None, done=()):
        """The base (no run), or a run's LoRA adapter on it, or a full fine-tune's model (lora.enabled=false),
        on every scene not in `done`; the mean-image baseline is always the base's."""
        model, adapter = args.model, None
        if run is not None and (run / "adapter").is_dir():
            adapter = str(run / "adapter")
        elif run is not None:
            model = str(run / "model")
        return {scene: {str(t): evaluate(model, adapter, seeds_, settings_, t, args.cache_dir, base_name=args.model)
                        for t in (0.0, 1.0)} for scene, (settings_, seeds_) in scenes.items() if scene not in done}

    if earlier and earlier.get("model", "default") != args.model:
        raise SystemExit(f"{out_path} holds runs from the base {earlier.get('model', 'default')!r}, not {args.model!r}")
    results.setdefault("base", {"eval": {}})
    if set(scenes) - set(results["base"]["eval"]):  # the base on every scene asked for (a new --shift adds one)
        started = time.time()
        results["base"]["eval"].update(scored(done=results["base"]["eval"]))
        results["base"]["eval_seconds"] = round(time.time() - started, 1)
        save()
    for name, overrides in settings.items():
        for seed in seeds:
            key = f"{name}/seed{seed}"
            if key in results and "eval" in results[key] and set(scenes) - set(results[key]["eval"]):
                results[key]["eval"].update(scored(Path(args.runs) / name / f"seed{seed}", done=results[key]["eval"]))
                save()  # an earlier run scored on a scene it had not been
            if key in results:
                continue
            run = Path(args.runs) / name / f"seed{seed}"
            info = train(key, RECIPE, [*shape, *overrides, f"seed={seed}", f"steps={args.steps}",
                                       "train.max_minutes=0"], args.model, 0, run)
            if "failed" in info:
                results[key] = info
                save()
                continue
            started = time.time()
            info["eval"] = scored(run)
            info["eval_seconds"] = round(time.time() - started, 1)
            results[key] = info
            save()
            print(key, json.dumps({s: {t: v["32"] for t, v in e.items()} for s, e in info["eval"].items()}), flush=True)
    save()
    print(table(json.loads(out_path.read_text())))


if __name__ == "__main__":
    main()
