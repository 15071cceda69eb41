"""How the dynamics transformer sees space: learned per-cell embeddings vs rotary rows/columns, at equal compute.

    OMP_NUM_THREADS=1 python benchmarks/bench_positions.py --steps 800 --out benchmarks/results/positions_cpu.json

The question (the flow-family issue, item 5): with a learned embedding per cell, the dynamics must learn every
camera shift separately at every cell; with rotary embeddings of row and column, attention depends on offsets
only, so one shift is one pattern. Does that predict frames better for the same pre-training compute?

Every variant gets the same thing: the shipped default model's frozen tokenizer (so token ids and the decoder are
identical), the pre-training recipe's 5,800 training episodes (`recipes/pretrain_tabletop.yaml`), the recipe's
dynamics shape and optimiser with a cosine schedule over `--steps`, the same seed, so the same clips in the same
order. Only `DynamicsConfig.positions` differs. Each is then scored on held-out validation seeds by `posttrain
eval`'s evaluation (posttrain/evaluate.py): deterministic one-step prediction (frame 1 PSNR / SSIM / object
presence) and `--horizon`-frame rollouts, greedy and at temperature 1, the same episodes and sampling seeds for
every variant; plus the held-out teacher-forced cross-entropy (the recipe's eval seeds).

This is a fixed, short budget (the shipped model had 5,000 dynamics steps at 2 threads): a difference here says
which bias learns faster, not where each ends. The JSON is rewritten after every variant, and variants already
in it are skipped, so several processes (one variant each) can share the work and a cut run keeps what it had.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flow_eval import compact  # noqa: E402


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def table(results: dict) -> str:
    """Markdown: one row per variant, held-out CE, one-step and rollout numbers, greedy and T=1."""
    lines = ["| positions | params | held-out CE | frame 1 PSNR / SSIM / objects (greedy) | greedy MSE / SSIM / objects "
             "| T=1 MSE / SSIM / objects | T=1 frame-1 objects |", "|---|---|---|---|---|---|---|"]
    for name, e in results.get("variants", {}).items():
        g, t = e["t0"], e["t1"]
        lines.append(f"| {name} | {e['parameters'] / 1e6:.2f} M | {e['teacher_forced_ce_held_out']:.3f} "
                     f"| {g['frame1_psnr_db']:.2f} dB / {g['frame1_ssim']:.3f} / {g['frame1_objects']:.3f} "
                     f"| {g['mse']:.4f} / {g['ssim']:.3f} / {g['objects']:.3f} "
                     f"| {t['mse']:.4f} / {t['ssim']:.3f} / {t['objects']:.3f} | {t['frame1_objects']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="learned,rotary,rotary+learned",
                        help="comma-separated DynamicsConfig.positions values, trained in this order")
    parser.add_argument("--steps", type=int, default=800, help="dynamics steps per variant (the same for all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipe", default="recipes/pretrain_tabletop.yaml")
    parser.add_argument("--model", default="default", help="whose frozen tokenizer every variant uses")
    parser.add_argument("--seeds", default="2000000:2000048", help="held-out validation episodes")
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--save", default="", help="folder to save each variant's model in ('' to skip)")
    parser.add_argument("--out", default="benchmarks/results/positions_cpu.json")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(load_json(Path(args.out))))
        return

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from posttrain.config import to_dict
    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.evaluate import EvalConfig, evaluate_model, mean_frame_for
    from posttrain.logging_utils import MetricsWriter
    from posttrain.models import TokenWorldModel, load_model, weights_hash
    from posttrain.models.dynamics import POSITIONS
    from posttrain.models.registry import resolve_model_path
    from posttrain.pretrain import encode_all, teacher_forced_loss, train_dynamics
    from posttrain.rollouts import EPISODE_FIELDS
    from posttrain.runner import build_config

    variants = args.variants.split(",")
    for variant in variants:
        if variant not in POSITIONS:
            parser.error(f"--variants: {variant!r} is not one of {', '.join(POSITIONS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = load_json(out)
    base = load_model(args.model).eval()
    _, config = build_config(args.recipe, [f"dynamics.steps={args.steps}"])
    for data in [config.data, *config.extra_data, config.eval_data]:
        data.cache_dir = args.cache_dir
    setup = {"recipe": args.recipe, "steps": args.steps, "batch_size": config.dynamics.batch_size,
             "clip_frames": config.dynamics.clip_frames, "lr": config.dynamics.lr, "seed": config.seed,
             "tokenizer_from": args.model, "shape": {k: v for k, v in vars(base.dynamics.config).items()
                                                     if k != "positions"},
             "held_out_seeds": args.seeds, "horizon": args.horizon, "threads": args.threads}
    if results and results.get("setup") != setup:
        raise SystemExit(f"{out} holds results of another setup ({results.get('setup')}); pick another --out")
    results.setdefault("setup", setup)
    results.setdefault("variants", {})
    todo = [v for v in variants if v not in results["variants"]]
    if not todo:
        print(f"every variant is already in {out}")
        return

    tokenizer = base.tokenizer
    started = time.time()
    # Encoding the 5,800 episodes takes ~9 minutes on one thread: with --save, the ids are kept beside the models
    # (keyed by the tokenizer's weights and the data sections) so later processes of the study skip it.
    key = json.dumps({"tokenizer": weights_hash(resolve_model_path(args.model)),
                      "data": [to_dict(d) for d in [config.data, *config.extra_data]]}, sort_keys=True)
    cached = Path(args.save) / "train_tokens.safetensors" if args.save else None
    if cached and cached.is_file() and (safe_open(str(cached), "pt").metadata() or {}).get("key") == key:
        stored = load_file(str(cached))
        tokens, actions = stored["tokens"].long(), stored["actions"].long()
    else:
        parts = [load_episodes(data, columns=("frames", "actions")) for data in [config.data, *config.extra_data]]
        with torch.no_grad():
            tokens = torch.cat([encode_all(tokenizer, part["frames"]) for part in parts])
        actions = torch.cat([part["actions"] for part in parts])
        del parts
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            save_file({"tokens": tokens.to(torch.int16), "actions": actions.to(torch.int16)}, str(partial),
                      metadata={"key": key})
            partial.replace(cached)
    held_tf = load_episodes(config.eval_data, columns=("frames", "actions"))
    with torch.no_grad():
        held_tf_tokens = encode_all(tokenizer, held_tf["frames"])
    eval_data = EpisodeDataConfig(seeds=args.seeds, frames=2 + args.horizon, cache_dir=args.cache_dir)
    episodes = load_episodes(eval_data, EPISODE_FIELDS)
    mean_frame, source = mean_frame_for(args.model, episodes)
    print(f"data: {tokens.shape[0]} training episodes encoded in {time.time() - started:.0f} s", flush=True)

    for variant in todo:
        dyn_cfg = config.dynamics
        dyn_cfg.model = dataclasses.replace(base.dynamics.config, positions=variant)
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        folder = Path(args.save) / variant.replace("+", "_") if args.save else None
        log = MetricsWriter(folder / "metrics.jsonl" if folder else "unused", enabled=folder is not None)
        train_started = time.time()
        dynamics = train_dynamics(tokens, actions, dyn_cfg, generator, log, log_every=50)
        train_seconds = time.time() - train_started
        model = TokenWorldModel(tokenizer.config, dynamics.config)
        model.tokenizer.load_state_dict(tokenizer.state_dict())
        model.dynamics.load_state_dict(dynamics.state_dict())
        model.eval()
        if folder:
            model.save_pretrained(folder / "model", metadata={"bench_positions": {"variant": variant, **setup}})
        with torch.no_grad():
            clip = min(dyn_cfg.clip_frames, held_tf_tokens.shape[1])
            ce = float(teacher_forced_loss(model.dynamics, held_tf_tokens[:, :clip], held_tf["actions"][:, :clip - 1]))
        entry = {"parameters": sum(p.numel() for p in dynamics.parameters()), "train_seconds": round(train_seconds),
                 "teacher_forced_ce_held_out": round(ce, 4)}
        for temperature in (0.0, 1.0):
            eval_config = EvalConfig(data=eval_data, num_context=2, horizon=args.horizon, temperature=temperature)
            report = evaluate_model(model, episodes, eval_config, description=f"{variant} T={temperature:g}",
                                    mean_frame=mean_frame, mean_frame_source=source)
            entry[f"t{temperature:g}"] = compact(report)
            entry[f"t{temperature:g}_per_step"] = {m: [round(v, 4) for v in report[f"{m}_per_step"]]
                                                   for m in ("mse", "ssim", "object_presence")}
            entry.setdefault("baselines", {b: {"ssim": round(r["ssim_mean"], 3), "mse": round(r["mse_mean"], 4)}
                                           for b, r in report["baselines"].items()})
        print(variant, json.dumps({k: v for k, v in entry.items() if not k.endswith("per_step")}), flush=True)
        results = load_json(out) or results  # another process may have added its variant meanwhile
        results.setdefault("setup", setup)
        results.setdefault("variants", {})[variant] = entry
        results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
