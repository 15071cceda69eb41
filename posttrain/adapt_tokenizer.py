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

With `rollouts` (after LoRA SFT, with its `adapter`), part of each batch is the model's own rollouts of the
training clips decoded against the true frames they stand for: eval decodes the dynamics' guesses, not true
frames' ids, and a decoder that has only seen right tokens trusts wrong ones too.

Writes `out/model/` (the base model with its decoder replaced, saved in the base's weight dtype; load it with
`model=out/model`), `out/report/tokenizer.json` (held-out reconstruction PSNR and SSIM, base vs adapted,
measured on the saved model; with `rollouts`, the held-out clips' rollouts decoded before and after beside
persistence), `out/report/reconstructions.png` (truth / base / adapted), metrics.jsonl and config.json; with
`adapter`, `out/adapter/` (that adapter re-based onto out/model).
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
    rollouts: float = 0.0
    """Share of each batch decoded from the model's own rollout tokens instead of true frames' tokens: at eval a
    decoder draws the dynamics' guesses, never the truth's ids, and a decoder trained on true ids only trusts
    every token (with `reference: true` its gate stays shut where a wrong token should have let the reference
    through). Before training, each of up to `rollout_windows` windows of the training clips is rolled out from
    `rollout_context` true frames for `rollout_horizon` frames, once greedy and twice at temperature 1 (eval's
    two modes), with the clip's own actions; a step then decodes some of those frames (beside the window's last
    true frame, as eval does) against the true frames they stand for. 0: off (true frames' ids only)."""
    adapter: str | None = None
    """A LoRA adapter folder (e.g. LoRA SFT's on this footage) on the model's dynamics for those rollouts: the
    decoder learns the mistakes of the dynamics it will be used with. The adapted model is then written with a
    copy of it re-based onto out/model (out/adapter: only decoding weights differ, checked)."""
    rollout_context: int = 2
    """True frames each rollout starts from (eval's `--context`)."""
    rollout_horizon: int = 8
    """Frames each rollout predicts (eval's `--horizon`)."""
    rollout_windows: int = 256
    """Most (clip, start) windows rolled out (evenly spaced over the training clips; each three times)."""
    object_weight: float = 0.0
    """envs3d data only (the simulator's `segmentation`): add object_weight x the mean absolute error over object
    pixels to the objective, so that a decoder does not learn to draw floor where an object's tokens are unsure
    (squared error, SSIM and L1 over the frame all prefer that; object pixels are a few percent of a frame).
    0: off."""
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

        require(self, positive=("steps", "batch_size", "lr", "grad_clip", "reference_gap", "rollout_context",
                                "rollout_horizon", "rollout_windows"),
                non_negative=("warmup", "eval_every", "checkpoint_every", "threads", "object_weight"))
        if not 0.0 <= self.rollouts <= 1.0:
            raise ValueError(f"rollouts={self.rollouts} is outside [0, 1] (the share of each batch decoded from the "
                             "model's own rollouts)")
        if self.adapter and not self.rollouts:
            raise ValueError(f"adapter={self.adapter} only drives the rollouts the decoder learns from; set rollouts "
                             "above 0 (e.g. rollouts=0.5), or drop the adapter")
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


def read_frames(dataset, pairs: list[tuple[int, int]], column: str = "frames") -> torch.Tensor:
    """(len(pairs), H, W, 3) uint8: the listed frames, reading each distinct clip once (`column="segmentation"`:
    their (len(pairs), H, W) object ids)."""
    distinct = sorted({row for row, _ in pairs})
    dtype = torch.uint8 if column == "frames" else None
    clips = dataset.select(distinct).with_format("torch", columns=[column], dtype=dtype)[:][column]
    where = {row: i for i, row in enumerate(distinct)}
    return torch.stack([clips[where[row], frame] for row, frame in pairs])


ROLLOUT_TEMPERATURES = (0.0, 1.0, 1.0)
"""Each window's rollouts: one greedy, two sampled (eval's two modes; sampled ones err more, as held-out
clips' rollouts do beside training clips')."""


def rollout_windows(rows: list[int], frames_per_clip: int, context: int, horizon: int, limit: int
                    ) -> list[tuple[int, int]]:
    """(dataset row, first frame) of the windows rolled out: every start in every clip, or `limit` of them
    evenly spaced."""
    every = [(row, start) for row in rows for start in range(frames_per_clip - context - horizon + 1)]
    if len(every) <= limit:
        return every
    return [every[i] for i in torch.linspace(0, len(every) - 1, limit).round().long().tolist()]


