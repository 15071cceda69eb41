"""Bake-off: post-training methods on one wall-clock budget, judged on held-out and shifted scenes.

    python benchmarks/bench_methods.py --split val  --minutes 5 --out benchmarks/results/methods_val.json
    python benchmarks/bench_methods.py --split test --minutes 5 --out benchmarks/results/methods_test.json

Each method is a recipe in recipes/ run for `--minutes` of wall-clock training (`train.max_minutes`,
so every method gets the same CPU time, whatever its step cost), with LoRA on the same base. Every
result (and the base) is then rolled out 32 frames on the split's episodes, greedy and at
temperature 1, and scored with `posttrain eval`'s code: MSE, SSIM, object presence and the useful
horizon (steps whose SSIM beats both trivial baselines: persistence and the mean image). The
12-frame columns are the first 12 steps of the same rollouts (a rollout's first 12 frames do not
depend on how long it goes on). A second block repeats this on shifted scenes.

Choices (which variant of each method, its learning rate, ...) were made with `--split val`
(seeds 2000000+, 2100000+); the final table is `--split test` (seeds 3000000+, 3100000+), run once.
Run it alone on the machine: a method's step count depends on the CPU it gets.

Trying variants on the validation split (each is a method's recipe with extra overrides; the base's
evaluation can be taken from an earlier result file of the same split and model):

    python benchmarks/bench_methods.py --split val --methods dpo --variant "dpo_h24=dpo horizon=24 data.frames=26" \
        --base-from benchmarks/results/methods_val.json --out runs/methods_val_dpo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (recipe, overrides). The recipes hold the documented choices; overrides only shape the bake-off.
METHODS = {
    "grpo": ("recipes/grpo_tabletop.yaml", []),
    "grpo_branch": ("recipes/grpo_drift.yaml", []),
    "forcing": ("recipes/forcing_tabletop.yaml", []),
    "dpo": ("recipes/dpo_drift.yaml", []),
}
SEQUENCES = {
    # name -> stages (method, share of the budget): each stage post-trains the previous one's merged result,
    # as SFT then RL for language models (#13 item 4). The whole sequence gets the same minutes as a method.
    "forcing_then_grpo": (("forcing", 0.5), ("grpo_branch", 0.5)),
}
SPLITS = {
    "val": {"seeds": "2000000:2000032", "shifted_seeds": "2100000:2100024"},
    "test": {"seeds": "3000000:3000048", "shifted_seeds": "3100000:3100032"},
}
SHIFTS = {
    "more objects, small checkers": {"min_objects": 5, "max_objects": 6, "checker_size": 0.15},
    "meshes only, no walls": {"object_types": ["duck", "teddy"], "walls": False},
}
HORIZON, SHORT, CONTEXT = 32, 12, 2


def train(name: str, recipe: str, overrides: list[str], model: str, minutes: float, out: Path) -> dict:
    """Run one method's recipe for `minutes` in a subprocess; return its folder and timing."""
    command = [sys.executable, "-m", "posttrain", "run", str(ROOT / recipe), f"out={out}", f"model={model}",
               f"train.max_minutes={minutes}", "train.eval_at_end=false", "train.tensorboard=false",
               "steps=100000", *overrides]
    started = time.time()
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "POSTTRAIN_NO_PROGRESS": "1"})
    if process.returncode:
        print(f"{name}: `{' '.join(command)}` failed:\n{process.stderr[-3000:]}", flush=True)
        return {"recipe": recipe, "overrides": overrides, "failed": process.stderr[-500:]}
    from posttrain.logging_utils import read_metrics

    steps = [r for r in read_metrics(out / "metrics.jsonl") if "step" in r and "lr" in r]
    return {"recipe": recipe, "overrides": overrides, "steps": len(steps),
            "train_seconds": round(time.time() - started, 1)}


def train_sequence(name: str, stages, model: str, minutes: float, out: Path) -> dict:
    """Run a SEQUENCES entry: each stage for its share of `minutes`, the adapter of every stage but the last
    merged into a full model (`posttrain adapter export --merge`) that the next stage starts from. Returns
    the last stage's folder info plus `model`, the merged model its adapter applies to."""
    current, infos = model, []
    for i, (method, share) in enumerate(stages):
        stage_out = out / f"stage{i}-{method}"
        info = train(f"{name}/{method}", *METHODS[method], current, minutes * share, stage_out)
        infos.append(info)
        if "failed" in info:
            return {"stages": infos, "failed": info["failed"]}
        if i < len(stages) - 1:
            merged = out / f"stage{i}-merged"
            command = [sys.executable, "-m", "posttrain", "adapter", "export", str(stage_out), "--merge",
                       "--out", str(merged), "--overwrite"]
            process = subprocess.run(command, capture_output=True, text=True)
            if process.returncode:
                return {"stages": infos, "failed": process.stderr[-500:]}
            current = str(merged)
    return {"stages": infos, "model": current, "adapter_dir": str(stage_out / "adapter"),
            "steps": [i["steps"] for i in infos], "train_seconds": sum(i["train_seconds"] for i in infos)}


