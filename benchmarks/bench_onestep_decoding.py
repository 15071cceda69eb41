"""Where the default model's one-step error comes from: token accuracy and decoding rules at predicted frame 1.

    python benchmarks/bench_onestep_decoding.py --out benchmarks/results/onestep_decoding_cpu.json   # ~30 s

The setting of `posttrain eval --horizon 32`'s frame 1 (2 true context frames, held-out seeds 2000000-2000047,
episodes of 34 frames: scripted policies plan for the episode's length, so shorter episodes of the same seeds
move otherwise). From one
forward pass, the next frame's 256 token distributions are turned into a frame by several rules, all scored
against the true frame:
- `joint_argmax`: the most likely code per token (what greedy rollouts do);
- `digit_mode` / `digit_median`: each FSQ digit (levels 8, 5, 5, 5) from its own marginal, the mode or the
  median (every digit combination is a valid code, so both decode to a frame like any other);
- `expected_latent`: the probability-weighted mean of the codes' latents, decoded as is (not a code: the
  minimum-MSE guess in latent space, a reference for how much hedging alone could give; it rewards blur);
- `true_tokens`: the tokenizer's own reconstruction of the true frame (the ceiling for any token prediction).
Also the token accuracy, top-5 accuracy and mean probability of the true token. Nothing here changes the
toolkit's decoding; it measures how far decoding rules are from closing the one-step gap.
"""

from __future__ import annotations

import argparse
import json
import platform


def main() -> None:
    import torch

    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.models import load_model
    from posttrain.models.registry import resolve_model_path
    from posttrain.models.world_model import weights_hash
    from posttrain.rewards import metrics as M

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seeds", default="2000000:2000048")
    parser.add_argument("--frames", type=int, default=34, help="episode length (the eval's 2 + horizon)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/onestep_decoding_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    episodes = load_episodes(EpisodeDataConfig(seeds=args.seeds, frames=args.frames), ("frames", "actions", "segmentation"))
    frames, actions = episodes["frames"][:, :3], episodes["actions"][:, :2]
    fsq = model.tokenizer.fsq
    levels, basis = fsq.levels.long(), fsq.basis
    with torch.no_grad():
        tokens = model.encode(frames)
        logits = model.dynamics.logits(model.dynamics(tokens[:, :2], actions)[:, 1]).float()  # predicts frame 2
        probs = logits.softmax(-1)  # (B, N, V)
        vocab = probs.shape[-1]
        ids = torch.arange(vocab)
        digits = (ids[:, None] // basis) % levels  # (V, digits)
        rules = {"joint_argmax": probs.argmax(-1), "true_tokens": tokens[:, 2]}
        mode, median = torch.zeros_like(rules["joint_argmax"]), torch.zeros_like(rules["joint_argmax"])
        for d, level in enumerate(levels.tolist()):
            marginal = torch.zeros(*probs.shape[:2], level).scatter_add_(-1, digits[:, d].expand_as(probs), probs)
            mode += marginal.argmax(-1) * basis[d]
            median += (marginal.cumsum(-1) < 0.5).sum(-1).clamp(max=level - 1) * basis[d]
        rules["digit_mode"], rules["digit_median"] = mode, median
        decoded = {name: model.decode(ids_) for name, ids_ in rules.items()}
        grid = model.tokenizer.config.grid
        latent = (probs @ fsq.ids_to_latents(ids)).reshape(-1, grid, grid, len(levels)).permute(0, 3, 1, 2)
        decoded["expected_latent"] = ((model.tokenizer.decoder(latent).float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    truth = frames[:, 2].float() / 255
    segmentation = episodes["segmentation"][:, 2]
    rows = {}
    for name, image in decoded.items():
        rows[name] = {"psnr_db": round(M.psnr(image, truth).mean().item(), 3), "mse": round(M.mse(image, truth).mean().item(), 5),
                      "ssim": round(M.ssim(image, truth).mean().item(), 4),
                      "objects": round(M.object_presence(image, truth, segmentation).nanmean().item(), 4)}
        print(f"{name:16s} {rows[name]}")
    true_next = tokens[:, 2]
    report = {
        "benchmark": "onestep_decoding", "machine": platform.processor() or platform.machine(),
        "model": args.model, "model_weights_sha256": weights_hash(resolve_model_path(args.model)),
        "seeds": args.seeds, "episode_frames": args.frames, "context_frames": 2,
        "token_accuracy": round((rules["joint_argmax"] == true_next).float().mean().item(), 4),
        "token_top5_accuracy": round((logits.topk(5, -1).indices == true_next[..., None]).any(-1).float().mean().item(), 4),
        "mean_probability_of_true_token": round(probs.gather(-1, true_next[..., None]).mean().item(), 4),
        "rules": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
