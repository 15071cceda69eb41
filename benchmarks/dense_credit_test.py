"""The dense-credit bake-off's final table: adapters trained by bench_dense_credit.py, scored once on the test
split and both shifted scene sets, with per-step SSIM and object presence (issue 25's targets).

    python benchmarks/dense_credit_test.py --runs runs/dense_credit --settings frame,dense_obj --seeds 0,1,2 \\
        --out benchmarks/results/dense_credit_test.json
    python benchmarks/dense_credit_test.py --out benchmarks/results/dense_credit_test.json --table
    python benchmarks/dense_credit_test.py --model flow --runs runs/flow_methods --settings grpo_branch,nft \
        --seeds 0,1 --out benchmarks/results/flow_methods_test.json        # adapters of the flow model

Nothing is trained here: each `RUNS/SETTING/seedK/adapter` (the validation bake-off's run folders) and the
base are rolled out 32 frames from 2 true ones, greedy and at T = 1, on the test seeds (3000000+) and on
the two shifted sets (3100000+), with `posttrain eval`'s code. Results are saved after every evaluation, and
a rerun skips what the JSON holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_methods import CONTEXT, HORIZON, SHIFTS, SPLITS, rollout_report  # noqa: E402

SCENES = {"default": ({}, SPLITS["test"]["seeds"]),
          **{name: (scene, SPLITS["test"]["shifted_seeds"]) for name, scene in SHIFTS.items()}}
TEMPERATURES = (0.0, 1.0)


def evaluate(adapter: str | None, seeds: str, scene: dict, temperature: float, cache: str,
             model: str = "default") -> dict:
    """Per-step and mean MSE, SSIM, object presence of `model` (+ adapter), with the baselines."""
    report = rollout_report(model, adapter, seeds, scene, temperature, cache)
    keep = ("mse_per_step", "ssim_per_step", "object_presence_per_step", "mse_mean", "ssim_mean",
            "object_presence_mean", "useful_horizon")
    return {**{k: report[k] for k in keep},
            "baselines": {name: {k: report["baselines"][name][k] for k in keep if k in report["baselines"][name]}
                          for name in ("persistence", "mean_image")}}


def _mean(values: list, upto: int) -> float:
    finite = [v for v in values[:upto] if v is not None]
    return sum(finite) / len(finite)


def table(data: dict) -> str:
    """Markdown per scene and temperature: the base, then each setting's mean over seeds with (min..max), at 12
    and 32 frames; the last columns count the steps 4..32 whose SSIM is above the base's."""
    results = data["results"]
    base = results["base"]
    names = sorted({key.split("/")[0] for key in results if key != "base"})
    lines = []
    for scene in SCENES:
        for temperature in map(str, TEMPERATURES):
            b = base[scene][temperature]
            lines += [f"\n{scene}, {'greedy' if temperature == '0.0' else 'T = 1'}:\n",
                      "| model | seeds | 32f MSE | 32f SSIM | 32f objects | 12f MSE | 12f SSIM | 12f objects | "
                      "SSIM > base, steps 4-32 | horizon |", "|---|---|---|---|---|---|---|---|---|---|"]
            lines.append(f"| base | | {_mean(b['mse_per_step'], 32):.4f} | {_mean(b['ssim_per_step'], 32):.3f} | "
                         f"{_mean(b['object_presence_per_step'], 32):.3f} | {_mean(b['mse_per_step'], 12):.4f} | "
                         f"{_mean(b['ssim_per_step'], 12):.3f} | {_mean(b['object_presence_per_step'], 12):.3f} | | "
                         f"{b['useful_horizon']} |")
            for name in names:
                runs = [v[scene][temperature] for k, v in results.items() if k.split("/")[0] == name
                        and scene in v and temperature in v[scene]]
                if not runs:
                    continue
                cells = []
                for upto in (32, 12):
                    for metric, fmt in (("mse", "{:+.1f}%"), ("ssim", "{:+.3f}"), ("object_presence", "{:+.0f}%")):
                        ref = _mean(b[f"{metric}_per_step"], upto)
                        values = [_mean(r[f"{metric}_per_step"], upto) for r in runs]
                        change = [100 * (v / ref - 1) if metric != "ssim" else v - ref for v in values]
                        cells.append(f"{fmt.format(sum(change) / len(change))} "
                                     f"({fmt.format(min(change))}..{fmt.format(max(change))})")
                above = [sum(r["ssim_per_step"][s] > b["ssim_per_step"][s] for s in range(3, 32)) for r in runs]
                horizons = [r["useful_horizon"] for r in runs]
                lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells)
                             + f" | {min(above)}..{max(above)} of 29 | {min(horizons)}..{max(horizons)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/dense_credit")
    parser.add_argument("--settings", default="frame,dense_obj")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--model", default="default", help="the base the adapters were trained on (e.g. flow)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    data = json.loads(out.read_text()) if out.is_file() else {"results": {}, "seconds": {}}
    if data.get("model", args.model) != args.model:
        parser.error(f"{out} holds results of model {data['model']!r}, not {args.model!r}")
    data.update(machine=platform.processor() or platform.machine(), model=args.model,
                scenes={name: {"scene": s, "seeds": seeds} for name, (s, seeds) in SCENES.items()},
                horizon=HORIZON, context=CONTEXT)
    jobs = [("base", None)] + [(f"{name}/seed{seed}", str(Path(args.runs) / name / f"seed{seed}" / "adapter"))
                               for name in args.settings.split(",") for seed in args.seeds.split(",")]
    for key, adapter in jobs:
        if adapter is not None and not (Path(adapter) / "adapter_model.safetensors").is_file():
            print(f"skip {key}: no adapter at {adapter}", flush=True)
            continue
        entry = data["results"].setdefault(key, {})
        for scene, (settings, seeds) in SCENES.items():
            for temperature in TEMPERATURES:
                if str(temperature) in entry.get(scene, {}):
                    continue
                started = time.time()
                entry.setdefault(scene, {})[str(temperature)] = evaluate(adapter, seeds, settings, temperature,
                                                                          args.cache_dir, args.model)
                data["seconds"][f"{key}/{scene}/{temperature}"] = round(time.time() - started, 1)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1))
        print(key, "done", flush=True)
    print(table(data))


if __name__ == "__main__":
    main()