def read_windows(dataset, windows: list[tuple[int, int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows' first `length` frames (W, length, H, W, 3) uint8 and their actions (W, length - 1) int64."""
    distinct = sorted({row for row, _ in windows})
    part = dataset.select(distinct)
    clips = part.with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
    actions = part.with_format("torch", columns=["actions"])[:]["actions"].long()
    where = {row: i for i, row in enumerate(distinct)}
    return (torch.stack([clips[where[row], start: start + length] for row, start in windows]),
            torch.stack([actions[where[row], start: start + length - 1] for row, start in windows]))


@torch.no_grad()
def own_rollouts(model, dataset, windows: list[tuple[int, int]], context: int, horizon: int, seed: int,
                 temperatures=ROLLOUT_TEMPERATURES, chunk: int = 16) -> torch.Tensor:
    """(W, len(temperatures), horizon, N) token ids: `model`'s rollouts of each window from its first `context`
    true frames with the clip's actions. Rollout j of window w has its own seed, so chunking changes nothing."""
    out = []
    for start in range(0, len(windows), chunk):
        part = windows[start: start + chunk]
        frames, actions = read_windows(dataset, part, context + horizon)
        context_ids = model.encode(frames[:, :context])
        out.append(torch.stack([model.rollout(
            context_ids, actions, horizon, temperature=temperature, decode=False,
            seeds=[(seed * 1_000_003 + start + i) * len(temperatures) + j for i in range(len(part))]).tokens
            for j, temperature in enumerate(temperatures)], 1))
    return torch.cat(out)


def draw_rollout_frames(seed: int, step: int, shape: tuple[int, int, int], count: int) -> list[tuple[int, int, int]]:
    """(window, rollout, frame) of the `count` rollout frames step `step` decodes, out of `shape` = (windows,
    rollouts per window, horizon): a pure function of (seed, step), drawn apart from `draw_frames`' stream."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + 1)
    picks = [torch.randint(n, (count,), generator=generator).tolist() for n in shape]
    return list(zip(*picks))


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


@torch.no_grad()
def rollout_scores(tokenizer, tokens: torch.Tensor, frames: torch.Tensor, context: int,
                   temperatures=(0.0, 1.0), with_reference: bool | None = None) -> dict:
    """Rollout tokens (W, len(temperatures), horizon, N) decoded (beside each window's last true frame, for a
    reference decoder: eval's rule) against the true frames (W, context + horizon, H, W, 3) uint8: SSIM per
    step and mean for each temperature, and the persistence baseline's (repeat the last true frame).
    `with_reference=False` decodes without the reference path (a decoder before it was given one)."""
    from posttrain.rewards.metrics import ssim

    horizon = tokens.shape[2]
    truth = frames[:, context: context + horizon].float() / 255
    last = frames[:, context - 1]
    scores = {}
    for j, temperature in enumerate(temperatures):
        use = tokenizer.config.reference if with_reference is None else with_reference
        drawn = tokenizer.decode(tokens[:, j], last if use else None)
        per_step = ssim(drawn.flatten(0, 1), truth.flatten(0, 1)).view(len(tokens), horizon).mean(0)
        scores[f"T={temperature:g}"] = {"ssim": round(float(per_step.mean()), 5),
                                        "ssim_per_step": [round(float(v), 5) for v in per_step]}
    repeat = (last.float() / 255)[:, None].expand_as(truth)
    per_step = ssim(repeat.flatten(0, 1), truth.flatten(0, 1)).view(len(tokens), horizon).mean(0)
    scores["persistence"] = {"ssim": round(float(per_step.mean()), 5),
                             "ssim_per_step": [round(float(v), 5) for v in per_step]}
    return scores


def rebase_adapter(adapter: str | Path, folder: Path, model_folder: Path, base_model: str) -> Path:
    """Copy `adapter` (made for `base_model`) to `folder`, recording `model_folder` (base_model with only its
    decoding weights changed, which no LoRA target touches) as its base: `load_adapter` checks that hash."""
    from posttrain.adapters import ADAPTER_INFO, base_reference
    from posttrain.models.world_model import weights_hash

    shutil.copytree(adapter, folder)
    info = json.loads((folder / ADAPTER_INFO).read_text())
    info["rebased_from"] = {"base_model": info.get("base_model"), "base_weights_sha256": info.get("base_weights_sha256"),
                            "by": "adapt_tokenizer (only the decoder and its reference path differ)"}
    info["base_model"], info["base_weights_sha256"] = base_reference(str(model_folder)), weights_hash(model_folder)
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    return folder


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
    from posttrain.runfolder import RunLock, check_resume_config, input_paths, prepare_run_folder

    out = Path(config.out)
    model_folder = resolve_model_path(config.model)
    inputs = {**input_paths(to_dict(config)), "model": model_folder, **({"adapter": config.adapter}
                                                                         if config.adapter else {})}
    prepare_run_folder(out, resume=config.resume, overwrite=config.overwrite, inputs=inputs)
    model = load_model(config.model)
    had_reference = frame_tokenizer(model, config.model).config.reference
    dynamics = model  # what rolls out (a `rollouts` run): the dynamics is not trained here
    if config.adapter:
        from posttrain.evaluate import load_with_adapter

        dynamics = load_with_adapter(config.model, config.adapter)  # refuses an adapter made for another base
    if config.reference:
        torch.manual_seed(config.seed)  # the gate's hidden layer starts random: the same run, the same start
        model = with_reference_path(model, config.model)
    tokenizer = frame_tokenizer(model, config.model)
    dataset = load_from_disk(str(dataset_path(config.data)))
    if "frames" not in dataset.column_names or len(dataset) == 0:
        raise ValueError(f"data {config.data.path or config.data.seeds}: no clips with a 'frames' column")
    if config.object_weight and "segmentation" not in dataset.column_names:
        raise ValueError(f"object_weight={config.object_weight} needs the simulator's object masks (envs3d data); "
                         f"data {config.data.path or config.data.seeds} has no 'segmentation' column")
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

    context, horizon = config.rollout_context, config.rollout_horizon
    if config.rollouts and frames_per_clip < context + horizon:
        raise ValueError(f"data {config.data.path or config.data.seeds}: clips of {frames_per_clip} frames are too "
                         f"short for rollouts of rollout_context + rollout_horizon = {context + horizon} frames")

    lock = RunLock(out, "adapt_tokenizer")  # noqa: F841 (held until the process ends)
    recipe = to_dict(config)
    if config.resume:
        check_resume_config(out, recipe)  # another recipe's checkpoint would continue another run
    (out / "config.json").write_text(json.dumps(recipe, indent=2))  # (the model card's recipe and data)
    if config.threads:
        torch.set_num_threads(config.threads)
    log = MetricsWriter(out / "metrics.jsonl")
    windows: list[tuple[int, int]] = []
    rollout_tokens = held_tokens = held_window_frames = None
    if config.rollouts:
        rollout_tokens, held_tokens, windows, held_window_frames = _rollouts_for(config, dynamics, dataset, out,
                                                                                 train_rows, held_rows, frames_per_clip)
    del dynamics

    def held_out_scores(tokenizer) -> dict:
        """Held-out reconstruction, and beside the previous frame for a reference decoder."""
        scores = reconstruction_scores(tokenizer, held_frames)
        if held_references is not None:
            scores["with_previous_frame"] = reconstruction_scores(tokenizer, held_frames, references=held_references)
        return scores

    base_scores = held_out_scores(tokenizer)
    rollouts_before = (rollout_scores(tokenizer, held_tokens, held_window_frames, context, with_reference=had_reference)
                       if held_tokens is not None else None)
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
            from_rollouts = round(config.batch_size * config.rollouts)
            true_count = config.batch_size - from_rollouts
            pairs = draw_frames(config.seed, step, train_rows, frames_per_clip, true_count, gap)
            batch = read_frames(dataset, pairs) if pairs else torch.zeros(0, size, size, 3, dtype=torch.uint8)
            for module in modules:
                module.train()
            # Gradients reach only the decoder: the encoder's weights are frozen, so its latents (and the ids) stay.
            if not true_count:
                recon = batch.float()
            elif config.reference:
                batch, references = batch[:true_count], batch[true_count:]
                plain = round(true_count * config.reference_dropout)  # the first `plain` without one
                gaps = torch.tensor([f - r for (_, f), (_, r) in zip(pairs[:true_count], pairs[true_count:])])
                recon = torch.cat([tokenizer(batch[:plain])[0],
                                   tokenizer(batch[plain:], references[plain:], gaps[plain:])[0]])
            else:
                recon, _ = tokenizer(batch)
            truth = batch.float() / 255
            rollout_pairs: list[tuple[int, int]] = []  # (row, frame) of the true frames the rollout frames stand for
            if from_rollouts:  # the model's own guesses, drawn against the true frames they stand for
                picks = draw_rollout_frames(config.seed, step, tuple(rollout_tokens.shape[:3]), from_rollouts)
                ids = torch.stack([rollout_tokens[w, r, k] for w, r, k in picks])
                rollout_pairs = [(windows[w][0], windows[w][1] + context + k) for w, _, k in picks]
                targets = read_frames(dataset, rollout_pairs)
                if config.reference:  # beside the window's last true frame, k + 1 frames back (eval's rule)
                    last = read_frames(dataset, [(windows[w][0], windows[w][1] + context - 1) for w, _, _ in picks])
                    drawn = tokenizer.draw(ids, last, torch.tensor([k + 1 for _, _, k in picks]))
                else:
                    drawn = tokenizer.draw(ids)
                recon, truth = torch.cat([recon, drawn]), torch.cat([truth, targets.float() / 255])
            loss = ((recon - truth) ** 2).mean()
            objective = loss if config.loss == "mse" else restoration_loss(recon, truth)
            if config.object_weight:  # the same frames' object pixels, in the order recon holds them
                objects = read_frames(dataset, pairs[:true_count] + rollout_pairs, "segmentation")
                objects = (objects > 0).unsqueeze(-1).float()
                object_error = ((recon - truth).abs() * objects).sum() / (3 * objects.sum()).clamp_min(1)
                objective = objective + config.object_weight * object_error
                record_object = object_error.item()
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
            if config.loss != "mse" or config.object_weight:
                record["objective"] = objective.item()
            if config.object_weight:
                record["object_l1"] = record_object
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
               "steps": config.steps, "loss": config.loss, "reference": config.reference, "rollouts": config.rollouts,
               "adapter": config.adapter, "train_minutes_this_run": round((time.time() - started) / 60, 2),
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
    if held_tokens is not None:
        report["held_out_rollouts"] = {"windows": len(held_tokens), "context": context, "horizon": horizon,
                                       "before": rollouts_before,
                                       "after": rollout_scores(saved, held_tokens, held_window_frames, context)}
    if config.adapter:
        if (out / "adapter").exists():  # a resumed run that had got this far
            shutil.rmtree(out / "adapter")
        rebase_adapter(config.adapter, out / "adapter", out / "model", config.model)
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "tokenizer.json").write_text(json.dumps(report, indent=1))
    save_reconstructions(out / "report" / "reconstructions.png", held_frames, base_recon, adapted_recon)
    log.write({"step": config.steps, "held_out": after, "final": True})
    print(f"held-out reconstruction: PSNR {base_scores['psnr_db']:.2f} -> {after['psnr_db']:.2f} dB, SSIM "
          f"{base_scores['ssim']:.3f} -> {after['ssim']:.3f}"
          + (f" (decoded beside the previous frame: SSIM {base_scores['with_previous_frame']['ssim']:.3f} -> "
             f"{after['with_previous_frame']['ssim']:.3f})" if held_references is not None else "")
          + (f"; held-out rollouts decoded, greedy SSIM {rollouts_before['T=0']['ssim']:.3f} -> "
             f"{report['held_out_rollouts']['after']['T=0']['ssim']:.3f}, T=1 {rollouts_before['T=1']['ssim']:.3f} -> "
             f"{report['held_out_rollouts']['after']['T=1']['ssim']:.3f} (persistence "
             f"{rollouts_before['persistence']['ssim']:.3f})" if held_tokens is not None else "")
          + f"; wrote {out / 'model'} (same token ids; train or evaluate on it with model={out / 'model'}"
          + (f" --adapter {out / 'adapter'}" if config.adapter else "") + ")", flush=True)
    return out / "model"


def _rollouts_for(config: AdaptTokenizerConfig, dynamics, dataset, out: Path, train_rows: list[int],
                  held_rows: list[int], frames_per_clip: int):
    """The rollouts a `rollouts` run decodes: (training windows' tokens (W, 3, horizon, N), held-out windows'
    tokens (V, 2, horizon, N) greedy and T=1 (for the report), the training windows, the held-out windows' true
    frames). Made by `dynamics` (the model, with `config.adapter` merged into it if given) once: kept in
    out/rollout_tokens.safetensors, so a resumed run decodes the very same tokens."""
    from safetensors.torch import load_file, save_file

    context, horizon = config.rollout_context, config.rollout_horizon
    windows = rollout_windows(train_rows, frames_per_clip, context, horizon, config.rollout_windows)
    held_windows = [(row, 0) for row in held_rows][: config.rollout_windows]
    held_frames, _ = read_windows(dataset, held_windows, context + horizon)
    cache = out / "rollout_tokens.safetensors"
    if config.resume and cache.is_file():
        saved = load_file(cache)
        return saved["train"], saved["held_out"], windows, held_frames
    started = time.time()
    train = own_rollouts(dynamics, dataset, windows, context, horizon, config.seed)
    held = own_rollouts(dynamics, dataset, held_windows, context, horizon, config.seed + 1, temperatures=(0.0, 1.0))
    save_file({"train": train.contiguous(), "held_out": held.contiguous()}, str(cache))
    print(f"rolled out {len(windows)} training windows x {len(ROLLOUT_TEMPERATURES)} and {len(held_windows)} held-out "
          f"windows x 2 ({context} + {horizon} frames{', adapter ' + str(config.adapter) if config.adapter else ''}) "
          f"in {time.time() - started:.0f} s", flush=True)
    return train, held, windows, held_frames