def summarise(report: dict, upto: int) -> dict:
    """Means over the first `upto` steps of a 32-step eval report, and the useful horizon within them."""
    def mean(values):
        values = [v for v in values[:upto] if v is not None]
        return round(sum(values) / len(values), 5) if values else None

    return {"mse": mean(report["mse_per_step"]), "ssim": mean(report["ssim_per_step"]),
            "objects": mean(report["object_presence_per_step"]), "useful_horizon": min(report["useful_horizon"], upto),
            "ssim_last8": mean(report["ssim_per_step"][upto - 8: upto]) if upto >= 8 else None}


def rollout_report(model_name: str, adapter: str | None, seeds: str, scene: dict, temperature: float, cache: str,
                   base_name: str | None = None) -> dict:
    """`posttrain eval`'s report of `model_name` (+ `adapter`) rolled out HORIZON frames from CONTEXT true ones on
    `seeds`; the mean-image baseline is the mean frame of `base_name` (default: model_name)."""
    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.evaluate import (
        EPISODE_FIELDS,
        EvalConfig,
        evaluate_model,
        load_with_adapter,
        mean_frame_for,
    )

    config = EvalConfig(data=EpisodeDataConfig(seeds=seeds, frames=CONTEXT + HORIZON, scene=scene, cache_dir=cache),
                        num_context=CONTEXT, horizon=HORIZON, temperature=temperature, batch_size=16)
    episodes = load_episodes(config.data, EPISODE_FIELDS, progress=False)
    model = load_with_adapter(model_name, adapter)
    mean_frame, source = mean_frame_for(base_name or model_name, episodes)
    return evaluate_model(model, episodes, config, progress=False, mean_frame=mean_frame, mean_frame_source=source)


def evaluate(model_name: str, adapter: str | None, seeds: str, scene: dict, temperature: float, cache: str,
             base_name: str | None = None) -> dict:
    """`model_name` (+ `adapter`) rolled out HORIZON frames on `seeds`; the mean-image baseline is the
    mean frame of `base_name` (default: model_name), so every entry of a bake-off shares one baseline."""
    report = rollout_report(model_name, adapter, seeds, scene, temperature, cache, base_name)
    return {"12": summarise(report, SHORT), "32": summarise(report, HORIZON),
            "per_step": {name: report[f"{name}_per_step"] for name in ("mse", "ssim", "object_presence")},
            "baselines": {name: {k: report["baselines"][name][f"{m}_mean"] for k, m in
                                 (("mse", "mse"), ("ssim", "ssim"), ("objects", "object_presence"))}
                          for name in ("persistence", "mean_image")}}


