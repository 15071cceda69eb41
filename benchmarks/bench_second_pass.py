"""Does a second decoding pass within each frame help the default model? (#11's "within-frame iterative decoding")

    python benchmarks/bench_second_pass.py --out benchmarks/results/second_pass_cpu.json   # ~12 min on 2 cores

The dynamics predicts all 256 tokens of the next frame in parallel, each independent of the others given the
context. This experiment adds a second pass: the tokens of one checkerboard colour ("A", sub-tokens 0 and 3 of
every 2x2 position) are decoded first by the model as it is; a one-layer transformer over the frame's positions
("refiner") then predicts the other colour ("B") from the same hidden states plus the A tokens drawn. Log-probs
stay exact (p(frame) = p(A | context) p(B | context, A)). The refiner starts as the parallel decoder (identity
input, silent residual branch, the main head's B rows), so any change is learned, and it trains with the base
frozen, teacher-forced on the pre-training recipe's data and clip sampler. Reported, in the same run: the
teacher-forced cross-entropy of the B tokens with and without it, and 16-frame rollouts from 2 true frames on
held-out seeds, greedy and at T = 1 (same sampling generator seed), base vs base + refiner.
This is a measurement of a lever, not a shipped feature: the toolkit's decoding is unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time


def main() -> None:
    import torch
    import torch.nn.functional as F
    import yaml
    from torch import nn

    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.models import load_model
    from posttrain.models.dynamics import Block
    from posttrain.models.registry import resolve_model_path
    from posttrain.models.world_model import weights_hash
    from posttrain.pretrain import encode_all, sample_clips
    from posttrain.rewards import metrics as M

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--recipe", default="recipes/pretrain_tabletop.yaml", help="its data sections are the training data")
    parser.add_argument("--eval-seeds", default="2000000:2000048")
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/second_pass_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model("default").eval()
    model.requires_grad_(False)
    dyn = model.dynamics
    cfg = dyn.config
    vocab, width = cfg.vocab_size, cfg.width
    if cfg.patch != 2:
        raise SystemExit("the checkerboard split below assumes patch 2 (sub-tokens 0, 3 = A; 1, 2 = B)")
    first, second = [0, 3], [1, 2]

    class Refiner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(width, width)
            self.embed = nn.Embedding(vocab * 2, width)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(args.layers))
            self.head = nn.Linear(width, vocab * 2)
            self.register_buffer("offset", torch.tensor([0, vocab]), persistent=False)
            with torch.no_grad():  # start as the parallel decoder
                self.inp.weight.copy_(torch.eye(width))
                self.inp.bias.zero_()
                self.embed.weight.zero_()
                for block in self.blocks:
                    block.attn.o_proj.weight.zero_()
                    block.fc2.weight.zero_()
                self.head.weight.copy_(dyn.head.weight.unflatten(0, (4, vocab))[second].flatten(0, 1))
                self.head.bias.copy_(dyn.head.bias.unflatten(0, (4, vocab))[second].flatten(0, 1))

        def forward(self, hidden, frame_tokens):
            """hidden (..., P, D) predicting a frame; frame_tokens (..., N) its tokens (A used) -> B logits (..., P, 2, V)."""
            lead, positions = hidden.shape[:-2], hidden.shape[-2]
            a = dyn.patchify(frame_tokens)[..., first] + self.offset
            x = (self.inp(hidden) + self.embed(a).sum(-2)).reshape(-1, positions, width)
            cos = torch.ones(positions, width // cfg.heads // 2)  # no rotation: space is in the hidden states
            for block in self.blocks:
                x, _ = block(x, cos, torch.zeros_like(cos))
            return self.head(x).reshape(*lead, positions, 2, vocab)

    refiner = Refiner()
    recipe = yaml.safe_load(open(args.recipe))
    parts = [load_episodes(EpisodeDataConfig(**d), columns=("frames", "actions"))
             for d in [recipe["data"], *recipe.get("extra_data", [])]]
    actions = torch.cat([p["actions"] for p in parts])
    tokens = encode_all(model.tokenizer, torch.cat([p.pop("frames") for p in parts]))
    del parts
    steps = args.steps
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(0)
    curve, started = [], time.time()
    for step in range(steps):
        clip_tokens, clip_actions = sample_clips(tokens, actions, 16, 8, generator)
        target = dyn.patchify(clip_tokens[:, 1:])[..., second]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                hidden = dyn(clip_tokens[:, :-1], clip_actions)
                base_logits = dyn.head(hidden).unflatten(-1, (4, vocab))[..., second, :]
            logits = refiner(hidden, clip_tokens[:, 1:])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), target.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(refiner.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        base = F.cross_entropy(base_logits.float().reshape(-1, vocab), target.reshape(-1)).item()
        curve.append((loss.item(), base))
        if step % 100 == 0 or step == steps - 1:
            last = curve[-100:]
            print(f"step {step}: B-token CE refiner {sum(c[0] for c in last) / len(last):.3f} vs base "
                  f"{sum(c[1] for c in last) / len(last):.3f} ({time.time() - started:.0f} s)", flush=True)
    train_seconds = time.time() - started

    horizon = args.horizon
    episodes = load_episodes(EpisodeDataConfig(seeds=args.eval_seeds, frames=2 + horizon),
                             ("frames", "actions", "segmentation"))
    frames, eval_actions = episodes["frames"], episodes["actions"]
    truth = frames[:, 2:].float() / 255
    segmentation = episodes["segmentation"][:, 2:]
    is_first = dyn.unpatchify(torch.tensor([1, 0, 0, 1], dtype=torch.bool)[None, :, None].expand(cfg.positions_per_frame, 4, 1))[:, 0]

    @torch.no_grad()
    def rollout(use_refiner: bool, temperature: float) -> torch.Tensor:
        draw = torch.Generator().manual_seed(123)

        def pick(logits):
            if temperature == 0:
                return logits.argmax(-1)
            probs = (logits.float() / temperature).softmax(-1)
            return torch.multinomial(probs.reshape(-1, vocab), 1, generator=draw).reshape(logits.shape[:-1])

        sequence, out = model.encode(frames[:, :2]), []
        for _ in range(horizon):
            hidden = dyn(sequence, eval_actions[:, :sequence.shape[1]])[:, -1]
            frame = pick(dyn.logits(hidden))
            if use_refiner:
                combined = dyn.head(hidden).unflatten(-1, (4, vocab)).clone()
                combined[..., second, :] = refiner(hidden, frame)
                frame = torch.where(is_first, frame, pick(dyn.unpatchify(combined)))
            sequence = torch.cat([sequence, frame[:, None]], 1)
            out.append(frame)
        return model.decode(torch.stack(out, 1))

    results = {}
    for temperature in (0.0, 1.0):
        for use_refiner in (False, True):
            predicted = rollout(use_refiner, temperature)
            ssim = M.ssim(predicted, truth)
            presence = M.object_presence(predicted.flatten(0, 1), truth.flatten(0, 1), segmentation.flatten(0, 1))
            presence = presence.reshape(*truth.shape[:2], -1).nanmean(-1)
            row = {"frame1_psnr_db": M.psnr(predicted[:, 0], truth[:, 0]).mean().item(),
                   "frame1_ssim": ssim[:, 0].mean().item(), "frame1_objects": presence[:, 0].nanmean().item(),
                   "mse": M.mse(predicted, truth).mean().item(), "ssim": ssim.mean().item(),
                   "objects": presence.nanmean().item()}
            name = f"T{temperature:g}_{'refiner' if use_refiner else 'base'}"
            results[name] = {k: round(v, 4) for k, v in row.items()}
            print(name, results[name], flush=True)
    tail = curve[-200:]
    report = {
        "benchmark": "second_pass", "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "model_weights_sha256": weights_hash(resolve_model_path("default")),
        "refiner_layers": args.layers, "refiner_parameters": sum(p.numel() for p in refiner.parameters()),
        "steps": steps, "train_seconds": round(train_seconds, 1), "training_episodes": int(tokens.shape[0]),
        "b_token_ce_last200": {"refiner": round(sum(c[0] for c in tail) / len(tail), 4),
                               "base": round(sum(c[1] for c in tail) / len(tail), 4)},
        "eval": {"seeds": args.eval_seeds, "context": 2, "horizon": horizon, "rollouts": results},
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
