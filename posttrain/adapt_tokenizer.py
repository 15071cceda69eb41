"""Adapt a world model's frame decoder to a studio's footage: the same token ids, sharper frames.

    posttrain run recipes/adapt_tokenizer_footage.yaml data.path=data/footage
    posttrain run recipes/adapt_tokenizer_footage.yaml data.path=data/footage --resume    # after a stop
    posttrain run recipes/sft_lora_footage.yaml model=runs/adapt_tokenizer/model ...     # then SFT on it

Why: the embedded models' tokenizer was trained on envs3d's rendered scenes. On real footage its own
reconstruction (a true frame encoded, then decoded) caps every rollout: SSIM 0.647 on `bikes.mp4`'s held-out
clips, below repeating the last frame (0.664). Only the decoder is trained here. The encoder and the FSQ grid
stay frozen, so every frame maps to exactly the token ids it did before: the dynamics model, the log-probs of
its rollouts and any LoRA adapter trained on the base's tokens mean what they meant, and only the pixels a
token decodes to change. Training the encoder too would move ids under the dynamics model, which would then
need re-training; that is not built.

One step: `batch_size` frames drawn from the training clips as a pure function of (seed, step), read from the
memory-mapped dataset (only the clips a step draws are read), and the mean squared error of their
reconstructions. The held-out clips are the last `heldout_fraction` of the dataset's rows (SFT's and
`posttrain eval --data`'s rule), never trained on. Checkpoints (decoder + Adam state as safetensors, nothing
pickled) are written atomically, and `--resume` continues exactly where an unbroken run would be.

Writes `out/model/` (the base model with its decoder replaced, saved in the base's weight dtype; load it with
`model=out/model`), `out/report/tokenizer.json` (held-out reconstruction PSNR and SSIM, base vs adapted,
measured on the saved model), `out/report/reconstructions.png` (truth / base / adapted) and metrics.jsonl.
Single process: a few hundred steps of a small convolutional decoder need no launcher.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.data import EpisodeDataConfig
from posttrain.envs3d.jobs import fault_point
from posttrain.logging_utils import MetricsWriter, progress_bar

LOSSES = ("mse", "ssim_l1")
EVAL_FRAMES = 256
"""Held-out frames scored at most (evenly spaced over the held-out clips): the numbers stay cheap on an hour of
footage."""


@dataclass
class AdaptTokenizerConfig:
    """A decoder-adaptation recipe: which model, which footage, how long."""

    method: str = "adapt_tokenizer"
    """Recipe kind (fixed)."""
    out: str = "runs/adapt_tokenizer"
    """Run folder: metrics.jsonl, checkpoints/, model/ (the adapted model), report/."""
    model: str = "default"
    """The world model whose decoder is adapted: 'default' or a model folder with a frame tokenizer (the token
    model, or a flow model in a tokenizer's latent space)."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(path="data/footage"))
    """The footage (`posttrain footage ingest`'s folder in `path`), or envs3d seeds."""
    heldout_fraction: float = 0.2
    """Share of the dataset's clips (the last rows) kept out of training and scored."""
    steps: int = 300
    """Optimizer steps (measured on bikes.mp4: held-out SSIM 0.64 -> 0.80 by step 100, 0.81 by step 400)."""
    batch_size: int = 32
    """Frames per step."""
    lr: float = 5e-4
    """Peak Adam learning rate (linear warm-up, cosine decay to 5%)."""
    warmup: int = 20
    """Warm-up steps."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    eval_every: int = 100
    """Steps between held-out scores in metrics.jsonl (0: only before and after)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: none; the finished model is always written)."""
    loss: str = "mse"
    """What the decoder minimises: "mse", or "ssim_l1" (0.84 (1 - SSIM) + 0.16 L1, the mix Zhao et al. found best
    for image restoration, arXiv 1511.08861). Squared error prefers a blurry frame to a sharp one a pixel off,
    so under "mse" a reference decoder learns to redraw rather than copy (on bikes.mp4 its held-out SSIM beside
    the previous frame stayed at 0.87, where repeating that frame scores 0.93)."""
    reference: bool = False
    """Also teach the decoder to use a reference frame (`TokenizerConfig.reference`): each training frame is
    decoded with an earlier frame of its clip (1 to `reference_gap` frames back), so that eval, which decodes a
    rollout with the last true context frame, can copy the pixels that still hold. Token model only."""
    reference_gap: int = 8
    """Largest distance (frames) between a training frame and its reference: as far as eval's horizon reaches."""
    reference_dropout: float = 0.2
    """Share of each batch decoded without a reference, so the plain path (GRPO, play) stays adapted too."""
    seed: int = 0
    """Seed of the frames each step draws."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    resume: bool = False
    """Continue from the latest checkpoint in `out` (set by `posttrain run --resume`)."""
    overwrite: bool = False
    """Replace a previous run in `out` (set by `posttrain run --overwrite`)."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("steps", "batch_size", "lr", "grad_clip", "reference_gap"),
                non_negative=("warmup", "eval_every", "checkpoint_every", "threads"))
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.reference_dropout < 1.0:
            raise ValueError(f"reference_dropout={self.reference_dropout} is outside [0, 1)")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} is outside (0, 1): some clips must be held "
                             "out to score the adaptation, and some kept to train on")


