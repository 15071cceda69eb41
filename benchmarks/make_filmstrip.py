"""Filmstrip PNG of held-out rollouts: the simulator's truth, the base and the post-trained model, greedy.

    python benchmarks/make_filmstrip.py --adapter runs/grpo_drift/adapter --seeds 3000000,3000001 \
        --out docs/images/main_job_filmstrip.png

For each seed, three rows (truth, base, post-trained; `--extra LABEL=MODEL` adds a row per model after the
truth) of every `--every`-th predicted frame of a `--horizon`
frame rollout from 2 true context frames, with the same sampling seed for base and post-trained (the same
seeds `posttrain eval` uses). Not a measurement: a picture of what the report's numbers mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--seeds", default="3000000,3000001")
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=MODEL",
                        help="another model's row, between the truth and the base (repeatable), e.g. an earlier base")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    extras = [tuple(item.split("=", 1)) for item in args.extra]
    if any(len(item) != 2 or not all(item) for item in extras):
        parser.error(f"--extra takes LABEL=MODEL, got {args.extra}")
    from PIL import Image

    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.evaluate import EvalConfig, load_with_adapter
    from posttrain.rollouts import EPISODE_FIELDS, generate, rollout_seed

    context = 2
    EVAL_SEED = EvalConfig().seed  # noqa: N806 - the rollout seeds `posttrain eval` uses
    seeds = [int(s) for s in args.seeds.split(",")]
    data = EpisodeDataConfig(seeds=",".join(map(str, seeds)), frames=context + args.horizon, cache_dir=args.cache_dir)
    episodes = load_episodes(data, EPISODE_FIELDS, progress=False)
    frames = episodes["frames"]  # (E, T, H, W, 3) uint8
    actions = episodes["actions"][:, : context + args.horizon - 1]
    picks = list(range(args.every - 1, args.horizon, args.every))
    rows = {"truth": frames[:, context:][:, picks].numpy()}
    models = [(label, model, None) for label, model in extras]
    models += [("base", args.model, None), ("post-trained", args.model, args.adapter)]
    for name, model_name, adapter in models:
        model = load_with_adapter(model_name, adapter)
        with torch.no_grad():
            out = generate(model, model.encode(frames[:, :context]), actions, args.horizon,
                           [rollout_seed(EVAL_SEED, int(s)) for s in episodes["seed"]], temperature=args.temperature,
                           chunk=len(seeds))
        rows[name] = (out.frames[:, picks].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    gap = 3
    blocks = []
    for i in range(len(seeds)):
        for name in rows:
            strip = np.concatenate([np.pad(f, ((0, 0), (0, gap), (0, 0)), constant_values=255) for f in rows[name][i]], 1)
            blocks.append(np.pad(strip, ((0, gap), (0, 0), (0, 0)), constant_values=255))
        blocks.append(np.full((3 * gap, blocks[-1].shape[1], 3), 255, np.uint8))
    image = np.concatenate(blocks[:-1], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"{args.out}: rows per seed = {', '.join(rows)}; frames {[p + 1 for p in picks]}")


if __name__ == "__main__":
    main()
