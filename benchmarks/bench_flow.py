"""The flow-matching world model's costs beside the token model's, in one run; writes JSON.

    nice -n 5 python benchmarks/bench_flow.py --flow runs/pretrain-flow/model --out benchmarks/results/flow_cpu.json

Parts, in this order:
1. `space`: where to denoise. The same U-Net recipe in pixel space (3 x 64 x 64 states) and in the default
   tokenizer's latent (4 x 16 x 16): ms per denoiser call at batch 1 (what one play stream pays per sampling
   step), and ms per pre-training step of 112 noised frames (recipes/pretrain_flow_tabletop.yaml's 16 clips x 7
   targets) in fp32 and under bf16 autocast. The pixel model is narrower (pixels cost 16x the positions).
2. `play_step`: one stream, one thread, batch 1, what `posttrain play` runs per key: `rollout_step` and
   `rollout_step` + `decode`, greedy, for the default token model and the flow model (`--flow`, or an untrained
   model of the recipe's shape: speed does not depend on the weights).

Wall-clock numbers depend on the machine's load: the JSON records os.getloadavg() around each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_play's step_rates
RECIPE = ROOT / "recipes" / "pretrain_flow_tabletop.yaml"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def recipe_flow_config(**changes):
    from posttrain.config import load_recipe
    from posttrain.models.flow import FlowConfig

    section = load_recipe(RECIPE)["flow"]
    return FlowConfig(**{**section, **changes})


def recipe_model(space: str):
    """An untrained model of the recipe's shape in `space` (pixels: widths halved, 64x64 states)."""
    from posttrain.models import load_model
    from posttrain.models.flow import FlowWorldModel

    torch.manual_seed(0)
    if space == "latent":
        return FlowWorldModel.latent(load_model("default").tokenizer, recipe_flow_config()).eval()
    widths = [w // 2 for w in recipe_flow_config().block_out_channels]
    return FlowWorldModel(recipe_flow_config(space="pixels", block_out_channels=widths)).eval()


def denoiser_costs(model, train_rows: int, bf16_rows: int, repeats: int) -> dict:
    c = model.config.context_frames
    shape = model.state_shape
    params = sum(p.numel() for p in model.denoiser.parameters())
    out = {"state_shape": list(shape), "denoiser_parameters": params,
           "widths": list(model.config.block_out_channels)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x, ctx = torch.randn(1, *shape), torch.randn(1, c, *shape)
        t, a = torch.tensor([0.5]), torch.tensor([1])
        with torch.inference_mode():
            for _ in range(3):
                model.velocity(x, t, ctx, a)
            start = time.perf_counter()
            for _ in range(20):
                model.velocity(x, t, ctx, a)
        out[f"call_ms_batch1_threads{threads}"] = round((time.perf_counter() - start) / 20 * 1000, 2)
    torch.set_num_threads(2)
    model.train()
    optimizer = torch.optim.AdamW(model.denoiser.parameters(), lr=1e-4)
    for name, rows, bf16 in (("train_step_fp32", train_rows, False), ("train_step_bf16_autocast", bf16_rows, True)):
        x, ctx = torch.randn(rows, *shape), torch.randn(rows, c, *shape)
        t, a = torch.rand(rows), torch.randint(0, 9, (rows,))
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.velocity(x, t, ctx, a).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i:  # the first is warm-up
                times.append(time.perf_counter() - start)
        out[name] = {"rows": rows, "ms": round(sum(times) / len(times) * 1000, 1),
                     "ms_per_row": round(sum(times) / len(times) * 1000 / rows, 2)}
    model.eval()
    return out


def play_step(model, frames: int) -> dict:
    """bench_play's bare-model measurement, with the context encoded from random frames (either family)."""
    from bench_play import step_rates

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    size = model.image_size
    context = model.encode(torch.randint(0, 256, (1, 2, size, size, 3), generator=generator, dtype=torch.uint8))
    actions = torch.randint(1, 11, (frames + 8,), generator=generator)
    return {"threads": 1, "batch": 1, "frames": frames, **step_rates(model, context, actions, frames)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/flow_cpu.json")
    parser.add_argument("--flow", default=None, help="a flow model folder (default: untrained, the recipe's shape)")
    parser.add_argument("--frames", type=int, default=100, help="frames per play measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per setting")
    args = parser.parse_args()

    from posttrain.models import load_model

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "nice": os.nice(0)},
               "torch": torch.__version__, "flow": args.flow or "untrained, recipes/pretrain_flow_tabletop.yaml's shape",
               "loadavg_start": load(), "space": {}}
    for space, bf16_rows in (("latent", 32), ("pixels", 8)):
        results["space"][space] = denoiser_costs(recipe_model(space), 112, bf16_rows, args.repeats)
        results["space"][space]["loadavg_after"] = load()
        print(space, results["space"][space], flush=True)
    flow = load_model(args.flow).eval() if args.flow else recipe_model("latent")
    results["play_step"] = {"token_default": play_step(load_model("default").eval(), args.frames),
                            "flow": play_step(flow, args.frames),
                            "flow_sample_steps": flow.config.sample_steps}
    print("play", results["play_step"], flush=True)
    latent, pixels = results["space"]["latent"], results["space"]["pixels"]
    results["ratios"] = {
        "pixels_over_latent_call_ms": round(pixels["call_ms_batch1_threads1"] / latent["call_ms_batch1_threads1"], 2),
        "pixels_over_latent_train_ms_per_row": round(pixels["train_step_fp32"]["ms_per_row"]
                                                     / latent["train_step_fp32"]["ms_per_row"], 2),
        "latent_bf16_over_fp32_ms_per_row": round(latent["train_step_bf16_autocast"]["ms_per_row"]
                                                  / latent["train_step_fp32"]["ms_per_row"], 2),
    }
    results["targets"] = {"flow_play_frames_per_second_at_least_20":
                          results["play_step"]["flow"]["rollout_step+decode"]["frames_per_second"] >= 20}
    results["loadavg_end"] = load()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("->", args.out)


if __name__ == "__main__":
    main()