def frame_tokenizer(model, name: str):
    """The model's FrameTokenizer, or a clear error naming the model."""
    from posttrain.models import FrameTokenizer

    tokenizer = getattr(model, "tokenizer", None)
    if not isinstance(tokenizer, FrameTokenizer):
        raise ValueError(f"model={name}: {type(model).__name__} has no frame tokenizer to adapt (a token world model, "
                         "or a flow model with space: latent, has one)")
    return tokenizer


def restoration_loss(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """0.84 (1 - SSIM) + 0.16 L1 over (B, H, W, 3) frames in [0, 1] (Zhao et al., arXiv 1511.08861, with
    single-scale SSIM: at 64x64 a multi-scale pyramid has one usable level)."""
    from posttrain.rewards.metrics import ssim

    return 0.84 * (1 - ssim(recon, truth).mean()) + 0.16 * (recon - truth).abs().mean()


def with_reference_path(model, name: str):
    """`model` (a token world model) with a fresh, closed reference path on its tokenizer (weights kept)."""
    import dataclasses

    from posttrain.models import FrameTokenizer, TokenWorldModel

    if not isinstance(model, TokenWorldModel):
        raise ValueError(f"model={name}: reference: true is built for the token world model's decoder, not "
                         f"{type(model).__name__}; set reference: false")
    if model.tokenizer.config.reference:
        return model
    tokenizer = FrameTokenizer(dataclasses.replace(model.tokenizer.config, reference=True))
    missing, unexpected = tokenizer.load_state_dict(model.tokenizer.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("reference_") for k in missing), (missing, unexpected)
    tokenizer.reset_reference()
    model.tokenizer = tokenizer.to(next(model.tokenizer.parameters()).dtype)
    return model


def draw_frames(seed: int, step: int, rows: list[int], frames_per_clip: int, batch_size: int,
                reference_gap: int = 0) -> list[tuple[int, int]]:
    """The (dataset row, frame) pairs step `step` trains on: a pure function of (seed, step), so a resumed
    run draws what an unbroken one would. With `reference_gap`, frames are drawn from the second on and each
    pair is followed by its reference: the frame 1..reference_gap earlier in the same clip (at least frame 0)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    clips = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
    first = 1 if reference_gap else 0
    frames = (first + torch.randint(frames_per_clip - first, (batch_size,), generator=generator)).tolist()
    pairs = [(rows[c], f) for c, f in zip(clips, frames)]
    if not reference_gap:
        return pairs
    gaps = (1 + torch.randint(reference_gap, (batch_size,), generator=generator)).tolist()
    return pairs + [(row, max(0, f - g)) for (row, f), g in zip(pairs, gaps)]


def read_frames(dataset, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """(len(pairs), H, W, 3) uint8: the listed frames, reading each distinct clip once."""
    distinct = sorted({row for row, _ in pairs})
    clips = dataset.select(distinct).with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
    where = {row: i for i, row in enumerate(distinct)}
    return torch.stack([clips[where[row], frame] for row, frame in pairs])


@torch.no_grad()
def reconstruction_scores(tokenizer, frames: torch.Tensor, batch: int = 64,
                          references: torch.Tensor | None = None) -> dict:
    """Held-out frames (F, H, W, 3) uint8 through encode + decode: mean PSNR (dB), SSIM and MSE. `references`
    (F, H, W, 3): decode each frame beside its reference, the frame before it (a reference decoder's path)."""
    from posttrain.rewards.metrics import psnr, ssim

    scores = {"psnr_db": 0.0, "ssim": 0.0, "mse": 0.0}
    for start in range(0, len(frames), batch):
        truth = frames[start: start + batch].float() / 255
        reference = None if references is None else references[start: start + batch]
        recon = tokenizer.decode(tokenizer.encode(frames[start: start + batch]), reference)
        scores["psnr_db"] += float(psnr(recon, truth).sum())
        scores["ssim"] += float(ssim(recon, truth).sum())
        scores["mse"] += float(((recon - truth) ** 2).mean((1, 2, 3)).sum())
    return {k: round(v / len(frames), 5) for k, v in scores.items()}


def save_checkpoint(out: Path, step: int, tokenizer, optimizer) -> Path:
    """out/checkpoints/step-N with the decoder (and the reference path), and Adam's state
    (`runfolder.write_checkpoint`: atomic)."""
    from posttrain.runfolder import optimizer_tensors, write_checkpoint

    tensors, groups = optimizer_tensors(optimizer)
    files = {"decoder": (tokenizer.decoder.state_dict(), {}),
             "optimizer": (tensors, {"param_groups": groups, "step": step})}
    if tokenizer.config.reference:
        files["reference"] = ({f"in.{k}": v for k, v in tokenizer.reference_in.state_dict().items()}
                              | {f"gate.{k}": v for k, v in tokenizer.reference_gate.state_dict().items()}, {})
    return write_checkpoint(out, step, files)


def load_checkpoint(out: Path, tokenizer, optimizer) -> int:
    """Restore the latest checkpoint in `out`; returns the number of steps it had done (0: none there)."""
    from posttrain.runfolder import latest_checkpoint, load_optimizer, read_checkpoint_file

    folder = latest_checkpoint(out)
    if folder is None:
        return 0
    tokenizer.decoder.load_state_dict(read_checkpoint_file(folder / "decoder.safetensors")[0])
    if tokenizer.config.reference:
        saved = read_checkpoint_file(folder / "reference.safetensors")[0]
        tokenizer.reference_in.load_state_dict({k[3:]: v for k, v in saved.items() if k.startswith("in.")})
        tokenizer.reference_gate.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("gate.")})
    tensors, metadata = read_checkpoint_file(folder / "optimizer.safetensors")
    load_optimizer(optimizer, tensors, metadata["param_groups"])
    return int(metadata["step"])


