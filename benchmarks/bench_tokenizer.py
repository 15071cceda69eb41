"""Tokenizer trade-off: token grid and FSQ levels -> reconstruction quality, rollout speed, GRPO update cost.

    python benchmarks/bench_tokenizer.py --out benchmarks/results/tokenizer_cpu.json [--steps 400]

Every variant trains a tokenizer for the same number of steps on the same envs3d frames (the
new base's recipe: object-weighted MSE, bf16 autocast, cosine schedule), then is scored on
held-out frames: PSNR, SSIM, and object presence (share of object-interior pixels within 0.2
RGB distance). Speed uses a dynamics transformer of the default model's shape for that grid
(untrained: speed does not depend on the weights): rollout frames/s (KV cache, batch 32) and the
time of one GRPO-sized update (score + backward on 32 rollouts of 2 + 12 frames, LoRA-free).
The old base's layout (8x8 grid, patch 1) is the baseline, measured in the same run. Short
training budgets rank the layouts; they do not give each layout's final quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

VARIANTS = {
    "8x8 grid, 1000 codes (old base)": dict(downsample=8, channels=(16, 32, 64, 128), levels=(8, 5, 5, 5), patch=1),
    "16x16 grid, 1000 codes, patch 2 (new base)": dict(downsample=4, channels=(32, 64, 128), levels=(8, 5, 5, 5),
                                                      patch=2, decoder_blocks=1),
    "16x16 grid, 240 codes, patch 2": dict(downsample=4, channels=(32, 64, 128), levels=(6, 5, 8), patch=2,
                                           decoder_blocks=1),
    "16x16 grid, 1000 codes, patch 1": dict(downsample=4, channels=(32, 64, 128), levels=(8, 5, 5, 5), patch=1,
                                            decoder_blocks=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/tokenizer_cpu.json")
    parser.add_argument("--steps", type=int, default=400, help="tokenizer training steps per variant")
    parser.add_argument("--train-seeds", default="0:200")
    parser.add_argument("--eval-seeds", default="900000:900016")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.models import DynamicsConfig, TokenizerConfig, TokenWorldModel
    from posttrain.pretrain import TokenizerTraining, tokenizer_report, train_tokenizer

    class _NoLog:
        def write(self, record):
            pass

    columns = ("frames", "segmentation")
    train = load_episodes(EpisodeDataConfig(seeds=args.train_seeds, cache_dir=args.cache_dir), columns)
    held = load_episodes(EpisodeDataConfig(seeds=args.eval_seeds, cache_dir=args.cache_dir), columns)
    frames = train["frames"].reshape(-1, 64, 64, 3)
    objects = (train["segmentation"] > 0).reshape(-1, 64, 64)
    results, trained = [], {}
    for name, variant in VARIANTS.items():
        tokenizer_config = TokenizerConfig(**{k: v for k, v in variant.items() if k != "patch"})
        key = json.dumps({k: v for k, v in variant.items() if k != "patch"}, sort_keys=True)
        if key not in trained:  # variants that differ only in the dynamics' patch share one tokenizer
            started = time.perf_counter()
            tokenizer = train_tokenizer(frames, TokenizerTraining(model=tokenizer_config, steps=args.steps, warmup=50),
                                        torch.Generator().manual_seed(0), _NoLog(), objects=objects)
            train_seconds = time.perf_counter() - started
            trained[key] = (tokenizer, train_seconds, tokenizer_report(tokenizer, held["frames"], held["segmentation"]))
        tokenizer, train_seconds, quality = trained[key]
        model = TokenWorldModel(tokenizer_config, DynamicsConfig(width=192, layers=4, heads=6, patch=variant["patch"]))
        model.tokenizer.load_state_dict(tokenizer.state_dict())
        model.eval()
        context = model.encode(held["frames"][:2, :2]).repeat(16, 1, 1)  # (32, 2, N)
        actions = torch.randint(0, 35, (32, 13), generator=torch.Generator().manual_seed(0))
        model.rollout(context, actions, 2, seeds=list(range(32)))  # warm-up
        started = time.perf_counter()
        out = model.rollout(context, actions, 12, seeds=list(range(32)))
        rollout_fps = 32 * 12 / (time.perf_counter() - started)
        tokens = torch.cat([context, out.tokens], 1)
        update_seconds = []
        for _ in range(2):
            started = time.perf_counter()
            for i in range(0, 32, 8):  # micro-batches of 8, as the main recipe
                model.score(tokens[i: i + 8], actions[i: i + 8], num_context=2).mean().backward()
            update_seconds.append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        results.append({"variant": name, **variant, "tokens_per_frame": tokenizer_config.tokens_per_frame,
                        "vocab_size": tokenizer_config.vocab_size, "train_steps": args.steps,
                        "train_seconds": round(train_seconds, 1), **quality,
                        "dynamics_parameters": sum(p.numel() for p in model.dynamics.parameters()),
                        "rollout_frames_per_second": round(rollout_fps, 1),
                        "update_seconds_32_rollouts": round(min(update_seconds), 3)})
        print(json.dumps(results[-1]), flush=True)
    report = {"benchmark": "tokenizer trade-off", "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "torch": torch.__version__, "train_seeds": args.train_seeds,
              "eval_seeds": args.eval_seeds, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