def table(results: dict, scene: str) -> str:
    """Markdown: one row per (model, temperature), columns at 12 and 32 frames, relative MSE vs the base."""
    lines = ["| model | T | 12f MSE | 12f SSIM | 12f objects | 12f horizon | 32f MSE | 32f SSIM | 32f SSIM last 8 | "
             "32f objects | 32f horizon |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for temperature in ("0.0", "1.0"):
        base = results["base"]["eval"][scene][temperature]
        for name, entry in results.items():
            row = entry["eval"][scene][temperature]
            cells = []
            for horizon in ("12", "32"):
                r, b = row[horizon], base[horizon]
                change = "" if name == "base" else f" ({100 * (r['mse'] / b['mse'] - 1):+.1f}%)"
                cells += [f"{r['mse']:.4f}{change}", f"{r['ssim']:.3f}", f"{r['objects']:.3f}"]
                if horizon == "32":
                    cells.insert(-1, f"{r['ssim_last8']:.3f}")
                cells.append(str(r["useful_horizon"]))
            lines.append(f"| {name} | {'greedy' if temperature == '0.0' else '1'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(results: dict, scene: str) -> str:
    """Markdown: one row per (method, temperature), training seeds pooled: a variant named NAME_sK is seed K of
    NAME. Each cell is the mean change against the base over the seeds with the (min..max) spread, at 12 and 32
    frames (MSE relative, SSIM and objects absolute)."""
    groups: dict[str, list] = {}
    for name, entry in results.items():
        if name != "base":
            stem, _, seed = name.rpartition("_s")
            groups.setdefault(stem if stem and seed.isdigit() else name, []).append(entry)
    lines = ["| method | T | seeds | 12f MSE | 12f SSIM | 12f objects | 32f MSE | 32f SSIM | 32f objects | 32f horizon |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for temperature in ("0.0", "1.0"):
        base = results["base"]["eval"][scene][temperature]
        label = "greedy" if temperature == "0.0" else "1"
        cells = [f"{base[h][m]:.4f}" if m == "mse" else f"{base[h][m]:.3f}" for h in ("12", "32")
                 for m in ("mse", "ssim", "objects")]
        lines.append(f"| base | {label} | | " + " | ".join(cells) + f" | {base['32']['useful_horizon']} |")
        for stem, entries in groups.items():
            rows = [e["eval"][scene][temperature] for e in entries]
            cells = []
            for horizon in ("12", "32"):
                for metric, fmt in (("mse", "{:+.1f}%"), ("ssim", "{:+.3f}"), ("objects", "{:+.3f}")):
                    ref = base[horizon][metric]
                    change = [100 * (r[horizon][metric] / ref - 1) if metric == "mse" else r[horizon][metric] - ref
                              for r in rows]
                    cells.append(f"{fmt.format(sum(change) / len(change))} "
                                 f"({fmt.format(min(change))}..{fmt.format(max(change))})")
            horizons = [r["32"]["useful_horizon"] for r in rows]
            lines.append(f"| {stem} | {label} | {len(rows)} | " + " | ".join(cells) + f" | {min(horizons)}..{max(horizons)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="val")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget per method")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join([*METHODS, *SEQUENCES]))
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", default="runs/bakeoff", help="folder for the methods' run folders")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--reuse", action="store_true", help="evaluate existing run folders instead of training")
    parser.add_argument("--variant", action="append", default=[], metavar='"NAME=METHOD KEY=VALUE ..."',
                        help="also run METHOD's recipe with these extra overrides, as NAME (repeatable)")
    parser.add_argument("--base-from", default=None, metavar="JSON",
                        help="take the base's evaluation from this earlier result file (same split and model)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds-table", action="store_true",
                        help="print --out's tables with training seeds pooled (variants NAME_sK) and stop")
    args = parser.parse_args()
    if args.seeds_table:
        report = json.loads(Path(args.out).read_text())
        for scene in report["scenes"]:
            print(f"\n### {scene} ({report['scenes'][scene]['seeds']})\n{seeds_table(report['results'], scene)}")
        return
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS and m not in SEQUENCES]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted([*METHODS, *SEQUENCES])}")
    methods = dict(METHODS)
    for variant in args.variant:
        head, *extra = shlex.split(variant)
        name, _, method = head.partition("=")
        if method not in METHODS or not name or name in methods:
            parser.error(f"--variant {variant!r}: expected a new NAME=METHOD (one of {sorted(METHODS)}) "
                         "followed by overrides")
        recipe, overrides = METHODS[method]
        methods[name] = (recipe, [*overrides, *extra])
        names.append(name)
    split = SPLITS[args.split]
    out_json = Path(args.out or f"benchmarks/results/methods_{args.split}.json")
    runs = Path(args.runs) / args.split
    scenes = {"default": ({}, split["seeds"]), **{k: (v, split["shifted_seeds"]) for k, v in SHIFTS.items()}}
    results: dict = {"base": {"adapter": None}}
    from posttrain.models import weights_hash
    from posttrain.models.registry import resolve_model_path

    # The name "default" outlives the weights behind it: results are tied to the weights' hash.
    model_sha = weights_hash(resolve_model_path(args.model))
    if args.base_from:
        earlier = json.loads(Path(args.base_from).read_text())
        mine = (args.split, args.model, HORIZON, model_sha)
        theirs = (earlier["split"], earlier["model"], earlier["horizon"], earlier.get("model_weights_sha256"))
        if theirs != mine:
            parser.error(f"--base-from {args.base_from}: it is split {theirs[0]!r}, model {theirs[1]!r}, horizon "
                         f"{theirs[2]}, weights sha256 {str(theirs[3])[:12]}; this run is {mine[0]!r}, {mine[1]!r}, "
                         f"{mine[2]}, {mine[3][:12]} (a file without the hash predates it: evaluate the base again)")
        results["base"] = {**earlier["results"]["base"], "eval_from": args.base_from}
    for name in names:
        out = runs / name
        if name in SEQUENCES and args.reuse:  # the last stage's adapter on the merged model before it
            stages = SEQUENCES[name]
            info = {"reused": True, "model": str(out / f"stage{len(stages) - 2}-merged"),
                    "adapter_dir": str(out / f"stage{len(stages) - 1}-{stages[-1][0]}" / "adapter")}
        elif name in SEQUENCES:
            info = train_sequence(name, SEQUENCES[name], args.model, args.minutes, out)
        else:
            info = {"reused": True} if args.reuse else train(name, *methods[name], args.model, args.minutes, out)
        print(f"{name}: {info}", flush=True)
        if "failed" not in info:
            results[name] = {"adapter": info.pop("adapter_dir", str(out / "adapter")), **info}
    for name, entry in results.items():
        if "eval_from" in entry:
            continue
        entry["eval"] = {}
        for scene, (settings, seeds) in scenes.items():
            entry["eval"][scene] = {str(t): evaluate(entry.get("model", args.model), entry["adapter"], seeds,
                                                     settings, t, args.cache_dir, base_name=args.model)
                                    for t in (0.0, 1.0)}
        print(f"evaluated {name}", flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
              "split": args.split, "minutes_per_method": args.minutes, "model": args.model,
              "model_weights_sha256": model_sha, "horizon": HORIZON,
              "scenes": {k: {"scene": v[0], "seeds": v[1]} for k, v in scenes.items()}, "results": results,
              "tables": {scene: table(results, scene) for scene in scenes}}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2))
    for scene, text in report["tables"].items():
        print(f"\n### {scene} ({scenes[scene][1]})\n{text}")
    print(f"-> {out_json}")


if __name__ == "__main__":
    main()