def save_reconstructions(path: Path, truth: torch.Tensor, base: torch.Tensor, adapted: torch.Tensor,
                         columns: int = 8) -> Path:
    """A PNG: rows truth / base tokenizer / adapted tokenizer, `columns` held-out frames, 2x upscaled."""
    import numpy as np
    from PIL import Image

    pick = torch.linspace(0, len(truth) - 1, min(columns, len(truth))).round().long()
    rows = [torch.cat(list(frames[pick]), dim=1) for frames in (truth.float() / 255, base, adapted)]
    grid = (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(grid))
    image = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def run(config: AdaptTokenizerConfig) -> Path:
    from datasets import load_from_disk

    from posttrain.config import to_dict
    from posttrain.data import dataset_path
    from posttrain.footage_clips import heldout_rows
    from posttrain.models import load_model
    from posttrain.models.registry import resolve_model_path
    from posttrain.pretrain import cosine_schedule
    from posttrain.runfolder import RunLock, input_paths, prepare_run_folder

    out = Path(config.out)
    model_folder = resolve_model_path(config.model)
    inputs = {**input_paths(to_dict(config)), "model": model_folder}
    prepare_run_folder(out, resume=config.resume, overwrite=config.overwrite, inputs=inputs)
    model = load_model(config.model)
    frame_tokenizer(model, config.model)
    if config.reference:
        torch.manual_seed(config.seed)  # the gate's hidden layer starts random: the same run, the same start
        model = with_reference_path(model, config.model)
    tokenizer = frame_tokenizer(model, config.model)
    dataset = load_from_disk(str(dataset_path(config.data)))
    if "frames" not in dataset.column_names or len(dataset) == 0:
        raise ValueError(f"data {config.data.path or config.data.seeds}: no clips with a 'frames' column")
    frames_per_clip, size = dataset.features["frames"].shape[0], dataset.features["frames"].shape[1]
    if size != tokenizer.config.image_size:
        raise ValueError(f"data {config.data.path or config.data.seeds}: {size}x{size} frames, but the model's "
                         f"tokenizer takes {tokenizer.config.image_size}x{tokenizer.config.image_size}; ingest at "
                         f"--size {tokenizer.config.image_size}")
    held = heldout_rows(len(dataset), config.heldout_fraction)
    if held >= len(dataset):
        raise ValueError(f"data {config.data.path or config.data.seeds}: {len(dataset)} clips are too few to hold "
                         f"out {config.heldout_fraction} of them and train on the rest")
    train_rows, held_rows = list(range(len(dataset) - held)), list(range(len(dataset) - held, len(dataset)))
    every = [(row, frame) for row in held_rows for frame in range(frames_per_clip)]
    picks = torch.linspace(0, len(every) - 1, min(EVAL_FRAMES, len(every))).round().long().tolist()
    held_frames = read_frames(dataset, [every[i] for i in picks])  # (F, H, W, 3) uint8
    held_references = None
    if config.reference:  # each held-out frame's previous frame (the first frame of a clip is its own)
        held_references = read_frames(dataset, [(row, max(0, f - 1)) for row, f in (every[i] for i in picks)])

    lock = RunLock(out, "adapt_tokenizer")  # noqa: F841 (held until the process ends)
    if config.threads:
        torch.set_num_threads(config.threads)
    log = MetricsWriter(out / "metrics.jsonl")

    def held_out_scores(tokenizer) -> dict:
        """Held-out reconstruction, and beside the previous frame for a reference decoder."""
        scores = reconstruction_scores(tokenizer, held_frames)
        if held_references is not None:
            scores["with_previous_frame"] = reconstruction_scores(tokenizer, held_frames, references=held_references)
        return scores

    base_scores = held_out_scores(tokenizer)
    base_ids = tokenizer.encode(held_frames)  # what the adapted model must still map these frames to
    base_recon = tokenizer.decode(base_ids)
    tokenizer.requires_grad_(False)
    modules = tokenizer.decoding_modules  # the decoder (and the reference path): the encoder and FSQ stay frozen
    for module in modules:
        module.requires_grad_(True)
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    start = load_checkpoint(out, tokenizer, optimizer) if config.resume else 0
    if start == 0:
        log.write({"step": 0, "held_out": base_scores})
    print(f"adapting the decoder of {config.model} on {len(train_rows)} clips of {config.data.path or config.data.seeds}"
          f" ({held} held out); held-out reconstruction before: {base_scores}" + (f"; resuming at step {start}"
                                                                                  if start else ""), flush=True)
    started = time.time()
    with progress_bar(config.steps - start, "decoder") as update:
        for step in range(start, config.steps):
            gap = config.reference_gap if config.reference else 0
            pairs = draw_frames(config.seed, step, train_rows, frames_per_clip, config.batch_size, gap)
            batch = read_frames(dataset, pairs)
            for module in modules:
                module.train()
            # Gradients reach only the decoder: the encoder's weights are frozen, so its latents (and the ids) stay.
            if config.reference:
                batch, references = batch[:config.batch_size], batch[config.batch_size:]
                plain = round(config.batch_size * config.reference_dropout)  # the first `plain` without one
                gaps = torch.tensor([f - r for (_, f), (_, r) in zip(pairs[:config.batch_size], pairs[config.batch_size:])])
                recon = torch.cat([tokenizer(batch[:plain])[0],
                                   tokenizer(batch[plain:], references[plain:], gaps[plain:])[0]])
            else:
                recon, _ = tokenizer(batch)
            truth = batch.float() / 255
            loss = ((recon - truth) ** 2).mean()
            objective = loss if config.loss == "mse" else restoration_loss(recon, truth)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * cosine_schedule(step, config.steps, config.warmup)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            for module in modules:
                module.eval()
            done = step + 1
            record = {"step": done, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]}
            if config.loss != "mse":
                record["objective"] = objective.item()
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                record["held_out"] = held_out_scores(tokenizer)
            log.write(record)
            update(loss=loss.item())
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                save_checkpoint(out, done, tokenizer, optimizer)
                fault_point(f"after_checkpoint:{done}")  # tests: POSTTRAIN_FAULT SIGKILLs here, no timers
    tokenizer.eval()
    weights_dtype = json.loads((model_folder / "config.json").read_text()).get("weights_dtype", "float32")
    summary = {"base_model": str(config.model), "data": config.data.path or config.data.seeds,
               "heldout_clips": f"{held_rows[0]}..{held_rows[-1]}", "heldout_frames_scored": len(held_frames),
               "steps": config.steps, "loss": config.loss, "reference": config.reference, "train_minutes_this_run": round((time.time() - started) / 60, 2),
               "held_out_before": base_scores}
    metadata = {**getattr(model, "metadata", {}), "adapt_tokenizer": summary}
    save = {"weights_dtype": weights_dtype} if weights_dtype != "float32" else {}
    model.save_pretrained(out / "model", metadata=metadata, **save)
    for extra in ("mean_frame.png",):  # the base's mean image (eval's mean-image baseline on envs3d scenes)
        if (model_folder / extra).is_file():
            shutil.copy(model_folder / extra, out / "model" / extra)
    saved = frame_tokenizer(load_model(str(out / "model")), str(out / "model"))
    after = held_out_scores(saved)  # the saved model's numbers (bf16 weights included)
    adapted_ids = saved.encode(held_frames)
    if not torch.equal(adapted_ids, base_ids):
        raise RuntimeError(f"{out / 'model'}: the adapted model maps held-out frames to other token ids than "
                           f"{config.model}; only the decoder may change")
    adapted_recon = saved.decode(adapted_ids)
    report = {**summary, "held_out_after": after}
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "tokenizer.json").write_text(json.dumps(report, indent=1))
    save_reconstructions(out / "report" / "reconstructions.png", held_frames, base_recon, adapted_recon)
    log.write({"step": config.steps, "held_out": after, "final": True})
    print(f"held-out reconstruction: PSNR {base_scores['psnr_db']:.2f} -> {after['psnr_db']:.2f} dB, SSIM "
          f"{base_scores['ssim']:.3f} -> {after['ssim']:.3f}"
          + (f" (decoded beside the previous frame: SSIM {base_scores['with_previous_frame']['ssim']:.3f} -> "
             f"{after['with_previous_frame']['ssim']:.3f})" if held_references is not None else "")
          + f"; wrote {out / 'model'} (same token ids; train or "
          f"evaluate on it with model={out / 'model'})", flush=True)
    return out / "model"
