"""bf16 autocast vs fp32 for the pre-training steps on this CPU: what `bf16: auto` decides from.

    python benchmarks/bench_bf16.py --out benchmarks/results/bf16_cpu.json

Times one training step (forward, backward, optimiser) of the default recipe's tokenizer (batch of 64x64 frames)
and dynamics (width 256, 4 layers, patch 2, 8-frame clips of 16x16 tokens), each in fp32 and under bf16
autocast, in this one process: a warm-up step, then the median of `--steps`. Records the CPU's flags that
matter (avx2, avx512f, avx512_bf16, amx_bf16) and what `posttrain.pretrain.native_bf16` says. Batches are
smaller than the recipe's (`--batch`) so the emulated-bf16 case finishes: the ratio is what matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    import torch

    from posttrain.models import DynamicsConfig, DynamicsTransformer, FrameTokenizer, TokenizerConfig
    from posttrain.pretrain import cpu_flags, native_bf16, teacher_forced_loss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="clips (dynamics) and frames x 8 (tokenizer) per step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/bf16_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = cpu_flags()

    def tokenizer_step(bf16: bool):
        model = FrameTokenizer(TokenizerConfig(image_size=64, downsample=4, channels=(32, 64, 128),
                                               levels=(8, 5, 5, 5), decoder_blocks=1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        frames = torch.randint(0, 256, (8 * args.batch, 64, 64, 3), dtype=torch.uint8)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                recon, _ = model(frames)
            loss = ((recon.float() - frames.float() / 255) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def dynamics_step(bf16: bool):
        model = DynamicsTransformer(DynamicsConfig(vocab_size=1000, tokens_per_frame=256, width=256, layers=4,
                                                   heads=8, patch=2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 1000, (args.batch, 8, 256))
        actions = torch.randint(0, 35, (args.batch, 7))

        def step():
            loss = teacher_forced_loss(model, tokens, actions, bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    rows = {}
    for name, make in (("tokenizer", tokenizer_step), ("dynamics", dynamics_step)):
        for bf16 in (False, True):
            step = make(bf16)
            step()  # warm-up: first-call kernel selection
            times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
            rows[f"{name}/{'bf16' if bf16 else 'fp32'}"] = {"step_seconds_median": round(statistics.median(times), 3),
                                                            "step_seconds_all": [round(t, 3) for t in times]}
            print(name, "bf16" if bf16 else "fp32", rows[f"{name}/{'bf16' if bf16 else 'fp32'}"], flush=True)
        rows[f"{name}/bf16_over_fp32"] = round(rows[f"{name}/bf16"]["step_seconds_median"]
                                               / rows[f"{name}/fp32"]["step_seconds_median"], 2)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load": list(os.getloadavg()),
                          "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})},
              "native_bf16": native_bf16(), "threads": args.threads, "batch": args.batch, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in rows.items() if k.endswith("over_fp32")}), "->", args.out)


if __name__ == "__main__":
    main()
